"""Answer a candidate's approval (the Human-in-the-loop task ``approve_promotion``) from a shell.

    python scripts/approve.py RUN_ID approve [--comment TEXT]
    python scripts/approve.py RUN_ID reject  [--comment TEXT]
    options: --dag DAG_ID (default nightly_retrain)  --task TASK_ID  --url AIRFLOW_URL

It calls the REST API of a running Airflow API server that shares the
metadata DB (``make airflow-ui``): ``PATCH /api/v2/dags/{dag}/dagRuns/{run}/
taskInstances/{task}/-1/hitlDetails``, the call the UI's Required Actions page
makes, so the auth manager decides who may answer and records who did. It
signs in with ``AIRFLOW_API_TOKEN`` if set, else with ``AIRFLOW_USERNAME`` and
``AIRFLOW_PASSWORD`` (``POST /auth/token``), else asks for the token the
embedded profile's all-admins SimpleAuthManager hands out (``GET /auth/token``).
Exit status: 0 answered, 1 refused (the API's reason is printed), 2 no API server.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any
from urllib.parse import quote, urlencode

DAG_ID = "nightly_retrain"
TASK_ID = "approve_promotion"
ANSWERS = {"approve": "Approve", "reject": "Reject"}


def airflow_url() -> str:
    """Base URL of the Airflow UI and API: ``[api] base_url`` (``AIRFLOW__API__BASE_URL``),
    else ``http://<AIRFLOW__API__HOST or 127.0.0.1>:<AIRFLOW__API__PORT or 8080>``."""
    base = os.environ.get("AIRFLOW__API__BASE_URL", "").strip()
    if not base:
        host = os.environ.get("AIRFLOW__API__HOST", "").strip() or "127.0.0.1"
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        base = f"http://{host}:{os.environ.get('AIRFLOW__API__PORT', '').strip() or '8080'}"
    return base.rstrip("/")


def required_actions_url(dag_id: str, run_id: str | None, task_id: str = TASK_ID, base: str | None = None) -> str:
    """The Airflow UI page where a person answers the task (the route HITLOperator.generate_link_to_ui
    builds); without a run id, the list of every unanswered request."""
    base = base or airflow_url()
    if not run_id:
        return f"{base}/required_actions?{urlencode({'response_received': 'false'})}"
    q = lambda s: quote(s, safe="")  # noqa: E731 - run ids carry ':' and '+'
    return f"{base}/dags/{q(dag_id)}/runs/{q(run_id)}/tasks/{q(task_id)}/required_actions"


def hitl_api_path(dag_id: str, run_id: str, task_id: str = TASK_ID, map_index: int = -1) -> str:
    q = lambda s: quote(s, safe="")  # noqa: E731
    return f"/api/v2/dags/{q(dag_id)}/dagRuns/{q(run_id)}/taskInstances/{q(task_id)}/{map_index}/hitlDetails"


def answer_command(run_id: str | None, answer: str = "approve", dag_id: str = DAG_ID) -> str:
    """The shell command that answers (as :func:`main` takes it), quoted for a POSIX shell."""
    import shlex

    dag = "" if dag_id == DAG_ID else f" --dag {shlex.quote(dag_id)}"
    return f"python scripts/approve.py {shlex.quote(run_id or 'RUN_ID')} {answer}{dag} --comment '...'"


def _token(client: Any) -> str:
    if os.environ.get("AIRFLOW_API_TOKEN"):
        return os.environ["AIRFLOW_API_TOKEN"]
    if os.environ.get("AIRFLOW_USERNAME"):
        r = client.post("/auth/token", json={"username": os.environ["AIRFLOW_USERNAME"],
                                             "password": os.environ.get("AIRFLOW_PASSWORD", "")})
    else:
        r = client.get("/auth/token")
    if r.status_code not in (200, 201):
        raise PermissionError(f"{r.request.method} {r.request.url} answered {r.status_code} {_detail(r)}: set "
                              "AIRFLOW_API_TOKEN, or AIRFLOW_USERNAME and AIRFLOW_PASSWORD")
    return r.json()["access_token"]


def _detail(r: Any) -> str:
    try:
        return str(r.json().get("detail"))
    except ValueError:
        return r.text[:300]


def answer(run_id: str, choice: str, *, comment: str = "", dag_id: str = DAG_ID, task_id: str = TASK_ID,
           url: str | None = None, transport: Any = None) -> dict[str, Any]:
    """Record ``choice`` (``approve``/``reject``) on the task's request; returns the API's answer.

    :raises PermissionError: no token, or the API refused (403, 409 already answered, 404 ...).
    :raises ValueError: a comment for a request that has no comment field.
    :raises ConnectionError: no API server at ``url``.
    """
    import httpx

    base = url or airflow_url()
    path = hitl_api_path(dag_id, run_id, task_id)
    try:
        with httpx.Client(base_url=base, timeout=30, transport=transport) as client:
            client.headers["Authorization"] = f"Bearer {_token(client)}"
            r = client.get(path)
            if r.status_code != 200:
                raise PermissionError(f"GET {base}{path} answered {r.status_code}: {_detail(r)}")
            request = r.json()
            if request.get("response_received"):
                who = (request.get("responded_by_user") or {}).get("name")
                raise PermissionError(f"{task_id} of {dag_id} {run_id} was already answered "
                                      f"{request.get('chosen_options')} by {who}")
            # the form's fields, as they are, with the comment filled in (the task checks that every field is there)
            params = {k: (v.get("value") if isinstance(v, dict) else v) for k, v in (request.get("params") or {}).items()}
            if "comment" in params:
                params["comment"] = comment
            elif comment:
                raise ValueError(f"{task_id} of {dag_id} {run_id} asks for no comment (its fields: {sorted(params)})")
            r = client.patch(path, json={"chosen_options": [ANSWERS[choice]], "params_input": params})
            if r.status_code != 200:
                raise PermissionError(f"PATCH {base}{path} answered {r.status_code}: {_detail(r)}")
            return r.json()
    except httpx.TransportError as exc:
        raise ConnectionError(f"no Airflow API server answers at {base} ({type(exc).__name__}): start it with "
                              "`make airflow-ui` in another terminal (it shares this metadata DB), or pass --url") from exc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_id")
    ap.add_argument("answer", choices=sorted(ANSWERS))
    ap.add_argument("--comment", default="", help="recorded with the answer on the model version")
    ap.add_argument("--dag", default=DAG_ID)
    ap.add_argument("--task", default=TASK_ID)
    ap.add_argument("--url", default=None, help=f"Airflow base URL (default {airflow_url()})")
    a = ap.parse_args(argv)
    try:
        res = answer(a.run_id, a.answer, comment=a.comment, dag_id=a.dag, task_id=a.task, url=a.url)
    except ConnectionError as exc:
        print(f"approve.py: {exc}", file=sys.stderr)
        return 2
    except (PermissionError, ValueError) as exc:
        print(f"approve.py: {exc}", file=sys.stderr)
        return 1
    who = (res.get("responded_by") or {}).get("name", "?")
    print(f"{a.task} of {a.dag} {a.run_id}: {res.get('chosen_options')} recorded for {who}; the run goes on")
    return 0


if __name__ == "__main__":
    sys.exit(main())

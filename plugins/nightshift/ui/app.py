"""The FastAPI app behind the Nightshift view, mounted by the plugin at ``/nightshift``.

Every route requires an Airflow identity (the UI's ``_token`` cookie or an
``Authorization: Bearer`` JWT, resolved by Airflow's own
:func:`~airflow.api_fastapi.core_api.security.get_user`) and read access to
DAG runs through the configured auth manager: no identity is 401 (browsers are
sent to the login page instead), a bad token or a user without access 403.
Reports under ``runs/`` also need read access to the DAG their run folder's
``run.json`` records (never the folder's name: names are sanitised); a folder
that records none needs access to every DAG whose runs could be in it.

Everything shown is read through the artifact store the workers use (``operators.base.artifact_store``:
an ``s3://`` root through the connection ``NIGHTSHIFT_ARTIFACT_CONN_ID``): with an
``s3://`` root, a report is downloaded (sha256-verified) into the API server's own working
copy before it is served.

Built lazily by the plugin, only in the API server; MLflow is imported inside
the request handlers.
"""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from nightshift.ui import data

TEMPLATES = Path(__file__).parent / "templates"
#: HTML reports (Evidently) carry scripts: run them in an opaque origin, away from Airflow's cookies and API.
REPORT_CSP = "sandbox allow-scripts allow-popups; default-src 'self' 'unsafe-inline' 'unsafe-eval' data: blob:"


def _jinja():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))
    env.filters["short"] = lambda v, n=12: "" if v is None else (str(v) if len(str(v)) <= n else str(v)[:n] + "…")
    env.filters["num"] = _num
    env.filters["when"] = _when
    return env


def _num(value: Any, digits: int = 4) -> str:
    """A number for people: 4 significant digits; a dict (e.g. a relative gate) as ``key value, ...``."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_num(v, 3)}" for k, v in value.items())
    if value is None or value == "":
        return "–"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if f == 0:
        return "0"  # not "-0"
    return str(int(f)) if f.is_integer() and abs(f) >= 1 else f"{f:.{digits}g}"


def _when(value: Any) -> str:
    """An ISO time as ``YYYY-MM-DD HH:MM:SS UTC`` (anything else as it is)."""
    from datetime import datetime, timezone

    if not value:
        return ""
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if t.tzinfo is not None else "")


def _auth_manager():
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def _check_user(user: Any) -> Any:
    """The user, if the auth manager gives it read access to DAG runs; else 403."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity

    if not _auth_manager().is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN, user=user):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden: read access to DAG runs is required")
    return user


def _require_dag(user: Any, dag_id: str) -> None:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    if not _auth_manager().is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN,
                                                details=DagDetails(id=dag_id), user=user):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"Forbidden: read access to DAG {dag_id!r} is required")


def _known_dag_ids() -> list[str]:
    """Every DAG id the metadata DB knows."""
    from sqlalchemy import select

    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        return list(session.scalars(select(DagModel.dag_id)))


def _authorize_report(user: Any, store: Any, parts: tuple[str, ...]) -> None:
    """403 unless ``user`` may read the DAG runs the report at ``parts`` (relative to
    the artifact root, symlinks resolved) belongs to."""
    if parts[0] != "runs":
        return
    dag_id = data.report_dag_id(store, "/".join(parts))
    if dag_id is not None:
        _require_dag(user, dag_id)
        return
    # No run.json (a folder from before run folders recorded their DAG, or a file beside
    # the run folders): any DAG whose id maps to this folder, old or new naming, may own it.
    from nightshift.artifacts import folder_owners

    owners = folder_owners(parts[1], _known_dag_ids())
    if not owners:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"Forbidden: runs/{parts[1]} records no DAG (no run.json) and names no known DAG")
    for dag_id in owners:
        _require_dag(user, dag_id)


def _settings():
    from nightshift.settings import Settings

    return Settings.from_env()


def _store():
    """The artifact store the view reads: an ``s3://`` root with the credentials of the Airflow
    connection ``NIGHTSHIFT_ARTIFACT_CONN_ID``, the one the workers' store uses (not the API server's
    ``AWS_*`` environment, which a deployment with only the connection does not have). A connection
    that is not defined is a 503 naming it."""
    from nightshift.errors import ConfigError
    from nightshift.operators.base import artifact_store

    try:
        return artifact_store()
    except ConfigError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None


def _overview() -> dict[str, Any]:
    from nightshift import registry
    from nightshift.model_config import load_models

    s = _settings()
    return data.build_overview(_store(), registry.client(s.mlflow_tracking_uri, s.mlflow_registry_uri),
                               configured=load_models())


def create_app() -> FastAPI:
    from airflow.api_fastapi.core_api.security import get_user

    async def require_user(user: Any = Depends(get_user)) -> Any:
        # get_user: 401 without an identity, 403 for an invalid or expired token
        return _check_user(user)

    app = FastAPI(title="Nightshift", description="Models, gates, deployments, drift and reports of Nightshift.",
                  docs_url=None, redoc_url=None, openapi_url=None)
    env = _jinja()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        wants_html = "text/html" in request.headers.get("accept", "")
        if exc.status_code == status.HTTP_401_UNAUTHORIZED and wants_html:
            return RedirectResponse(_auth_manager().get_url_login(next_url=str(request.url)),
                                    status_code=status.HTTP_303_SEE_OTHER)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/", response_class=HTMLResponse)
    def view(request: Request, user: Any = Depends(require_user)) -> HTMLResponse:
        overview = _overview()
        html = env.get_template("view.html").render(o=overview, user=getattr(user, "get_name", lambda: "")())
        return HTMLResponse(html)

    @app.get("/api/overview")
    def overview_json(user: Any = Depends(require_user)) -> dict[str, Any]:
        return _overview()

    @app.get("/reports/{rel_path:path}")
    def report(request: Request, rel_path: str, raw: bool = False, user: Any = Depends(require_user)) -> Response:
        store = _store()
        path = data.resolve_report(store, rel_path)  # fetched into the working copy from an object store
        if path is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "No such report")
        parts = path.relative_to(store.local_root.resolve()).parts  # authorize on where the file really is
        _authorize_report(user, store, parts)
        if path.suffix == ".json" and not raw:
            try:
                body = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                body = None
            if body is not None:
                html = env.get_template("report.html").render(
                    title=rel_path, body=json.dumps(body, indent=2, sort_keys=True, default=str),
                    summary=_summary(body), histograms=_histograms(body), raw_url=f"{path.name}?raw=1",
                    view_url=request.scope.get("root_path", "") + "/")
                return HTMLResponse(html)
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        headers = {"Content-Security-Policy": REPORT_CSP} if media == "text/html" else {}
        return FileResponse(path, media_type=media, headers={**headers, "X-Content-Type-Options": "nosniff"})

    return app


def _summary(body: Any) -> list[tuple[str, str]]:
    """The scalar fields of a JSON report (nested objects one level deep, as ``a.b``)."""
    if not isinstance(body, dict):
        return []
    out = []
    for k, v in body.items():
        items = v.items() if isinstance(v, dict) else [(None, v)]
        for sub, x in items:
            if isinstance(x, (str, int, float, bool)) or x is None:
                out.append((f"{k}.{sub}" if sub is not None else str(k), _num(x) if isinstance(x, float) else str(x)))
    return out[:40]


def _histograms(body: Any) -> list[dict[str, Any]]:
    """Histograms in a report: any object under a key naming a histogram, with
    ``counts`` and ``edges`` (len(counts) + 1) or ``bins`` (len(counts)); drawn as bars."""
    found = []
    if not isinstance(body, dict):
        return found
    for key, value in body.items():
        if "hist" not in str(key).lower() or not isinstance(value, dict):
            continue
        counts = value.get("counts")
        edges = value.get("edges") or value.get("bins")
        if not isinstance(counts, list) or not isinstance(edges, list) or not counts:
            continue
        top = max((c for c in counts if isinstance(c, (int, float))), default=0) or 1
        labels = [_num(e, 3) for e in edges]
        bars = [{"label": labels[i] if i < len(labels) else "", "count": c,
                 "h": (c / top if isinstance(c, (int, float)) else 0)} for i, c in enumerate(counts)]
        found.append({"name": str(key), "bars": bars, "last": labels[-1] if len(edges) > len(counts) else ""})
    return found

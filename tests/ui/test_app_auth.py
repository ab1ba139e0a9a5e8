"""The plugin's FastAPI app refuses requests without an Airflow identity or access.

The auth manager here is a stand-in with the interface Airflow's ``get_user``
and the app call; ``test_browser.py`` checks the same against the real API server
and SimpleAuthManager."""

from __future__ import annotations

import pytest
from jwt import InvalidTokenError

from .conftest import DAG, MODEL

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


class FakeAuthManager:
    """Tokens ``viewer`` (may read DAG runs) and ``nobody`` (may not); anything else is invalid."""

    def __init__(self):
        self.denied_dags: set[str] = set()

    async def get_user_from_token(self, token):
        if token not in ("viewer", "nobody"):
            raise InvalidTokenError("bad token")
        return type("U", (), {"name": token, "get_name": lambda self: self.name})()

    def is_authorized_dag(self, *, method, user, access_entity=None, details=None):
        return user.name == "viewer" and not (details and details.id in self.denied_dags)

    def get_url_login(self, **kwargs):
        return "/auth/login?next=" + kwargs.get("next_url", "")


@pytest.fixture
def am(monkeypatch):
    from airflow.api_fastapi.app import _AuthManagerState

    fake = FakeAuthManager()
    monkeypatch.setattr(_AuthManagerState, "instance", fake)
    return fake


@pytest.fixture
def client(world_env, am):
    from fastapi.testclient import TestClient

    from nightshift.ui.app import create_app

    return TestClient(create_app(), follow_redirects=False)


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_every_route_refuses_without_identity_bad_token_or_access(client, world_env):
    report = f"reports/{world_env['versions'][0]['folder'].relative_to(world_env['root']).as_posix()}/promotion.json"
    for path in ("/", "/api/overview", f"/{report}"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=_bearer("forged")).status_code == 403, path
        assert client.get(path, cookies={"_token": "forged"}).status_code == 403, path
        assert client.get(path, headers=_bearer("nobody")).status_code == 403, path
        assert client.get(path, headers=_bearer("viewer")).status_code == 200, path
        assert client.get(path, cookies={"_token": "viewer"}).status_code == 200, path


def test_a_browser_without_a_session_is_sent_to_the_login_page(client):
    r = client.get("/", headers={"Accept": "text/html"})
    assert r.status_code == 303 and r.headers["location"].startswith("/auth/login?next=")


def test_reports_of_a_dag_need_read_access_to_that_dag(client, am, world_env):
    rel = world_env["versions"][0]["folder"].relative_to(world_env["root"]).as_posix()
    am.denied_dags.add(DAG)
    assert client.get(f"/reports/{rel}/promotion.json", headers=_bearer("viewer")).status_code == 403
    tl = f"/reports/drift/{MODEL}/2026-11-02T03/drift_report.html"
    assert client.get(tl, headers=_bearer("viewer")).status_code == 200
    # through another folder and back: authorized on where the file is, not on the spelling
    for detour in (f"/reports/registry/%2e%2e/{rel}/promotion.json",
                   f"/reports/runs/open_dag/%2e%2e/{rel.split('/', 1)[1]}/promotion.json"):
        assert client.get(detour, headers=_bearer("viewer")).status_code in (403, 404), detour


def test_view_and_reports_render(client, world_env):
    page = client.get("/", headers=_bearer("viewer")).text
    assert MODEL in page and "v1" in page and "champion" in page and "NOT BLESSED" in page
    assert "reports/runs/nightly_retrain/" in page and "http://mlflow.example:5000/#/runs/" in page
    assert "fewer than min_rows=100: no verdict" in page  # why a drift check gave no verdict
    rel = world_env["versions"][0]["folder"].relative_to(world_env["root"]).as_posix()
    r = client.get(f"/reports/{rel}/system_eval/system_eval.json", headers=_bearer("viewer"))
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and "latency_ms.p95" in r.text
    assert "<svg" in r.text and "latency_histogram_ms" in r.text and "raw JSON" in r.text
    raw = client.get(f"/reports/{rel}/system_eval/system_eval.json?raw=1", headers=_bearer("viewer"))
    assert raw.json()["latency_ms"]["p95"] == 4.5
    html = client.get(f"/reports/{rel}/drift/drift_report.html", headers=_bearer("viewer"))
    assert "Drift report v1" in html.text and html.headers["content-security-policy"].startswith("sandbox")


@pytest.mark.parametrize("path", ["/reports/../mlflow.db", "/reports/runs/../../mlflow.db",
                                  "/reports/snapshots/x.json", "/reports/runs/nightly_retrain/nope.json",
                                  "/reports/%2e%2e/mlflow.db", "/reports/runs/%2e%2e/%2e%2e/mlflow.db"])
def test_paths_outside_the_served_folders_are_404(client, path):
    assert client.get(path, headers=_bearer("viewer")).status_code == 404


def test_a_report_is_authorized_on_the_dag_its_run_recorded_not_on_the_folder_name(client, am, tmp_path,
                                                                                    monkeypatch):
    """``_private``, ``private_`` and ``private`` once shared the folder ``runs/private``: a user
    allowed on ``private`` could read ``_private``'s reports (issue 19, item 9)."""
    from nightshift.artifacts import RUN_META, atomic_write_json, run_dir
    from nightshift.ui import app as ui_app

    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", str(tmp_path))
    run_id = "manual__2026-11-01T02:00:00+00:00"
    rel = {}
    for dag in ("private", "_private", "private_"):
        folder = run_dir(tmp_path, dag, run_id)
        atomic_write_json(folder / "promotion.json", {"dag": dag})
        rel[dag] = f"/reports/{folder.relative_to(tmp_path).as_posix()}/promotion.json"
    assert len(set(rel.values())) == 3
    am.denied_dags.update({"_private", "private_"})
    ok = client.get(rel["private"], headers=_bearer("viewer"))
    assert ok.status_code == 200 and "private" in ok.text
    for dag in ("_private", "private_"):
        r = client.get(rel[dag], headers=_bearer("viewer"))
        assert r.status_code == 403 and repr(dag) in r.json()["detail"], dag
    # a run.json naming a DAG whose runs live elsewhere is not believed
    forged = tmp_path / "runs" / "private" / "forged"
    atomic_write_json(forged / "promotion.json", {})
    atomic_write_json(forged / RUN_META, {"dag_id": "_private", "run_id": "forged"})
    # a folder recording no DAG (written before run.json) needs every DAG whose runs it may hold
    legacy = tmp_path / "runs" / "private" / "manual__2026-10-01T02_00_00_00_00"
    atomic_write_json(legacy / "promotion.json", {})
    monkeypatch.setattr(ui_app, "_known_dag_ids", lambda: ["private", "_private", "private_", "other"])
    for folder in (forged, legacy):
        url = f"/reports/{folder.relative_to(tmp_path).as_posix()}/promotion.json"
        assert client.get(url, headers=_bearer("viewer")).status_code == 403, folder
    am.denied_dags.clear()
    assert client.get(f"/reports/{legacy.relative_to(tmp_path).as_posix()}/promotion.json",
                      headers=_bearer("viewer")).status_code == 200
    monkeypatch.setattr(ui_app, "_known_dag_ids", lambda: ["other"])  # no DAG could own it: refused
    assert client.get(f"/reports/{legacy.relative_to(tmp_path).as_posix()}/promotion.json",
                      headers=_bearer("viewer")).status_code == 403

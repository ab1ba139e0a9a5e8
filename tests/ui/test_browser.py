"""The Nightshift view on the real Airflow API server (SimpleAuthManager with a
real user, not all-admins), in headless Chromium.

Screenshots go to ``$NIGHTSHIFT_HOME/test-artifacts/`` (``.nightshift/`` is gitignored).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from nightshift.containers import free_port
from .conftest import MODEL

USER, PASSWORD = "viewer", "s3cret-viewer"
ARTIFACTS = Path(os.environ.get("NIGHTSHIFT_HOME", Path(__file__).resolve().parents[2] / ".nightshift")) / "test-artifacts"


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    """``airflow api-server`` on a free loopback port, serving the test world."""
    tmp = tmp_path_factory.mktemp("api-server")
    (tmp / "passwords.json").write_text(json.dumps({USER: PASSWORD}))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ,
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:viewer",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp / "passwords.json"),
           "AIRFLOW__API_AUTH__JWT_SECRET": "nightshift-test-" + os.urandom(16).hex(),
           "AIRFLOW__API__BASE_URL": base,
           "NIGHTSHIFT_ARTIFACT_ROOT": str(world["root"]),
           "MLFLOW_TRACKING_URI": world["tracking_uri"],
           "MLFLOW_REGISTRY_URI": world["tracking_uri"],
           "NIGHTSHIFT_MODELS_FILE": str(world["models_file"]),
           "NIGHTSHIFT_MLFLOW_UI_URL": "http://127.0.0.1:5000"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "api-server.log", "w")
    proc = subprocess.Popen([shutil.which("airflow") or "airflow", "api-server", "-H", "127.0.0.1", "-p", str(port),
                             "-w", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"api-server exited with {proc.returncode}; see {ARTIFACTS / 'api-server.log'}")
            try:
                if httpx.get(f"{base}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"api-server not healthy after 90 s; see {ARTIFACTS / 'api-server.log'}")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


HTTP = httpx.Client(timeout=60)  # the first view request imports MLflow: seconds on a busy 2-core machine


def _token(base: str, password: str = PASSWORD) -> httpx.Response:
    return HTTP.post(f"{base}/auth/token", json={"username": USER, "password": password})


def test_plugin_endpoints_refuse_requests_without_a_valid_airflow_identity(server, world):
    rel = world["versions"][0]["folder"].relative_to(world["root"]).as_posix()
    paths = ["/nightshift/", "/nightshift/api/overview", f"/nightshift/reports/{rel}/promotion.json"]
    assert _token(server, "wrong").status_code == 401
    token = _token(server).json()["access_token"]
    for p in paths:
        assert HTTP.get(server + p).status_code == 401, p
        assert HTTP.get(server + p, headers={"Authorization": "Bearer not-a-jwt"}).status_code == 403, p
        assert HTTP.get(server + p, headers={"Authorization": f"Bearer {token}"}).status_code == 200, p
    overview = HTTP.get(f"{server}/nightshift/api/overview", headers={"Authorization": f"Bearer {token}"}).json()
    assert overview["models"][0]["champion"] == "1"
    plugins = HTTP.get(f"{server}/api/v2/plugins", headers={"Authorization": f"Bearer {token}"}).json()["plugins"]
    assert any(p["name"] == "nightshift" and p["external_views"][0]["href"] == "/nightshift/" for p in plugins)


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make setup installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"nightshift-chromium-{os.getpid()}"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1500,1100"):
        opts.add_argument(arg)
    d = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    d.set_page_load_timeout(60)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _full_page_screenshot(d, path: Path) -> None:
    import base64

    shot = d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))


def _wait(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - the page is still loading
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_view_in_chromium_lists_the_champion_and_a_report_opens(server, browser, world):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(f"{server}/nightshift/")  # no session yet: Airflow's login page
    _wait(lambda: d.find_element(By.NAME, "username"), what="the login form")
    d.save_screenshot(str(ARTIFACTS / "nightshift-login.png"))
    d.find_element(By.NAME, "username").send_keys(USER)
    d.find_element(By.NAME, "password").send_keys(PASSWORD)
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(lambda: d.get_cookie("_token"), what="the session cookie")
    if "/nightshift/" not in d.current_url:
        d.get(f"{server}/nightshift/")
    _wait(lambda: d.find_element(By.ID, f"model-{MODEL}"), what="the Nightshift view")
    d.save_screenshot(str(ARTIFACTS / "nightshift-view.png"))
    _full_page_screenshot(d, ARTIFACTS / "nightshift-view-full.png")
    card = d.find_element(By.ID, f"model-{MODEL}")
    assert card.find_element(By.CSS_SELECTOR, ".champion-version").text == "v1"
    champion_row = d.find_element(By.ID, "v1")
    assert "champion" in champion_row.text and "BLESSED" in champion_row.text
    assert "NOT BLESSED" in d.find_element(By.ID, "v2").text

    link = champion_row.find_element(By.LINK_TEXT, "system eval")
    href = link.get_attribute("href")
    assert href.startswith(f"{server}/nightshift/reports/runs/nightly_retrain/")
    d.get(href)
    _wait(lambda: "p95" in d.find_element(By.TAG_NAME, "pre").text, what="the system-eval report")
    d.save_screenshot(str(ARTIFACTS / "nightshift-report.png"))

    # the menu entry: the view inside the Airflow UI (external_views, url_route "nightshift")
    d.get(f"{server}/plugin/nightshift")
    _wait(lambda: d.find_element(By.TAG_NAME, "iframe"), what="the view embedded in the Airflow UI")
    time.sleep(2)
    d.save_screenshot(str(ARTIFACTS / "nightshift-in-airflow-ui.png"))
    d.switch_to.frame(d.find_element(By.TAG_NAME, "iframe"))
    _wait(lambda: d.find_element(By.ID, f"model-{MODEL}"), what="the view inside the iframe")
    d.switch_to.default_content()

"""Blue/green deployment on the real Docker daemon, and Kubernetes manifests."""

from __future__ import annotations

import threading
import time

import pytest

from nightshift.deploy import LocalDeployer, render_kubernetes, validate_manifests
from nightshift.errors import ConfigError, ServingError


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _derived(client, base: str, tag: str, *lines: str) -> str:
    """A new image (new id) on top of ``base``, e.g. another label or a broken setting."""
    import io

    dockerfile = "\n".join([f"FROM {base}", *lines, ""]).encode()
    client.images.build(fileobj=io.BytesIO(dockerfile), tag=tag, network_mode="none", rm=True)
    return tag


@pytest.mark.docker
def test_blue_green_switch_serves_throughout_and_a_failed_start_keeps_the_old_one(serving_docker, serving_image,
                                                                                   tmp_path):
    import requests

    client = serving_docker
    image = serving_image["image"]
    green_img = _derived(client, image, "nightshift-test/tiny:green", 'LABEL ai.nightshift.test.colour="green"')
    broken_img = _derived(client, image, "nightshift-test/tiny:broken", "ENV NIGHTSHIFT_MODEL_DIR=/nonexistent")
    d = LocalDeployer(client, model_name="tiny", artifact_root=tmp_path, port=_free_port(),
                      ready_timeout_s=30, drain_timeout_s=5)
    try:
        first = d.deploy(image, registry_version="1")
        assert first["changed"] and requests.get(f"{d.url}/v2/health/ready", timeout=5).status_code == 200
        assert d.deploy(image, registry_version="1")["changed"] is False  # what serves already: no-op

        failures, stop = [], threading.Event()

        def hammer():
            while not stop.is_set():
                try:
                    r = requests.get(f"{d.url}/v2/models/tiny", timeout=5)
                    if r.status_code != 200:
                        failures.append(r.status_code)
                except requests.RequestException as exc:
                    failures.append(repr(exc))
                time.sleep(0.01)

        t = threading.Thread(target=hammer)
        t.start()
        try:
            second = d.deploy(green_img, registry_version="2")
        finally:
            stop.set()
            t.join()
        assert failures == []  # no request failed while traffic moved
        assert second["container"] != first["container"] and second["previous"]["registry_version"] == "1"
        assert client.containers.get(second["container"]).status == "running"
        with pytest.raises(Exception):
            client.containers.get(first["container"])  # blue is gone

        with pytest.raises(ServingError, match="v2 keeps serving") as exc:
            d.deploy(broken_img, registry_version="3")
        assert exc.value.logs  # green's log is attached
        # a server that exits at start is caught at its first exit, not after the ready timeout:
        # Docker's restart policy would otherwise bring it back again and again
        assert "exited with status 1 before" in str(exc.value) or "crashed before it was ready" in str(exc.value)
        assert d.state()["registry_version"] == "2"
        assert requests.get(f"{d.url}/v2/health/ready", timeout=5).status_code == 200
        assert len(client.containers.list(filters={"label": "ai.nightshift.model=tiny"})) == 2  # serving + proxy
        assert (tmp_path / "request_logs" / "tiny").is_dir()
    finally:
        d.undeploy()
        for tag in (green_img, broken_img):
            client.images.remove(tag, force=True)


def test_kubernetes_manifests_render_and_validate():
    ms = render_kubernetes("Nightshift_Digits", "registry.example/nightshift/digits:abc", registry_version="3")
    assert [m["kind"] for m in ms] == ["Deployment", "Service", "InferenceService"]
    dep = ms[0]["spec"]["template"]["spec"]["containers"][0]
    assert dep["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert dep["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert ms[0]["metadata"]["name"] == "nightshift-digits" and ms[2]["spec"]["predictor"]["containers"][0]["image"]
    with pytest.raises(ConfigError, match="unknown field 'replicaz'"):
        validate_manifests([ms[0] | {"spec": ms[0]["spec"] | {"replicaz": 2}}])
    with pytest.raises(ConfigError, match="port must be an integer"):
        validate_manifests([{**ms[1], "spec": {**ms[1]["spec"], "ports": [{"name": "http", "port": "eighty"}]}}])
    with pytest.raises(ConfigError, match="InferenceService manifest is invalid"):
        validate_manifests([{**ms[2], "spec": {}}])


@pytest.mark.docker
def test_a_deploy_killed_while_blue_drains_names_green_and_the_next_removes_blue(serving_docker, serving_image,
                                                                               tmp_path, monkeypatch):
    from docker.models.containers import Container

    client = serving_docker
    image = serving_image["image"]
    green_img = _derived(client, image, "nightshift-test/tiny:green2", 'LABEL ai.nightshift.test.colour="green2"')
    d = LocalDeployer(client, model_name="tiny", artifact_root=tmp_path, port=_free_port(),
                      ready_timeout_s=30, drain_timeout_s=5)
    try:
        first = d.deploy(image, registry_version="1")
        seen = []

        def killed(self, **kw):
            seen.append(d.state()["container"])  # what the state says while blue would drain
            raise KeyboardInterrupt  # the worker died here

        monkeypatch.setattr(Container, "stop", killed)
        with pytest.raises(KeyboardInterrupt):
            d.deploy(green_img, registry_version="2")
        monkeypatch.undo()
        state = d.state()
        assert state["registry_version"] == "2" and seen == [state["container"]]
        assert client.containers.get(first["container"]).status == "running"  # blue was left behind
        again = d.deploy(green_img, registry_version="2")
        assert again["changed"] is False  # green already serves
        with pytest.raises(Exception):
            client.containers.get(first["container"])  # and the leftover blue is gone
    finally:
        d.undeploy()
        client.images.remove(green_img, force=True)

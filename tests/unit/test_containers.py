"""The container runtime (:mod:`nightshift.containers`): free ports, the Docker client,
InferenceContainer's arguments, readiness and removal with the real image, the sweep."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from nightshift.containers import InferenceContainer, connect_docker, free_port, free_ports
from nightshift.errors import DockerUnavailable, ServingError
from nightshift.scoring import score_endpoint


def test_free_port_is_bindable():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_free_ports_are_distinct():
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(1024 <= p <= 65535 for p in ports)


def test_unreachable_daemon_says_how_to_start_one(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/nightshift-docker.sock")
    with pytest.raises(DockerUnavailable, match="ensure_docker.sh") as err:
        connect_docker(timeout_s=5)
    assert err.value.retryable  # a daemon that is restarting may be back on the retry


def test_stop_before_start_is_a_no_op():
    c = InferenceContainer("whatever:1", docker_client=object())
    c.stop()
    c.stop()
    assert c.url == f"http://127.0.0.1:{c.port}" and c.name.startswith("nightshift-eval-")


def test_container_arguments_come_from_serving_run_kwargs(tmp_path):
    """InferenceContainer's ``containers.run`` arguments are containers.serving_run_kwargs' (what
    deploy uses), with the system-eval labels, no restart policy, and the extras on top."""
    from nightshift.containers import CONTAINER_LOG_DIR, ServingConfig, serving_run_kwargs

    config = ServingConfig(environment={"NIGHTSHIFT_REQUEST_LOG_ROTATE_S": "5"})
    c = InferenceContainer("img:1", docker_client=object(), config=config, request_log_dir=tmp_path / "log",
                           owner="d/r/t")
    spec = c.run_kwargs()
    assert spec == serving_run_kwargs("img:1", name=c.name, port=c.port, config=config,
                                      request_log_dir=tmp_path / "log", labels=c.labels)
    assert spec["environment"]["NIGHTSHIFT_REQUEST_LOG_SAMPLE"] == "1.0" and "restart_policy" not in spec
    assert spec["labels"]["ai.nightshift.role"] == "system-eval" and spec["labels"]["ai.nightshift.owner"] == "d/r/t"
    bare = InferenceContainer("img:1", docker_client=object(), config=config, environment={"MODEL_URI": "file:///m"},
                              volumes={"/host/m": {"bind": "/m", "mode": "ro"}}).run_kwargs()
    assert "NIGHTSHIFT_REQUEST_LOG_DIR" not in bare["environment"]  # no folder given: no request log
    assert bare["environment"]["MODEL_URI"] == "file:///m" and bare["environment"]["NIGHTSHIFT_REQUEST_LOG_ROTATE_S"] == "5"
    assert bare["volumes"] == {"/host/m": {"bind": "/m", "mode": "ro"}} and bare["mem_limit"] == "2g"
    assert CONTAINER_LOG_DIR in {v["bind"] for v in spec["volumes"].values()}


# ----------------------------------------------------------------------------- real container


def _gone(client, name: str) -> bool:
    import docker

    try:
        client.containers.get(name)
    except docker.errors.NotFound:
        return True
    return False


@pytest.mark.docker
def test_container_serves_tritonclient_and_is_removed(serving_image, serving_docker, serving_eval_set, tmp_path,
                                                      tiny_onnx_forward):
    """The built image, hardened as SystemEval (and deploy) run it: NVIDIA's client in JSON and
    binary mode, /metrics, and the request log in a mounted folder at the deployed rate."""
    import os
    import stat

    import requests
    import tritonclient.http as th

    images, labels = serving_eval_set
    log_dir = tmp_path / "requests"
    with InferenceContainer(serving_image["image"], docker_client=serving_docker, request_log_dir=log_dir,
                            environment={"NIGHTSHIFT_GRACEFUL_TIMEOUT_S": "2"}) as c:
        waited = c.wait_ready(timeout_s=60)
        assert waited >= 0
        info = serving_docker.containers.get(c.name).attrs
        assert info["HostConfig"]["NetworkMode"] == "host"
        assert info["HostConfig"]["CapDrop"] == ["ALL"]
        assert info["HostConfig"]["Memory"] == 2 * 1024 ** 3
        assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"]
        assert info["Config"]["Labels"]["ai.nightshift.role"] == "system-eval"
        assert f"NIGHTSHIFT_PORT={c.port}" in info["Config"]["Env"]
        assert "NIGHTSHIFT_HOST=127.0.0.1" in info["Config"]["Env"]
        assert "NIGHTSHIFT_REQUEST_LOG_SAMPLE=1.0" in info["Config"]["Env"]
        assert not stat.S_IMODE(os.stat(log_dir).st_mode) & 0o002  # never world-writable
        res = score_endpoint(c.url, "tiny", images, labels, batch_size=4)
        assert res["errors"] == 0 and res["accuracy"] == pytest.approx(0.75)

        client = th.InferenceServerClient(c.url.removeprefix("http://"))
        assert client.is_server_ready() and client.is_model_ready("tiny", "1")
        assert client.get_model_metadata("tiny", "1")["inputs"][0]["datatype"] == "UINT8"
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        logits, _ = tiny_onnx_forward(images[:4])
        for binary in (False, True):
            inp = th.InferInput("pixels", [4, 4, 4, 1], "UINT8")
            inp.set_data_from_numpy(images[:4], binary_data=binary)
            r = client.infer("tiny", [inp], model_version="1",
                             outputs=[th.InferRequestedOutput("logits", binary_data=binary)])
            np.testing.assert_allclose(r.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
            assert ("binary_data_size" in r.get_response()["outputs"][0].get("parameters", {})) == binary
        metrics = requests.get(f"{c.url}/metrics", timeout=5).text
        assert 'nightshift_requests_total{code="200",method="POST",route="infer"}' in metrics
        name = c.name
    assert _gone(serving_docker, name)
    c.stop()  # idempotent
    # the container was stopped gracefully enough to publish the request log
    from nightshift.serving.requestlog import read_records

    recs = read_records(log_dir)  # published files and .part ones
    assert len(recs) >= 20 and {r["model_name"] for r in recs} == {"tiny"}


@pytest.mark.docker
@pytest.mark.parametrize(
    ("kwargs", "timeout", "needle", "log_needle"),
    [
        pytest.param({"command": ["python", "-c", "print('nightshift-crash'); raise SystemExit(3)"]}, 30,
                     "exited with status 3", "nightshift-crash", id="crashes"),
        pytest.param({"environment": {"NIGHTSHIFT_MODEL_DIR": "/models/missing"}}, 30,
                     "exited with status 1", "missing/model.json does not exist", id="bad-model-dir"),
        pytest.param({"command": ["sleep", "60"]}, 1.5, "was not ready", "", id="never-ready"),
    ],
)
def test_container_removed_when_not_ready(serving_image, serving_docker, kwargs, timeout, needle, log_needle):
    c = InferenceContainer(serving_image["image"], docker_client=serving_docker, **kwargs)
    try:
        c.start()
        with pytest.raises(ServingError) as info:
            c.wait_ready(timeout_s=timeout)
        assert needle in str(info.value)
        assert log_needle in info.value.logs
    finally:
        c.stop()
    assert _gone(serving_docker, c.name)


@pytest.mark.docker
def test_missing_image(serving_docker):
    c = InferenceContainer("nightshift-test/does-not-exist:0", docker_client=serving_docker)
    with pytest.raises(ServingError, match="does not exist in the local daemon"):
        with c:
            pass
    assert _gone(serving_docker, c.name)


@pytest.mark.docker
def test_sweep_removes_only_old_leftovers(serving_image, serving_docker):
    import time as _time

    from nightshift.containers import HOST_LABEL, ROLE_LABEL, STARTED_LABEL, sweep_containers

    import socket as _socket

    old = serving_docker.containers.create(serving_image["image"], ["sleep", "60"], network_mode="host", labels={
        ROLE_LABEL: "system-eval", STARTED_LABEL: str(int(_time.time()) - 7200), HOST_LABEL: _socket.gethostname()})
    new = serving_docker.containers.create(serving_image["image"], ["sleep", "60"], network_mode="host", labels={
        ROLE_LABEL: "system-eval", STARTED_LABEL: str(int(_time.time())), HOST_LABEL: _socket.gethostname()})
    try:
        removed = sweep_containers(serving_docker, older_than_s=3600)
        assert old.name in removed and new.name not in removed
        assert _gone(serving_docker, old.name) and not _gone(serving_docker, new.name)
    finally:
        for ctr in (old, new):
            try:
                ctr.remove(force=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


def test_free_port_pair_gives_two_adjacent_free_ports():
    import socket

    from nightshift.containers import free_port_pair

    p = free_port_pair()
    with socket.socket() as a, socket.socket() as b:  # both bind: neither was taken
        a.bind(("127.0.0.1", p))
        b.bind(("127.0.0.1", p + 1))

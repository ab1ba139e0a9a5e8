"""Blue/green deployment on the real Docker daemon, and Kubernetes manifests."""

from __future__ import annotations

import os
import threading
import time

import pytest

from nightshift.containers import free_port
from nightshift.deploy import LocalDeployer
from nightshift.errors import ConfigError, ServingError


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
    d = LocalDeployer(client, model_name="tiny", artifact_root=tmp_path, port=free_port(),
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


@pytest.mark.docker
def test_a_deploy_killed_while_blue_drains_names_green_and_the_next_removes_blue(serving_docker, serving_image,
                                                                               tmp_path, monkeypatch):
    from docker.models.containers import Container

    client = serving_docker
    image = serving_image["image"]
    green_img = _derived(client, image, "nightshift-test/tiny:green2", 'LABEL ai.nightshift.test.colour="green2"')
    d = LocalDeployer(client, model_name="tiny", artifact_root=tmp_path, port=free_port(),
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


# --------------------------------------------------------------------------- one writer, on the real daemon


@pytest.fixture(scope="module")
def versioned_images(serving_docker, serving_image):
    """Three images of the tiny model whose servers report versions ``111111111111``,
    ``222222222222``, ``333333333333`` (the first 12 characters of each version's onnx digest tag)."""
    client = serving_docker
    out = {}
    for i in (1, 2, 3):
        tag = f"nightshift-test/tiny:served-{i}"
        fix = (f"import json; p='/models/tiny/model.json'; m=json.load(open(p)); m['version']='{str(i) * 12}'; "
               "json.dump(m, open(p, 'w'))")
        _derived(client, serving_image["image"], tag, "USER root", f'RUN python3 -c "{fix}"', "USER 10001:10001")
        out[str(i)] = {"image": tag, "image_id": client.images.get(tag).id}
    yield out
    for v in out.values():
        client.images.remove(v["image"], force=True)


def _registry_with_three_versions(tmp_path, images):
    from nightshift import contracts, registry, state
    from nightshift.gates import Decision

    c = registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = tmp_path / "artifacts"
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"x")
    for i in ("1", "2", "3"):
        with registry.training_run(c, "exp", f"r{i}", tags={}, params={},
                                   artifact_location=(tmp_path / "art").as_uri()) as run_id:
            registry.log_artifacts(c, run_id, tmp_path / "onnx", "onnx")
        prev = registry.get_champion(c, "tiny")
        out = registry.register_candidate(
            c, "tiny", run_id, artifact_path="onnx",
            tags={"onnx_sha256": i * 64, "image": images[i]["image"], "image_id": images[i]["image_id"]},
            decision=Decision("BLESSED", "test", prev["version"] if prev else None))
        state.append_history(root, contracts.HistoryEvent(
            model="tiny", action="promoted", version=out["version"], previous_champion=out["previous_champion"],
            champion=out["champion"], reason="test"))
    return c, root


def _deployer(client, root, port, hook=None):
    return LocalDeployer(client, model_name="tiny", artifact_root=root, port=port, ready_timeout_s=30,
                         drain_timeout_s=2, hook=hook)


@pytest.mark.docker
@pytest.mark.parametrize("serving,first,point", [("2", "deploy", "champion_read"), ("2", "deploy", "before_switch"),
                                                 ("3", "rollback", "green_started"),
                                                 ("3", "rollback", "before_record")])
def test_rollback_racing_the_nightly_deploy_ends_serving_the_registry_champion(
        serving_docker, versioned_images, tmp_path, serving, first, point):
    """Issue 19 item 4 on the real daemon: the nightly run promoted v3 and its deploy runs while a
    person rolls back to ``previous`` (v2). When the first writer reaches ``point`` the second
    starts and waits on the champion lock; the stable port ends serving exactly the registry's
    champion, the state names that container, and no other serving container is left."""
    import requests

    from nightshift import champion, registry
    from nightshift.containers import DEPLOYMENT_LABEL, ROLE_LABEL

    client = serving_docker
    c, root = _registry_with_three_versions(tmp_path, versioned_images)
    port = free_port()
    base = _deployer(client, root, port)
    base.deploy(versioned_images[serving]["image"], registry_version=serving, model_version=serving * 12)
    second_waits, errors = threading.Event(), []

    def run_second():
        try:
            d = _deployer(client, root, port)
            hook = (lambda p: second_waits.set() if p == "lock_wait" else None)
            if first == "deploy":
                champion.change_champion(c, model_name="tiny", artifact_root=root, version="previous",
                                         action="rolled_back", reason="v3 misbehaves", actor="ops", deployer=d,
                                         run_id="rb", hook=hook)
            else:
                champion.reconcile(c, d, reason="nightly", hook=hook)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    second = threading.Thread(target=run_second)

    def first_hook(p):
        if p == point and second.ident is None:
            second.start()
            deadline = time.monotonic() + 30
            while not second_waits.is_set() and second.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert second.is_alive(), f"the second writer finished while the first was at {point}"

    try:
        d1 = _deployer(client, root, port, hook=first_hook)
        if first == "deploy":
            champion.reconcile(c, d1, reason="nightly", hook=first_hook)
        else:
            champion.change_champion(c, model_name="tiny", artifact_root=root, version="previous",
                                     action="rolled_back", reason="v3 misbehaves", actor="ops", deployer=d1,
                                     run_id="rb", hook=first_hook)
        assert second.ident is not None, f"the first writer never passed {point}"
        second.join(120)
        assert not errors, errors
        assert second_waits.is_set()
        champ = registry.get_champion(c, "tiny")["version"]
        assert champ == "2"
        meta = requests.get(f"{base.url}/v2/models/tiny", timeout=5).json()
        assert meta["versions"] == [champ * 12]  # the stable port serves exactly the champion
        state = base.state()
        assert state["registry_version"] == champ and base.upstream_port() == state["port"]
        serving_now = client.containers.list(all=True, filters={"label": [f"{DEPLOYMENT_LABEL}={base.deployment_id}",
                                                                           f"{ROLE_LABEL}=serving"]})
        assert [x.name for x in serving_now] == [state["container"]]  # no orphaned container
    finally:
        if second.ident is not None:
            second.join(120)
        base.undeploy()


@pytest.mark.docker
def test_repeated_rollback_on_the_real_daemon_always_moves(serving_docker, versioned_images, tmp_path):
    """rollback previous, twice: v3 -> v2 -> v1, each served; the third has nowhere to go and moves nothing."""
    import requests

    from nightshift import champion, registry

    client = serving_docker
    c, root = _registry_with_three_versions(tmp_path, versioned_images)
    d = _deployer(client, root, free_port())
    try:
        champion.reconcile(c, d, reason="nightly")
        served = []
        for i in (1, 2, 3):
            try:
                out = champion.change_champion(c, model_name="tiny", artifact_root=root, version="previous",
                                               action="rolled_back", reason="bad", actor="ops", deployer=d,
                                               run_id=f"rb{i}")
                assert out["moved"]
            except ConfigError as exc:
                assert i == 3 and "records no champion before v1" in str(exc)
            served.append((registry.get_champion(c, "tiny")["version"],
                           requests.get(f"{d.url}/v2/models/tiny", timeout=5).json()["versions"][0]))
        assert served == [("2", "2" * 12), ("1", "1" * 12), ("1", "1" * 12)]
    finally:
        d.undeploy()


@pytest.mark.docker
def test_request_log_folder_is_not_world_writable_and_the_server_writes_it(serving_docker, serving_image, tmp_path):
    """Issue 19 item 10 (host part): the deployed server writes its request log into a folder
    no other local user can write (old code: chmod 1777)."""
    import json
    import stat

    import numpy as np
    import requests

    from nightshift.containers import SERVING_UID
    from nightshift.serving.requestlog import read_records

    d = LocalDeployer(serving_docker, model_name="tiny", artifact_root=tmp_path, port=free_port(),
                      ready_timeout_s=30, drain_timeout_s=2)
    try:
        d.deploy(serving_image["image"], registry_version="1")
        x = np.arange(2 * 16, dtype=np.uint8).reshape(2, 4, 4, 1)
        body = {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "UINT8",
                            "data": x.ravel().tolist()}]}
        r = requests.post(f"{d.url}/v2/models/tiny/infer", data=json.dumps(body), timeout=10,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        mode = d.log_dir.stat().st_mode
        assert not mode & (stat.S_IWOTH | stat.S_IWGRP), oct(mode)  # nobody else can forge the traffic
        assert d.log_dir.stat().st_uid == (SERVING_UID if os.geteuid() == 0 else os.getuid())
        deadline, records = time.monotonic() + 60, []  # 60 s only bounds a hang
        while time.monotonic() < deadline and len(records) < 2:
            records = read_records(d.log_dir)  # published files and .part ones
            time.sleep(0.2)
        assert len(records) == 2 and records[0]["model_name"] == "tiny"  # the server could write there
    finally:
        d.undeploy()


@pytest.mark.docker
def test_a_new_deploy_port_moves_the_proxy(serving_docker, serving_image, tmp_path):
    """The model's stable port changed (another deploy_port): the proxy is replaced on the new port,
    instead of the old one being kept and the deploy failing on every retry."""
    import requests

    image = serving_image["image"]
    first = LocalDeployer(serving_docker, model_name="tiny", artifact_root=tmp_path, port=free_port(),
                          ready_timeout_s=30, drain_timeout_s=5)
    try:
        first.deploy(image, registry_version="1")
        moved = LocalDeployer(serving_docker, model_name="tiny", artifact_root=tmp_path, port=free_port(),
                              ready_timeout_s=30, drain_timeout_s=5)
        moved.deploy(image, registry_version="1")
        assert requests.get(f"{moved.url}/v2/health/ready", timeout=5).status_code == 200
        with pytest.raises(requests.RequestException):
            requests.get(f"{first.url}/v2/health/ready", timeout=2)
    finally:
        first.undeploy()


# ------------------------------------------------------------------------------------------ gRPC
def test_the_grpc_port_is_the_rest_port_plus_one_unless_turned_off():
    from nightshift.deploy import grpc_port_for

    assert grpc_port_for(8600, {}) == 8601  # Triton's 8000/8001 pairing
    assert grpc_port_for(8600, {"NIGHTSHIFT_DEPLOY_GRPC": "auto"}) == 8601
    assert grpc_port_for(8600, {"NIGHTSHIFT_DEPLOY_GRPC": "off"}) is None
    with pytest.raises(ConfigError, match="NIGHTSHIFT_DEPLOY_GRPC='sometimes'"):
        grpc_port_for(8600, {"NIGHTSHIFT_DEPLOY_GRPC": "sometimes"})
    with pytest.raises(ConfigError, match="not a TCP port"):
        grpc_port_for(65535, {})
    with pytest.raises(ConfigError, match="not the REST port"):
        LocalDeployer(None, model_name="tiny", artifact_root="/nonexistent", port=8600, grpc_port=8600)


def _grpc_infer(target: str, x):
    import tritonclient.grpc as tg

    c = tg.InferenceServerClient(target)
    try:
        assert c.is_server_ready() and c.is_model_ready("tiny")
        inp = tg.InferInput("pixels", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x)
        return c.infer("tiny", [inp]).as_numpy("logits")
    finally:
        c.close()


@pytest.mark.docker
def test_the_stable_grpc_port_follows_the_switch(serving_docker, serving_image, tiny_onnx_forward, tmp_path):
    """The proxy forwards the stable gRPC port to green's gRPC port: tritonclient.grpc gets the same
    answers before and after a blue/green switch; a REST-only deploy of the model takes the gRPC
    port down again (the proxy is replaced, green serves REST only)."""
    import numpy as np
    import tritonclient.grpc as tg

    from nightshift.containers import free_ports

    image = serving_image["image"]
    green_img = _derived(serving_docker, image, "nightshift-test/tiny:grpc-green", 'LABEL ai.nightshift.test.grpc="1"')
    port, gport = free_ports(2)
    d = LocalDeployer(serving_docker, model_name="tiny", artifact_root=tmp_path, port=port, grpc_port=gport,
                      ready_timeout_s=30, drain_timeout_s=5, switch_grace_s=0.2)
    x = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 1), dtype=np.uint8)
    logits, _ = tiny_onnx_forward(x)
    try:
        blue = d.deploy(image, registry_version="1")
        assert blue["grpc_target"] == f"127.0.0.1:{gport}" and blue["backend_grpc_port"] not in (None, gport)
        np.testing.assert_allclose(_grpc_infer(d.grpc_target, x), logits, rtol=1e-5, atol=1e-5)

        green = d.deploy(green_img, registry_version="2")
        assert green["changed"] and green["backend_grpc_port"] != blue["backend_grpc_port"]
        assert d.state()["grpc_target"] == f"127.0.0.1:{gport}"
        np.testing.assert_allclose(_grpc_infer(d.grpc_target, x), logits, rtol=1e-5, atol=1e-5)
        assert serving_docker.containers.list(all=True, filters={"name": blue["container"]}) == []

        rest_only = LocalDeployer(serving_docker, model_name="tiny", artifact_root=tmp_path, port=port,
                                  ready_timeout_s=30, drain_timeout_s=5, switch_grace_s=0.2)
        again = rest_only.deploy(green_img, registry_version="2")
        assert again["changed"] and again["grpc_port"] is None and again["backend_grpc_port"] is None
        c = tg.InferenceServerClient(f"127.0.0.1:{gport}")
        with pytest.raises(Exception):  # nothing listens on the stable gRPC port any more
            c.is_server_live(client_timeout=2)
        c.close()
    finally:
        d.undeploy()
        serving_docker.images.remove(green_img, force=True)

"""nightshift.system_eval without Airflow or Docker: the gates measure the configuration that serves.

A fake Docker client records the ``containers.run`` arguments; where a test needs a server
it starts the in-process OIP server the way the image's entry point would (port and
request log from the container's environment and volumes).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from nightshift.containers import CONTAINER_LOG_DIR, DEPLOYED_REQUEST_LOG_SAMPLE, ROLE_LABEL, ServingConfig, free_port
from nightshift.errors import PreprocessingSkew


class _Captured(Exception):
    """Raised by the fake ``containers.run`` once it has the arguments (nothing starts)."""


class _FakeContainer:
    def __init__(self, name: str, stop_server=None):
        self.name, self.id = name, f"id-{name}"
        self.status = "running"
        self.attrs = {"State": {"Status": "running"}, "RestartCount": 0}
        self.removed = False
        self._stop_server = stop_server

    def reload(self):
        pass

    def logs(self, tail=200):
        return b"(fake container log)"

    def stop(self, timeout=10):  # SIGTERM, as the daemon sends it: the server stops
        self.stopped_with = timeout
        if self.status == "running" and self._stop_server is not None:
            self._stop_server()
        self.status = "exited"

    def remove(self, force=False):
        if not self.removed and self.status == "running" and self._stop_server is not None:
            self._stop_server()
        self.removed = True
        self.status = "removed"


class _FakeContainers:
    def __init__(self, start=None):
        self.runs: list[dict] = []
        self.started: list[_FakeContainer] = []
        self._start = start

    def run(self, image, **kwargs):
        self.runs.append({"image": image, **kwargs})
        if self._start is None:
            raise _Captured(kwargs["name"])
        c = _FakeContainer(kwargs["name"], self._start(image, kwargs))
        self.started.append(c)
        return c

    def list(self, all=False, filters=None):  # noqa: A002 - docker's name
        return []

    def get(self, name):
        from docker.errors import NotFound

        raise NotFound(f"no container {name}")


class FakeDocker:
    """Just what InferenceContainer, sweep_containers and LocalDeployer.deploy call."""

    def __init__(self, start=None):
        self.containers = _FakeContainers(start)
        self.images = SimpleNamespace(get=lambda ref: SimpleNamespace(id=f"sha256:{ref}"))

    def ping(self):
        return True


class _Split:
    """The snapshot surface run_system_eval reads: the test split in two shards, the class names."""

    def __init__(self, images, labels, class_names):
        self.images, self.labels, self.class_names = images, labels, list(class_names)

    def iter_split(self, name):
        assert name == "test"
        half = len(self.images) // 2
        yield self.images[:half], self.labels[:half]
        yield self.images[half:], self.labels[half:]


def _comparable(kwargs: dict) -> dict:
    """``containers.run`` arguments less what may differ between system eval and deploy:
    the port, the name, the labels, the restart policy and the request-log folder on the host."""
    kw = {k: v for k, v in kwargs.items() if k not in ("name", "labels", "restart_policy")}
    kw["environment"] = {k: v for k, v in kw["environment"].items() if k not in ("NIGHTSHIFT_PORT", "NIGHTSHIFT_GRPC_PORT")}  # deploy also serves gRPC
    kw["volumes"] = sorted((v["bind"], v["mode"]) for v in kw.get("volumes", {}).values())
    return kw


def test_system_eval_starts_the_container_as_deploy_does(tmp_path, monkeypatch):
    """Issue 19 item 5: system eval and deploy start the image with the same arguments
    (request log at the deployed rate, memory limit, environment) from one function."""
    from nightshift.operators.deploy import local_deployer
    from nightshift.system_eval import run_system_eval

    monkeypatch.setenv("NIGHTSHIFT_REQUEST_LOG_ROTATE_S", "7")  # a platform's serving setting reaches both
    images = np.zeros((4, 4, 4, 1), np.uint8)
    snap = _Split(images, np.zeros(4, np.int64), ["zero", "one", "two"])

    eval_client = FakeDocker()
    with pytest.raises(_Captured):
        run_system_eval("nightshift/m:1", snap, model_name="m", out_dir=tmp_path / "run" / "system_eval",
                        onnx_path=None, docker_client=eval_client)
    deploy_client = FakeDocker()
    from nightshift.store import open_store

    operator = SimpleNamespace(settings=SimpleNamespace(artifact_root=tmp_path / "artifacts",
                                                        base_image="nightshift/base:bookworm"),
                               store=open_store(tmp_path / "artifacts"), docker_client=lambda: deploy_client)
    deployer = local_deployer(operator, model_name="m", port=free_port())
    with pytest.raises(_Captured):
        deployer.deploy("nightshift/m:1", registry_version="3")

    [ev], [dep] = eval_client.containers.runs, deploy_client.containers.runs
    assert _comparable(ev) == _comparable(dep)
    # and what they share is the deployed configuration, request log on
    assert ev["environment"]["NIGHTSHIFT_REQUEST_LOG_DIR"] == CONTAINER_LOG_DIR
    assert float(ev["environment"]["NIGHTSHIFT_REQUEST_LOG_SAMPLE"]) == DEPLOYED_REQUEST_LOG_SAMPLE == 1.0
    assert ev["environment"]["NIGHTSHIFT_REQUEST_LOG_ROTATE_S"] == "7"
    assert ev["mem_limit"] == dep["mem_limit"] == "2g" and ev["network_mode"] == "host"
    [(host_dir, bind)] = ev["volumes"].items()
    assert host_dir == str(tmp_path / "run" / "system_eval" / "requests") and bind["bind"] == CONTAINER_LOG_DIR
    # only these differ
    assert "restart_policy" not in ev and dep["restart_policy"] == {"Name": "unless-stopped"}
    assert ev["labels"][ROLE_LABEL] == "system-eval" and dep["labels"][ROLE_LABEL] == "serving"
    assert ev["environment"]["NIGHTSHIFT_PORT"] != dep["environment"]["NIGHTSHIFT_PORT"]


def _in_process_image(model_dir):
    """A fake ``containers.run`` that does what the image's entry point does: serve the model
    on NIGHTSHIFT_PORT with the request log the environment and the mounted folder name."""
    from nightshift.serving.requestlog import RequestLog
    from nightshift.serving.server import Model, make_server

    def start(image, kwargs):
        env = kwargs["environment"]
        request_log = None
        if env.get("NIGHTSHIFT_REQUEST_LOG_DIR"):
            [host_dir] = [h for h, v in kwargs["volumes"].items() if v["bind"] == env["NIGHTSHIFT_REQUEST_LOG_DIR"]]
            request_log = RequestLog(host_dir, sample_rate=float(env["NIGHTSHIFT_REQUEST_LOG_SAMPLE"]))
        model = Model(model_dir, max_batch=8, intra_op_threads=1)
        model.load()
        server = make_server(model, env["NIGHTSHIFT_HOST"], int(env["NIGHTSHIFT_PORT"]), request_log=request_log)
        server.start()

        def stop():
            server.shutdown()
            server.server_close()

        return stop

    return start


@pytest.fixture
def eval_split(tiny_onnx_forward, tiny_onnx_spec):
    """20 random 4x4x1 images; labels are the model's predictions except the first 5: accuracy 0.75."""
    images = np.random.default_rng(3).integers(0, 256, (20, 4, 4, 1), dtype=np.uint8)
    labels = tiny_onnx_forward(images)[0].argmax(axis=1)
    labels[:5] = (labels[:5] + 1) % 3
    return _Split(images, labels.astype(np.int64), tiny_onnx_spec["class_names"])


def test_run_system_eval_measures_with_the_request_log_on(tiny_onnx_model_dir, eval_split, tmp_path):
    from nightshift.system_eval import run_system_eval

    client = FakeDocker(start=_in_process_image(tiny_onnx_model_dir))
    seen, reported = [], []
    out = tmp_path / "system_eval"
    result = run_system_eval("nightshift/tiny:1", eval_split, model_name="tiny", out_dir=out,
                             onnx_path=tiny_onnx_model_dir / "model.onnx", docker_client=client, batch_size=4,
                             concurrency=2, load_seconds=0.5, config=ServingConfig(),
                             on_container=seen.append, on_report=lambda r, d: reported.append((r, d)))
    assert result["n"] == 20 and result["accuracy"] == pytest.approx(0.75) and result["errors"] == 0
    assert result["skew"]["mismatches"] == 0 and result["skew"]["n"] == 20
    load = result["load"]
    assert load["ok"] > 0 and load["concurrency"] == 2 and result["throughput_rps"] == load["throughput_rps"]
    assert result["latency_ms"] == load["latency_ms"] and result["latency_ms"]["p95"] > 0
    # the request log was on, at the deployed rate: the server wrote records
    rl = result["request_log"]
    assert rl["sample_rate"] == 1.0 and rl["records"] > 0 and rl["dropped"] is not None
    assert result["serving"] == {"mem_limit": "2g", "request_log_sample": 1.0, "environment": {}}
    # load-test traffic is counted, then removed from the run folder
    assert rl["kept"] is None and not (out / "requests").exists()
    assert (out / "latency_histogram.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((out / "system_eval.json").read_text())
    assert on_disk["accuracy"] == pytest.approx(0.75) and on_disk["request_log"]["records"] == rl["records"]
    # the operator's handles: the container before it started (on_kill stops it), the report once written
    [container] = seen
    assert container._stopped and client.containers.started[0].removed
    assert reported and reported[0][1] == out


def test_run_system_eval_fails_on_skew_after_writing_the_report(tiny_onnx_model_dir, eval_split, tmp_path,
                                                                 monkeypatch):
    import nightshift.system_eval as se

    monkeypatch.setattr(se, "offline_predictions", lambda path, shards: (
        np.concatenate([labels for _, labels in shards]) * 0 + 2))  # offline says class 2 everywhere
    client = FakeDocker(start=_in_process_image(tiny_onnx_model_dir))
    reported = []
    with pytest.raises(PreprocessingSkew, match="preprocessing skew") as info:
        se.run_system_eval("nightshift/tiny:1", eval_split, model_name="tiny", out_dir=tmp_path,
                           onnx_path=tiny_onnx_model_dir / "model.onnx", docker_client=client, concurrency=0, batch_size=4,
                           on_report=lambda r, d: reported.append(r))
    assert str(tmp_path / "system_eval.json") in str(info.value)
    assert json.loads((tmp_path / "system_eval.json").read_text())["skew"]["mismatches"] > 0
    assert reported and reported[0]["skew"]["mismatches"] > 0
    assert client.containers.started[0].removed


def test_request_log_counts_from_metrics():
    from nightshift.system_eval import request_log_counts

    text = ("# HELP nightshift_request_log_records Request-log records written\n"
            "nightshift_request_log_records 1234.0\nnightshift_request_log_dropped 5.0\n"
            "nightshift_request_log_records_other 9\n")
    assert request_log_counts(text) == {"records": 1234, "dropped": 5}
    assert request_log_counts("") == {"records": None, "dropped": None}

"""Fixtures of the unit tests (``tests/unit``); the session-wide ones (digits snapshot, trained
model, S3 server) are in ``tests/conftest.py``.

- ``quality_*``: real 8x8 digit images and their profile table (data quality and drift tests);
- ``tiny_onnx_*`` and ``serving_*``: the tiny ONNX classifier (:mod:`tests.unit.tiny_onnx`), the
  OIP server running it in process, its inference image (serving, evaluation, deploy tests);
  ``http``, ``pixels``, ``x``: a client and request images for the serving tests
  (their helpers: :mod:`tests.unit.serving_support`);
- ``nightshift_home``: an isolated Nightshift home; ``worker``: a worker's empty working copy of
  the object store;
- ``ctx``: a task's context for calling an operator's ``execute``; ``candidate``: a model collected,
  trained and exported by the operators (the promote, export, drift and monitor operator tests).

Request-log records for the monitoring tests: :mod:`tests.unit.served_traffic`.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import requests

from tests.unit import tiny_onnx
from tests.unit.serving_support import ServingHandle, serve

# ----------------------------------------------------------------------------- data quality and drift
# (profile columns computed exactly as docs/architecture.md describes)


def _make_profile(images, labels, splits, class_names, sources=None):
    """Per-image profile table for uint8 NHWC ``images``, computed by the real snapshot code."""
    from nightshift.data.snapshot import build_profile, pixel_hashes

    n, h, w, c = images.shape
    return build_profile(
        images, np.asarray(labels, dtype=np.int64), np.asarray(splits), list(class_names),
        np.tile(np.array([[h, w, c]]), (n, 1)),
        list(sources) if sources is not None else [f"digits:{i}" for i in range(n)], pixel_hashes(images),
    )


@pytest.fixture(scope="session")
def quality_digits():
    """sklearn's 1,797 digits as uint8 ``(N, 8, 8, 1)`` images (0..16 scaled to 0..255), hash-based splits."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    images = np.round(ds.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = ds.target.astype(np.int64)
    # identical images always share a split (as the real snapshot code does), so clean data has no overlap
    u = np.array([int(hashlib.sha256(im.tobytes()).hexdigest()[:8], 16) / 2**32 for im in images])
    splits = np.where(u < 0.15, "test", np.where(u < 0.30, "val", "train"))
    return {
        "images": images,
        "labels": labels,
        "splits": splits,
        "class_names": [str(i) for i in range(10)],
    }


@pytest.fixture(scope="session")
def quality_make_profile():
    """``make(images, labels, splits, class_names, sources=None) -> profile DataFrame``."""
    return _make_profile


@pytest.fixture(scope="session")
def quality_base_profile(quality_digits):
    """The clean digits profile, built once per session (do not mutate; use quality_profile)."""
    d = quality_digits
    return _make_profile(d["images"], d["labels"], d["splits"], d["class_names"])


@pytest.fixture
def quality_profile(quality_base_profile):
    """The clean digits profile (a fresh copy per test; mutate freely)."""
    return quality_base_profile.copy()


@pytest.fixture
def quality_manifest(quality_digits, quality_base_profile):
    """A snapshot manifest matching :func:`quality_profile` (no undecodable files)."""
    prof = quality_base_profile
    return {
        "digest": "0" * 64,
        "format": 1,
        "source": "sklearn:digits",
        "class_names": list(quality_digits["class_names"]),
        "image_shape": [8, 8, 1],
        "counts": {
            "total": int(len(prof)),
            "per_split": {k: int(v) for k, v in prof["split"].value_counts().items()},
            "per_class": {k: int(v) for k, v in prof["label_name"].value_counts().items()},
        },
        "undecodable": [],
        "created_at": "2026-01-01T00:00:00+00:00",
    }


# ----------------------------------------------------------------------------- the tiny ONNX model


@pytest.fixture(scope="session")
def tiny_onnx_weights() -> dict:
    """Seeded weights of the tiny classifier: pixels/255 -> relu(x W1 + b1) = embedding -> embedding W2 + b2 = logits."""
    return tiny_onnx.weights()


@pytest.fixture(scope="session")
def tiny_onnx_forward(tiny_onnx_weights):
    """The tiny model's math in numpy: ``forward(uint8 NHWC) -> (logits, embedding)``."""
    w = tiny_onnx_weights

    def forward(pixels):
        x = np.asarray(pixels).astype(np.float32).reshape(len(pixels), -1) * np.float32(1 / 255)
        emb = np.maximum(x @ w["W1"] + w["b1"], 0)
        return emb @ w["W2"] + w["b2"], emb

    return forward


@pytest.fixture(scope="session")
def tiny_onnx_spec() -> dict:
    """The tiny model's contract: ``shape`` (H, W, C), ``class_names``, ``embed`` width, ``name``, ``version``."""
    return {"shape": tiny_onnx.SHAPE, "class_names": list(tiny_onnx.CLASSES), "embed": tiny_onnx.EMBED,
            "name": "tiny", "version": "1"}


@pytest.fixture
def tiny_onnx_factory(tmp_path, tiny_onnx_weights):
    """``make(subdir, **kw) -> Path``: write a fresh tiny model dir under ``tmp_path`` (to break it on purpose)."""

    def make(subdir: str = "model", **kw):
        d = tmp_path / subdir
        tiny_onnx.write(d, tiny_onnx_weights, **kw)
        return d

    return make


@pytest.fixture(scope="session")
def tiny_onnx_model_dir(tmp_path_factory, tiny_onnx_weights):
    """A model directory (``model.onnx`` + ``model.json``) for the tiny 4x4x1, 3-class model named ``tiny``."""
    d = tmp_path_factory.mktemp("tiny_onnx") / "tiny"
    tiny_onnx.write(d, tiny_onnx_weights)
    return d


# ----------------------------------------------------------------------------- serving it


@pytest.fixture
def serving_eval_set(tiny_onnx_forward):
    """20 random 4x4x1 images; labels are the model's predictions except the first 5 (shifted), so accuracy is 0.75."""
    images = np.random.default_rng(3).integers(0, 256, (20, 4, 4, 1), dtype=np.uint8)
    pred = tiny_onnx_forward(images)[0].argmax(axis=1)
    labels = pred.copy()
    labels[:5] = (labels[:5] + 1) % 3
    return images, labels.astype(np.int64)


@pytest.fixture(scope="session")
def serving_server(tiny_onnx_model_dir):
    """The OIP server on 127.0.0.1 (free port) in a thread, tiny model loaded; max batch 8, max body 1 MiB."""
    from nightshift.serving.server import Model, make_server

    model = Model(tiny_onnx_model_dir, max_batch=8, intra_op_threads=1)
    model.load()
    handle = ServingHandle(make_server(model, "127.0.0.1", 0, max_body_bytes=1 << 20), model)
    yield handle
    handle.close()


@pytest.fixture
def serving_default_server(tiny_onnx_model_dir):
    """The tiny model with the default limits (a 64 MiB body limit, as deployed), for one test."""
    srv = serve(tiny_onnx_model_dir)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def http():
    """A requests session that ignores proxy settings (every server here is on loopback)."""
    with requests.Session() as s:
        s.trust_env = False
        yield s


@pytest.fixture
def pixels() -> np.ndarray:
    """Five random 4x4x1 uint8 images (seed 7)."""
    return np.random.default_rng(7).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)


@pytest.fixture
def x() -> np.ndarray:
    """Three random 4x4x1 uint8 images (seed 11)."""
    return np.random.default_rng(11).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)


@pytest.fixture(scope="session")
def serving_docker():
    """A docker client. Without a daemon or the base image: skip, or fail when
    ``NIGHTSHIFT_REQUIRE_DOCKER=1`` (``make test`` sets it, so CI never hides a missing daemon)."""
    import docker

    from nightshift.settings import Settings

    missing = pytest.fail if os.environ.get("NIGHTSHIFT_REQUIRE_DOCKER") == "1" else pytest.skip
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as exc:  # noqa: BLE001
        missing(f"no Docker daemon reachable ({exc}); run scripts/ensure_docker.sh")
    base = Settings.from_env().base_image
    try:
        client.images.get(base)
    except docker.errors.ImageNotFound:
        missing(f"base image {base} missing; run scripts/ensure_base_image.sh")
    yield client
    client.close()


@pytest.fixture(scope="session")
def serving_image(serving_docker, tiny_onnx_model_dir):
    """The tiny model built into an inference image (once per session); removed afterwards."""
    import docker

    from nightshift.inference_image import ImageBuilder, remove_image
    from nightshift.settings import Settings

    settings = Settings.from_env()
    tag = f"nightshift-test/tiny:{uuid.uuid4().hex[:10]}"
    meta = json.loads((tiny_onnx_model_dir / "model.json").read_text())
    result = ImageBuilder(serving_docker).build(  # what BuildInferenceImageOperator runs
        onnx_path=tiny_onnx_model_dir / "model.onnx", model_meta=meta, model_name="tiny", tag=tag,
        base_image=settings.base_image, wheelhouse=settings.wheelhouse,
        labels={"ai.nightshift.test": "1"}, revision="test-rev",
    )
    yield result
    remove_image(tag, serving_docker)
    with pytest.raises(docker.errors.ImageNotFound):
        serving_docker.images.get(tag)


# ----------------------------------------------------------------------------- an isolated Nightshift home


@pytest.fixture
def nightshift_home(tmp_path, monkeypatch):
    """An isolated Nightshift home in ``tmp_path``: artifacts under ``artifacts/``, MLflow in a SQLite file."""
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path))
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return tmp_path


@pytest.fixture
def worker(s3_server, s3_root, tmp_path, monkeypatch):
    """``worker(name)``: the environment of a worker whose working copy is ``tmp/<name>`` (empty
    at first); MLflow (SQLite, one file) and the Nightshift home are shared, as a server would be."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", s3_root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("NIGHTSHIFT_ARTIFACT_CONN_ID", raising=False)

    def use(name: str):
        monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_CACHE", str(tmp_path / name))
        return tmp_path / name

    return use


# ----------------------------------------------------------------------------- operators called directly


@pytest.fixture
def ctx():
    """What an operator's ``execute`` gets as its context here: a manual run's id and the outlet
    events the collect operator records its Asset digest on. Operator tests on the local artifact
    root ask for ``nightshift_home`` as well (their module's ``pytestmark``); those on an object
    store for ``worker``."""
    return {"run_id": "manual__test", "outlet_events": defaultdict(lambda: SimpleNamespace(extra=None))}


@pytest.fixture
def candidate(nightshift_home, ctx):
    """collect -> train -> export for real, with the operators; image and system eval given."""
    from nightshift.data.snapshot import load_snapshot
    from nightshift.operators import CollectDataOperator, ExportONNXOperator, TrainGPUOperator

    snap = CollectDataOperator(task_id="collect").execute(ctx)
    train = TrainGPUOperator(task_id="train", snapshot=snap, model_name="op-promote",
                             hparams={"epochs": 3, "width": 8}).execute(ctx)
    export = ExportONNXOperator(task_id="export", training=train, snapshot=snap, model_name="op-promote").execute(ctx)
    # what system_eval reports: the served accuracy on n test images (all of them were served)
    served = {"accuracy": train["metrics"]["test_accuracy"], "errors": 0, "latency_ms": {"p95": 2.0, "p99": 3.0},
              "throughput_rps": 500.0, "n": load_snapshot(snap["snapshot_uri"]).count("test")}
    return {"snapshot": snap, "validation": {"success": True}, "training": train, "export": export,
            "image": {"image": "nightshift/op-promote:x"}, "system_eval": served}

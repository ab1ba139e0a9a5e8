

# --- quality_/drift_ fixtures: real 8x8 digit images and their profile table -------------
# (profile columns computed exactly as docs/architecture.md describes)

import hashlib as _quality_hashlib

import numpy as _quality_np
import pytest as _quality_pytest


def _quality_make_profile(images, labels, splits, class_names, sources=None):
    """Per-image profile table for uint8 NHWC ``images``, computed by the real snapshot code."""
    from nightshift.data.snapshot import build_profile, pixel_hashes

    n, h, w, c = images.shape
    return build_profile(
        images, _quality_np.asarray(labels, dtype=_quality_np.int64), _quality_np.asarray(splits), list(class_names),
        _quality_np.tile(_quality_np.array([[h, w, c]]), (n, 1)),
        list(sources) if sources is not None else [f"digits:{i}" for i in range(n)], pixel_hashes(images),
    )


@_quality_pytest.fixture(scope="session")
def quality_digits():
    """sklearn's 1,797 digits as uint8 ``(N, 8, 8, 1)`` images (0..16 scaled to 0..255), hash-based splits."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    images = _quality_np.round(ds.images * (255.0 / 16.0)).astype(_quality_np.uint8)[..., None]
    labels = ds.target.astype(_quality_np.int64)
    # identical images always share a split (as the real snapshot code does), so clean data has no overlap
    u = _quality_np.array(
        [int(_quality_hashlib.sha256(im.tobytes()).hexdigest()[:8], 16) / 2**32 for im in images]
    )
    splits = _quality_np.where(u < 0.15, "test", _quality_np.where(u < 0.30, "val", "train"))
    return {
        "images": images,
        "labels": labels,
        "splits": splits,
        "class_names": [str(i) for i in range(10)],
    }


@_quality_pytest.fixture(scope="session")
def quality_make_profile():
    """``make(images, labels, splits, class_names, sources=None) -> profile DataFrame``."""
    return _quality_make_profile


@_quality_pytest.fixture(scope="session")
def quality_base_profile(quality_digits):
    """The clean digits profile, built once per session (do not mutate; use quality_profile)."""
    d = quality_digits
    return _quality_make_profile(d["images"], d["labels"], d["splits"], d["class_names"])


@_quality_pytest.fixture
def quality_profile(quality_base_profile):
    """The clean digits profile (a fresh copy per test; mutate freely)."""
    return quality_base_profile.copy()


@_quality_pytest.fixture
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


# --- serving_/tiny_onnx fixtures: a tiny real ONNX classifier, an in-process OIP server, a built image ---
# (owned by the serving/inference_image/evaluation tests; names are prefixed serving_ / tiny_onnx)

import json as _serving_json
import threading as _serving_threading

import numpy as _serving_np
import pytest as _serving_pytest

TINY_ONNX_SHAPE = (4, 4, 1)  # H, W, C
TINY_ONNX_CLASSES = ["zero", "one", "two"]
TINY_ONNX_EMBED = 8


@_serving_pytest.fixture(scope="session")
def tiny_onnx_weights() -> dict:
    """Seeded weights of the tiny classifier: pixels/255 -> relu(x W1 + b1) = embedding -> embedding W2 + b2 = logits."""
    rng = _serving_np.random.default_rng(1234)
    d = int(_serving_np.prod(TINY_ONNX_SHAPE))
    return {
        "W1": rng.normal(0, 1, (d, TINY_ONNX_EMBED)).astype(_serving_np.float32),
        "b1": rng.normal(0, 0.1, (TINY_ONNX_EMBED,)).astype(_serving_np.float32),
        "W2": rng.normal(0, 1, (TINY_ONNX_EMBED, len(TINY_ONNX_CLASSES))).astype(_serving_np.float32),
        "b2": rng.normal(0, 0.1, (len(TINY_ONNX_CLASSES),)).astype(_serving_np.float32),
    }


@_serving_pytest.fixture(scope="session")
def tiny_onnx_forward(tiny_onnx_weights):
    """The tiny model's math in numpy: ``forward(uint8 NHWC) -> (logits, embedding)``."""
    w = tiny_onnx_weights

    def forward(pixels):
        x = _serving_np.asarray(pixels).astype(_serving_np.float32).reshape(len(pixels), -1) * _serving_np.float32(1 / 255)
        emb = _serving_np.maximum(x @ w["W1"] + w["b1"], 0)
        return emb @ w["W2"] + w["b2"], emb

    return forward


def tiny_onnx_write(model_dir, weights, *, name: str = "tiny", version: str = "1", probabilities: bool = False) -> None:
    """Write ``model.onnx`` + ``model.json`` (docs/architecture.md format) for the tiny model into ``model_dir``.

    Default: the outputs of models exported before ``probabilities`` existed (``logits``,
    ``embedding``); ``probabilities=True``: today's export (``logits``, ``probabilities``
    = softmax in the graph, ``embedding``)."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h, w, c = TINY_ONNX_SHAPE
    inits = [
        numpy_helper.from_array(_serving_np.array([-1, h * w * c], dtype=_serving_np.int64), "flat_shape"),
        numpy_helper.from_array(_serving_np.array(1 / 255, dtype=_serving_np.float32), "scale"),
        *(numpy_helper.from_array(v, k) for k, v in weights.items()),
    ]
    nodes = [
        helper.make_node("Cast", ["pixels"], ["x_f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["x_f", "flat_shape"], ["x_flat"]),
        helper.make_node("Mul", ["x_flat", "scale"], ["x_scaled"]),
        helper.make_node("MatMul", ["x_scaled", "W1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["h1b"]),
        helper.make_node("Relu", ["h1b"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "W2"], ["l1"]),
        helper.make_node("Add", ["l1", "b2"], ["logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(TINY_ONNX_CLASSES)])]
    if probabilities:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
        outputs.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                                     ["batch", len(TINY_ONNX_CLASSES)]))
    outputs.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", TINY_ONNX_EMBED]))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", h, w, c])],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="nightshift-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    model_dir.mkdir(parents=True, exist_ok=True)
    raw = model.SerializeToString()
    (model_dir / "model.onnx").write_bytes(raw)
    meta = {
        "name": name, "version": version, "class_names": TINY_ONNX_CLASSES, "input_name": "pixels",
        "input_shape": list(TINY_ONNX_SHAPE), "input_datatype": "UINT8", "outputs": [o.name for o in outputs],
        "onnx_sha256": hashlib.sha256(raw).hexdigest(),
    }
    (model_dir / "model.json").write_text(_serving_json.dumps(meta, indent=2))


@_serving_pytest.fixture(scope="session")
def tiny_onnx_spec() -> dict:
    """The tiny model's contract: ``shape`` (H, W, C), ``class_names``, ``embed`` width, ``name``, ``version``."""
    return {"shape": TINY_ONNX_SHAPE, "class_names": list(TINY_ONNX_CLASSES), "embed": TINY_ONNX_EMBED,
            "name": "tiny", "version": "1"}


@_serving_pytest.fixture
def tiny_onnx_factory(tmp_path, tiny_onnx_weights):
    """``make(subdir, **kw) -> Path``: write a fresh tiny model dir under ``tmp_path`` (to break it on purpose)."""

    def make(subdir: str = "model", **kw):
        d = tmp_path / subdir
        tiny_onnx_write(d, tiny_onnx_weights, **kw)
        return d

    return make


@_serving_pytest.fixture(scope="session")
def tiny_onnx_model_dir(tmp_path_factory, tiny_onnx_weights):
    """A model directory (``model.onnx`` + ``model.json``) for the tiny 4x4x1, 3-class model named ``tiny``."""
    d = tmp_path_factory.mktemp("tiny_onnx") / "tiny"
    tiny_onnx_write(d, tiny_onnx_weights)
    return d


class _ServingHandle:
    """A running in-process server (uvicorn in a thread): ``url``, ``model``, ``server``, ``app``."""

    def __init__(self, server, model):
        self.server, self.model, self.app = server, model, server.app
        self.url = server.url
        server.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@_serving_pytest.fixture(scope="session")
def serving_server(tiny_onnx_model_dir):
    """The OIP server on 127.0.0.1 (free port) in a thread, tiny model loaded; max batch 8, max body 1 MiB."""
    from nightshift.serving.server import Model, make_server

    model = Model(tiny_onnx_model_dir, max_batch=8, intra_op_threads=1)
    model.load()
    handle = _ServingHandle(make_server(model, "127.0.0.1", 0, max_body_bytes=1 << 20), model)
    yield handle
    handle.close()


@_serving_pytest.fixture(scope="session")
def serving_docker():
    """A docker client. Without a daemon or the base image: skip, or fail when
    ``NIGHTSHIFT_REQUIRE_DOCKER=1`` (``make test`` sets it, so CI never hides a missing daemon)."""
    import os

    import docker

    from nightshift.settings import Settings

    missing = _serving_pytest.fail if os.environ.get("NIGHTSHIFT_REQUIRE_DOCKER") == "1" else _serving_pytest.skip
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


@_serving_pytest.fixture(scope="session")
def serving_image(serving_docker, tiny_onnx_model_dir):
    """The tiny model built into an inference image (once per session); removed afterwards."""
    import uuid

    from nightshift.inference_image import ImageBuilder, remove_image
    from nightshift.settings import Settings

    settings = Settings.from_env()
    tag = f"nightshift-test/tiny:{uuid.uuid4().hex[:10]}"
    meta = _serving_json.loads((tiny_onnx_model_dir / "model.json").read_text())
    result = ImageBuilder(serving_docker).build(  # what BuildInferenceImageOperator runs
        onnx_path=tiny_onnx_model_dir / "model.onnx", model_meta=meta, model_name="tiny", tag=tag,
        base_image=settings.base_image, wheelhouse=settings.wheelhouse,
        labels={"ai.nightshift.test": "1"}, revision="test-rev",
    )
    yield result
    remove_image(tag, serving_docker)
    import docker

    with _serving_pytest.raises(docker.errors.ImageNotFound):
        serving_docker.images.get(tag)


# --- served traffic: request-log records as the serving image writes them -----------------

from datetime import timedelta as _timedelta  # noqa: E402


def served_records(images, onnx_path, classes, start, version="v"):
    """What the serving image writes for these images (docs/serving.md, request log)."""
    import onnxruntime as ort

    from nightshift.data.decode import image_stats

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    logits, emb = sess.run(["logits", "embedding"], {"pixels": images})
    p = _quality_np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    st = image_stats(images)
    return [{"schema": "nightshift.request_log/1",
             "timestamp": (start + _timedelta(seconds=i)).isoformat().replace("+00:00", "Z"),
             "model_name": "digits", "model_version": version, "brightness": float(st["brightness"][i]),
             "contrast": float(st["contrast"][i]), "mean_ch0": float(st["mean_ch0"][i]),
             "predicted_class": classes[int(p[i].argmax())], "confidence": float(p[i].max()),
             "embedding": emb[i].tolist()} for i in range(len(images))]




# --- an isolated Nightshift home for operator tests -----------------------------------------

import pytest as _home_pytest


@_home_pytest.fixture
def nightshift_home(tmp_path, monkeypatch):
    """An isolated Nightshift home in ``tmp_path``: artifacts under ``artifacts/``, MLflow in a SQLite file."""
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path))
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return tmp_path

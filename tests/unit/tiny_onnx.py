"""The tiny ONNX classifier of the serving tests: 4x4x1 uint8 images, 3 classes, an 8-wide embedding.

A real ONNX graph (``pixels`` -> ``logits``, ``embedding``; optionally ``probabilities``)
written with the ``model.json`` of docs/architecture.md; the fixtures in ``conftest.py``
(``tiny_onnx_*``) build it once per session.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

SHAPE = (4, 4, 1)  # H, W, C
CLASSES = ["zero", "one", "two"]
EMBED = 8


def weights(seed: int = 1234) -> dict[str, np.ndarray]:
    """Seeded weights: pixels/255 -> relu(x W1 + b1) = embedding -> embedding W2 + b2 = logits."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(SHAPE))
    return {
        "W1": rng.normal(0, 1, (d, EMBED)).astype(np.float32),
        "b1": rng.normal(0, 0.1, (EMBED,)).astype(np.float32),
        "W2": rng.normal(0, 1, (EMBED, len(CLASSES))).astype(np.float32),
        "b2": rng.normal(0, 0.1, (len(CLASSES),)).astype(np.float32),
    }


def write(model_dir: Path, weights: dict[str, np.ndarray], *, name: str = "tiny", version: str = "1",
          probabilities: bool = False) -> None:
    """Write ``model.onnx`` + ``model.json`` (docs/architecture.md format) for the tiny model into ``model_dir``.

    Default: the outputs of models exported before ``probabilities`` existed (``logits``,
    ``embedding``); ``probabilities=True``: today's export (``logits``, ``probabilities``
    = softmax in the graph, ``embedding``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h, w, c = SHAPE
    inits = [
        numpy_helper.from_array(np.array([-1, h * w * c], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale"),
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
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(CLASSES)])]
    if probabilities:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
        outputs.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(CLASSES)]))
    outputs.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBED]))
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
        "name": name, "version": version, "class_names": CLASSES, "input_name": "pixels",
        "input_shape": list(SHAPE), "input_datatype": "UINT8", "outputs": [o.name for o in outputs],
        "onnx_sha256": hashlib.sha256(raw).hexdigest(),
    }
    (model_dir / "model.json").write_text(json.dumps(meta, indent=2))

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from nightshift import export
from nightshift.errors import ParityError
from nightshift.training import load_checkpoint


@pytest.fixture(scope="module")
def exported(trained, digits_snapshot, tmp_path_factory):
    ckpt = load_checkpoint(trained.checkpoint_path)
    x, _ = digits_snapshot.split("test")
    out = tmp_path_factory.mktemp("model")
    return export.export_and_verify(ckpt, out, x, model_name="digits"), ckpt, x


def test_graph_takes_raw_uint8_with_dynamic_batch(exported):
    result, _, _ = exported
    model = onnx.load(result["onnx_path"])
    inp = model.graph.input[0]
    assert inp.name == "pixels"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and [d.dim_value for d in dims[1:]] == [8, 8, 1]
    assert [o.name for o in model.graph.output] == ["logits", "embedding"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]


def test_parity_report_and_model_json(exported, trained):
    result, _, x = exported
    p = result["parity"]
    assert p["passed"] and p["n"] == len(x) and p["max_abs_diff_logits"] < 1e-3 and p["top1_agreement"] == 1.0
    meta = json.loads(Path(result["model_dir"], "model.json").read_text())
    assert meta["input_shape"] == [8, 8, 1] and meta["input_datatype"] == "UINT8"
    assert meta["onnx_sha256"] == result["onnx_sha256"]


def test_onnx_serves_any_batch_size_and_matches_offline_accuracy(exported, trained, digits_snapshot):
    result, _, _ = exported
    sess = ort.InferenceSession(result["onnx_path"], providers=["CPUExecutionProvider"])
    x, y = digits_snapshot.split("test")
    for n in (1, 7, len(x)):
        logits, emb = sess.run(None, {"pixels": x[:n]})
        assert logits.shape == (n, 10) and emb.shape[0] == n
    logits, _ = sess.run(None, {"pixels": x})
    assert (logits.argmax(1) == y).mean() == pytest.approx(trained.metrics["test_accuracy"])


def test_parity_breach_raises_with_report(exported, tmp_path):
    result, ckpt, x = exported
    bad = dict(ckpt)
    bad["state_dict"] = {k: (v + 0.5 if v.dtype == torch.float32 and k.endswith("head.weight") else v)
                         for k, v in ckpt["state_dict"].items()}
    with pytest.raises(ParityError, match="parity breached") as info:
        export.check_parity(bad, result["onnx_path"], x)
    assert info.value.report["passed"] is False and info.value.report["max_abs_diff_logits"] > 1e-3

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from nightshift import export
from nightshift.errors import ConfigError, ParityError
from nightshift.models import classifier_from_checkpoint
from nightshift.training import load_checkpoint

RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def exported(trained, digits_snapshot, tmp_path_factory):
    ckpt = load_checkpoint(trained.checkpoint_path)
    x, _ = digits_snapshot.split("test")
    out = tmp_path_factory.mktemp("model")
    return export.export_and_verify(ckpt, out, x, model_name="digits", training_run_id=RUN_ID), ckpt, x


def test_graph_takes_raw_uint8_with_dynamic_batch(exported):
    result, _, _ = exported
    model = onnx.load(result["onnx_path"])
    inp = model.graph.input[0]
    assert inp.name == "pixels"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and [d.dim_value for d in dims[1:]] == [8, 8, 1]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities", "embedding"]
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
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
        logits, probs, emb = sess.run(None, {"pixels": x[:n]})
        assert logits.shape == (n, 10) and probs.shape == (n, 10) and emb.shape[0] == n
    logits, _, _ = sess.run(None, {"pixels": x})
    assert (logits.argmax(1) == y).mean() == pytest.approx(trained.metrics["test_accuracy"])


def test_parity_breach_raises_with_report(exported, tmp_path):
    result, ckpt, x = exported
    bad = dict(ckpt)
    bad["state_dict"] = {k: (v + 0.5 if v.dtype == torch.float32 and k.endswith("head.weight") else v)
                         for k, v in ckpt["state_dict"].items()}
    with pytest.raises(ParityError, match="parity breached") as info:
        export.check_parity(bad, result["onnx_path"], x)
    assert info.value.report["passed"] is False and info.value.report["max_abs_diff_logits"] > 1e-3


def test_nan_outputs_breach_parity():
    """``max(0.0, nan)`` is 0.0 in Python: a NaN difference must count as infinite, not vanish."""
    a = np.zeros((2, 3), np.float32)
    b = a.copy()
    b[1, 2] = np.nan
    assert export._max_abs_diff(a, b) == float("inf")
    assert export._max_abs_diff(a, a + 1e-4) == pytest.approx(1e-4, rel=1e-3)


def test_probabilities_output_is_softmax_of_logits(exported):
    result, _, x = exported
    sess = ort.InferenceSession(result["onnx_path"], providers=["CPUExecutionProvider"])
    logits, probs = sess.run(["logits", "probabilities"], {"pixels": x})
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    ref = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, ref / ref.sum(axis=1, keepdims=True), atol=1e-6)
    assert (probs.argmax(1) == logits.argmax(1)).all()


def test_dynamic_batch_verified_at_1_and_64_and_recorded(exported):
    result, _, x = exported
    checks = json.loads(Path(result["model_dir"], "parity.json").read_text())["batch_checks"]
    assert checks == result["parity"]["batch_checks"] and set(checks) == {"1", "64"}
    for size, c in checks.items():
        n = int(size)
        assert c["passed"] and c["shapes_ok"] and c["n"] == n and not c["tiled"]
        assert c["shapes"]["logits"] == [n, 10] and c["shapes"]["probabilities"] == [n, 10]
        assert c["shapes"]["embedding"][0] == n
        assert c["max_abs_diff_logits"] < 1e-3 and c["top1_agreement"] == 1.0
        assert c["max_abs_probability_sum_error"] < 1e-5


def test_batch_64_check_tiles_a_small_held_out_set(exported):
    result, ckpt, x = exported
    report = export.check_parity(ckpt, result["onnx_path"], x[:10])
    assert report["n"] == 10 and report["batch_checks"]["64"]["tiled"] is True
    assert report["batch_checks"]["64"]["shapes"]["logits"] == [64, 10] and report["batch_checks"]["64"]["passed"]


def test_metadata_props_carry_the_model_contract(exported, digits_snapshot):
    result, ckpt, _ = exported
    meta = {p.key: p.value for p in onnx.load(result["onnx_path"]).metadata_props}
    assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]
    assert json.loads(meta["input_shape"]) == [8, 8, 1]
    assert (meta["input_layout"], meta["input_dtype"], meta["input_range"]) == ("NHWC", "uint8", "0-255")
    assert json.loads(meta["outputs"]) == ["logits", "probabilities", "embedding"]
    assert meta["data_digest"] == ckpt["data_digest"] == digits_snapshot.digest
    assert meta["training_run_id"] == RUN_ID
    assert meta["git_sha"] and meta["git_sha"] != "unknown"
    assert meta["opset"] == "20" and meta["arch"] == "small_cnn" and meta["variant"] == "fp32"
    assert meta["producer"] == "nightshift" and meta["producer_version"]
    model_json = json.loads(Path(result["model_dir"], "model.json").read_text())
    assert model_json["outputs"] == ["logits", "probabilities", "embedding"]
    assert (model_json["opset"], model_json["training_run_id"], model_json["variant"]) == (20, RUN_ID, "fp32")
    assert model_json["git_sha"] == meta["git_sha"] and model_json["input_layout"] == "NHWC"


def test_metadata_git_sha_comes_from_lineage(exported, monkeypatch):
    """Without an explicit ``git_sha`` the commit is lineage's (its fallbacks are tested in test_training_resume)."""
    _, ckpt, _ = exported
    monkeypatch.setattr(export.lineage, "git_sha", lambda: "feedbeef")
    assert export.model_metadata(ckpt, opset=20)["git_sha"] == "feedbeef"
    assert export.model_metadata(ckpt, opset=20, git_sha="cafe")["git_sha"] == "cafe"


def test_opset_is_honoured(exported, tmp_path):
    _, ckpt, _ = exported
    path = export.export_onnx(ckpt, tmp_path / "m21.onnx", opset=21)
    model = onnx.load(path)
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    assert {p.key: p.value for p in model.metadata_props}["opset"] == "21"
    x = np.zeros((3, 8, 8, 1), np.uint8)
    logits, probs, _ = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})
    assert logits.shape == (3, 10) and probs.shape == (3, 10)


def test_default_opset_exports_gelu_as_one_node(exported, tmp_path):
    """At the default opset nn.GELU is ONNX's Gelu (one fused kernel in ONNX Runtime);
    at 18 it is Div/Erf/Add/Mul/Mul, ~10% slower for small_cnn (bench/onnx_opset.py)."""
    result, ckpt, x = exported
    ops = [n.op_type for n in onnx.load(result["onnx_path"]).graph.node]
    n_gelu = sum(isinstance(m, torch.nn.GELU) for m in classifier_from_checkpoint(ckpt).modules())
    assert n_gelu > 0 and ops.count("Gelu") == n_gelu and "Erf" not in ops
    old = [n.op_type for n in onnx.load(export.export_onnx(ckpt, tmp_path / "m18.onnx", opset=18)).graph.node]
    assert "Gelu" not in old and old.count("Erf") == n_gelu


@pytest.mark.parametrize("opset", [17, 26, 0, "eighteen", None, True, 18.5])
def test_unsupported_opset_is_a_config_error(exported, tmp_path, opset):
    _, ckpt, x = exported
    with pytest.raises(ConfigError, match="opset"):
        export.export_and_verify(ckpt, tmp_path, x, model_name="digits", opset=opset)
    assert not (tmp_path / "model.onnx").exists()


def test_opset_accepts_templated_strings():
    assert export.validate_opset("18") == 18 and export.validate_opset(" 25 ") == 25


# --------------------------------------------------------------------------- int8 quantization


@pytest.fixture(scope="module")
def quantized(trained, digits_snapshot, tmp_path_factory):
    """Exported with quantize=True and a tolerance the digits model meets."""
    ckpt = load_checkpoint(trained.checkpoint_path)
    out = tmp_path_factory.mktemp("model_int8")
    result = export.export_and_verify(
        ckpt, out, digits_snapshot.iter_split("test"), model_name="digits", training_run_id=RUN_ID, quantize=True,
        calibration=digits_snapshot.iter_split("train"), evaluation=digits_snapshot.iter_split("test"),
        int8_max_accuracy_drop=0.5, latency_runs=50)
    return result, ckpt


def test_quantization_report_has_sizes_latencies_and_decision(quantized):
    result, _ = quantized
    q = result["quantization"]
    assert q == json.loads(Path(result["model_dir"], "quantization.json").read_text())
    for variant in ("fp32", "int8"):
        assert q[variant]["size_bytes"] > 0 and q[variant]["latency_ms_batch1_median"] > 0
    assert q["int8"]["size_bytes"] < q["fp32"]["size_bytes"]
    assert q["latency"]["intra_op_threads"] == 1 and q["latency"]["batch_size"] == 1
    assert q["n"] == 221 and 0 <= q["int8_accuracy"] <= 1
    assert q["accuracy_drop"] == pytest.approx(q["fp32_accuracy"] - q["int8_accuracy"])
    assert q["decision"] == "kept" and q["kept"] is True and "within the tolerance 0.5" in q["reason"]
    assert q["settings"]["format"] == "QDQ" and q["settings"]["per_channel"] is True
    # the uint8 input's Transpose/Cast and the normalisation stay float, and so does the softmax
    excluded = q["settings"]["excluded_nodes"]
    assert any("softmax" in n for n in excluded) and len(excluded) >= 3
    assert all(c["shapes_ok"] for c in q["batch_checks"].values()) and set(q["batch_checks"]) == {"1", "64"}


def test_kept_int8_model_is_served_and_fp32_kept_beside_it(quantized, digits_snapshot):
    from nightshift.serving.model import Model

    result, _ = quantized
    d = Path(result["model_dir"])
    assert result["variant"] == "int8" and not (d / "model.int8.onnx").exists()
    served, fp32 = onnx.load(d / "model.onnx"), onnx.load(d / "model.fp32.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in served.graph.node)
    assert not any(n.op_type == "QuantizeLinear" for n in fp32.graph.node)
    props = {p.key: p.value for p in served.metadata_props}
    assert props["variant"] == "int8" and props["training_run_id"] == RUN_ID
    assert props["fp32_sha256"] == export.sha256_file(d / "model.fp32.onnx")
    meta = json.loads((d / "model.json").read_text())
    assert meta["variant"] == "int8" and meta["onnx_sha256"] == export.sha256_file(d / "model.onnx")
    assert meta["version"] == meta["onnx_sha256"][:12] and meta["fp32_sha256"] == props["fp32_sha256"]
    # the serving layer loads it like any model, all three outputs by name
    model = Model(d)
    model.load()
    assert model.output_names == ["logits", "probabilities", "embedding"]
    x, y = digits_snapshot.split("test")
    out = model.predict(x)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert (out["logits"].argmax(1) == y).mean() == pytest.approx(result["quantization"]["int8_accuracy"])


def test_int8_outside_tolerance_is_discarded_with_reason(trained, digits_snapshot, tmp_path):
    ckpt = load_checkpoint(trained.checkpoint_path)
    result = export.export_and_verify(
        ckpt, tmp_path, digits_snapshot.iter_split("test"), model_name="digits", quantize=True,
        calibration=digits_snapshot.iter_split("train"), evaluation=digits_snapshot.iter_split("test"),
        int8_max_accuracy_drop=-1.0, latency_runs=10)
    q = result["quantization"]
    assert q["kept"] is False and q["decision"] == "discarded" and q["served"] == "fp32"
    assert q["reason"].startswith("discarded:") and "exceeds the tolerance -1" in q["reason"]
    assert q["int8"]["size_bytes"] > 0 and q["fp32"]["latency_ms_batch1_median"] > 0
    assert result["variant"] == "fp32" and json.loads((tmp_path / "model.json").read_text())["variant"] == "fp32"
    assert not (tmp_path / "model.int8.onnx").exists() and not (tmp_path / "model.fp32.onnx").exists()
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(tmp_path / "model.onnx").graph.node)
    assert json.loads((tmp_path / "quantization.json").read_text())["decision"] == "discarded"


def test_quantize_without_calibration_data_is_a_config_error(exported, tmp_path):
    _, ckpt, x = exported
    with pytest.raises(ConfigError, match="calibration"):
        export.export_and_verify(ckpt, tmp_path, x, model_name="digits", quantize=True)

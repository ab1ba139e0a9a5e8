from __future__ import annotations

from typing import Any, Sequence

from nightshift.errors import ConfigError
from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import ParityReportLink, QuantizationReportLink


class ExportONNXOperator(NightshiftOperator):
    """Export the trained checkpoint to ONNX (uint8 NHWC pixels in; logits, probabilities
    and embedding out), verify it against PyTorch on the held-out test split and at
    batch sizes 1 and 64, and fail on any parity breach. Optionally quantize to int8.

    Writes ``model.onnx``, ``model.json``, ``parity.json`` (and ``quantization.json``)
    to the run's ``model/`` folder and logs them, with the parity and quantization
    figures as metrics, to the training's MLflow run.

    :param training: the ``train_gpu`` result (XCom); its ``run_id`` goes into the model's metadata. (templated)
    :param snapshot: the ``collect_data`` result (XCom). (templated)
    :param model_name: name written into ``model.json``. (templated)
    :param opset: ONNX opset version, 18..25; default 20, the first with a fused ``Gelu``
        (``nightshift.export.DEFAULT_OPSET``). (templated)
    :param atol: max allowed |logits difference| between ONNX Runtime and PyTorch. (templated)
    :param min_top1_agreement: min share of images with the same top-1 class. (templated)
    :param quantize: also make a static int8 model (calibrated on the train split);
        it is served instead of the fp32 one only when its test accuracy drop is
        within ``int8_max_accuracy_drop``. (templated)
    :param int8_max_accuracy_drop: largest allowed fp32 − int8 top-1 accuracy on the
        test split, 0..1. (templated)
    """

    template_fields: Sequence[str] = ("training", "snapshot", "model_name", "opset", "atol", "min_top1_agreement",
                                      "quantize", "int8_max_accuracy_drop")
    #: what of the run folder it reads (fetched first on an object store): its own (the checkpoint: training XCom)
    run_folder_reads: Sequence[str] = ("model",)
    operator_extra_links = (ParityReportLink(), QuantizationReportLink())

    def __init__(self, *, training: Any, snapshot: Any, model_name: str = "nightshift-classifier",
                 opset: int | str = 20, atol: float | str = 1e-3, min_top1_agreement: float | str = 0.995,
                 quantize: bool | str = False, int8_max_accuracy_drop: float | str = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.training = training
        self.snapshot = snapshot
        self.model_name = model_name
        self.opset = opset
        self.atol = atol
        self.min_top1_agreement = min_top1_agreement
        self.quantize = quantize
        self.int8_max_accuracy_drop = int8_max_accuracy_drop

    @staticmethod
    def _number(value: Any, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name} must be a number, got {value!r}") from exc
        if not (lo < x if lo_open else lo <= x) or not x <= hi or x != x:
            raise ConfigError(f"{name} = {value!r} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return x

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift import registry
        from nightshift.data.snapshot import fetch_snapshot, load_snapshot
        from nightshift.errors import ParityError
        from nightshift.export import export_and_verify, validate_opset
        from nightshift.settings import to_bool
        from nightshift.training import load_checkpoint

        opset = validate_opset(self.opset)
        atol = self._number(self.atol, "atol", 0.0, float("inf"), lo_open=True)
        min_top1 = self._number(self.min_top1_agreement, "min_top1_agreement", 0.0, 1.0)
        quantize = to_bool(self.quantize)
        max_drop = self._number(self.int8_max_accuracy_drop, "int8_max_accuracy_drop", 0.0, 1.0)
        train = self.require(self.training, "training", "train_gpu")
        snapshot_uri = self.require(self.snapshot, "snapshot", "collect_data")["snapshot_uri"]
        snap = load_snapshot(fetch_snapshot(self.store, snapshot_uri))
        ckpt = load_checkpoint(train["checkpoint"])
        out_dir = self.run_dir(context, "model")
        c = self.mlflow
        try:
            result = export_and_verify(
                ckpt, out_dir, snap.iter_split("test"), model_name=self.model_name, opset=opset, atol=atol,
                min_top1_agreement=min_top1, training_run_id=train.get("run_id"), quantize=quantize,
                calibration=snap.iter_split("train") if quantize else None,
                evaluation=snap.iter_split("test") if quantize else None, int8_max_accuracy_drop=max_drop)
        except ParityError as exc:  # the evidence goes to the run too, then the task fails
            registry.log_metrics(c, train["run_id"], parity_metrics(exc.report))
            registry.log_artifacts(c, train["run_id"], out_dir, "onnx")
            raise
        p = result["parity"]
        self.log.info("ONNX %s opset %d (%d bytes, %s): max|Δ| %.3g, top-1 agreement %.4f on %d images; "
                      "batch 1/64 checks passed", result["onnx_sha256"][:12], opset, result["size_bytes"],
                      result["variant"], p["max_abs_diff_logits"], p["top1_agreement"], p["n"])
        q = result["quantization"]
        if q:
            self.log.info("int8 %s: %s; size %d -> %d bytes, batch-1 latency %.3f -> %.3f ms", q["decision"],
                          q["reason"], q["fp32"]["size_bytes"], q["int8"]["size_bytes"],
                          q["fp32"]["latency_ms_batch1_median"], q["int8"]["latency_ms_batch1_median"])
        metrics = {**parity_metrics(p), "onnx_opset": opset, "onnx_size_bytes": result["size_bytes"],
                   **(quantization_metrics(q) if q else {})}
        registry.log_metrics(c, train["run_id"], metrics)
        registry.log_artifacts(c, train["run_id"], result["model_dir"], "onnx")
        return {k: result[k] for k in ("onnx_path", "model_dir", "onnx_sha256", "size_bytes", "parity", "model_meta",
                                       "variant", "quantization")}


def parity_metrics(report: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of a parity report (``parity_*``)."""
    out = {"parity_max_abs_diff": report.get("max_abs_diff_logits"),
           "parity_max_abs_diff_probabilities": report.get("max_abs_diff_probabilities"),
           "parity_max_abs_diff_embedding": report.get("max_abs_diff_embedding"),
           "parity_top1_agreement": report.get("top1_agreement"),
           "parity_passed": float(bool(report.get("passed")))}
    for size, check in (report.get("batch_checks") or {}).items():
        out[f"parity_batch{size}_max_abs_diff"] = check.get("max_abs_diff_logits")
        out[f"parity_batch{size}_passed"] = float(bool(check.get("passed")))
    return {k: float(v) for k, v in out.items() if v is not None}


def quantization_metrics(q: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of a quantization report (``int8_*``, ``fp32_*``)."""
    return {"fp32_onnx_accuracy": q["fp32_accuracy"], "int8_onnx_accuracy": q["int8_accuracy"],
            "int8_accuracy_drop": q["accuracy_drop"], "int8_kept": float(q["kept"]),
            "fp32_size_bytes": q["fp32"]["size_bytes"], "int8_size_bytes": q["int8"]["size_bytes"],
            "fp32_latency_ms_batch1": q["fp32"]["latency_ms_batch1_median"],
            "int8_latency_ms_batch1": q["int8"]["latency_ms_batch1_median"]}

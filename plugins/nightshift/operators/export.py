from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import ParityReportLink


class ExportONNXOperator(NightshiftOperator):
    """Export the trained checkpoint to ONNX (uint8 pixels in, logits + embedding out)
    and fail on any parity breach against PyTorch on the held-out test split.

    :param training: the ``train_gpu`` result (XCom). (templated)
    :param snapshot: the ``collect_data`` result (XCom). (templated)
    :param model_name: name written into ``model.json``. (templated)
    :param atol: max allowed |logits difference|. (templated)
    :param min_top1_agreement: min share of images with the same top-1 class. (templated)
    """

    template_fields: Sequence[str] = ("training", "snapshot", "model_name", "atol", "min_top1_agreement")
    operator_extra_links = (ParityReportLink(),)

    def __init__(self, *, training: Any, snapshot: Any, model_name: str = "nightshift-classifier",
                 atol: float = 1e-3, min_top1_agreement: float = 0.995, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.training = training
        self.snapshot = snapshot
        self.model_name = model_name
        self.atol = atol
        self.min_top1_agreement = min_top1_agreement

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift import registry
        from nightshift.data.snapshot import load_snapshot
        from nightshift.export import export_and_verify
        from nightshift.training import load_checkpoint

        train = self.require(self.training, "training", "train_gpu")
        snap = load_snapshot(self.require(self.snapshot, "snapshot", "collect_data")["snapshot_uri"])
        ckpt = load_checkpoint(train["checkpoint"])
        result = export_and_verify(ckpt, self.run_dir(context, "model"), snap.iter_split("test"),
                                   model_name=self.model_name,
                                   atol=float(self.atol), min_top1_agreement=float(self.min_top1_agreement))
        p = result["parity"]
        self.log.info("ONNX %s (%d bytes): max|Δ| %.3g, top-1 agreement %.4f on %d images",
                      result["onnx_sha256"][:12], result["size_bytes"], p["max_abs_diff_logits"],
                      p["top1_agreement"], p["n"])
        c = self.mlflow
        registry.log_metrics(c, train["run_id"], {"parity_max_abs_diff": p["max_abs_diff_logits"],
                                                  "parity_top1_agreement": p["top1_agreement"]})
        registry.log_artifacts(c, train["run_id"], result["model_dir"], "onnx")
        return {k: result[k] for k in ("onnx_path", "model_dir", "onnx_sha256", "size_bytes", "parity", "model_meta")}

"""Export a trained checkpoint to ONNX and prove it matches PyTorch.

The graph's input is ``pixels: uint8 [batch, H, W, C]`` (normalisation inside the
graph), the batch axis is dynamic, and the outputs are ``logits`` and
``embedding``. ``onnx.checker`` runs on the result, and ONNX Runtime must agree with
PyTorch on held-out images, or :class:`ParityError` is raised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from nightshift.artifacts import atomic_write_bytes, atomic_write_json, sha256_file
from nightshift.errors import ParityError

INPUT_NAME = "pixels"
OUTPUT_NAMES = ["logits", "embedding"]


def export_onnx(checkpoint: dict[str, Any], out_path: str | Path, *, opset: int = 18,
                metadata: dict[str, str] | None = None) -> Path:
    """Write ``checkpoint``'s model to ``out_path`` as a self-contained ONNX file."""
    import onnx
    import torch

    from nightshift.models import classifier_from_checkpoint

    model = classifier_from_checkpoint(checkpoint)
    h, w, c = checkpoint["model_config"]["image_shape"]
    example = torch.zeros((2, h, w, c), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=OUTPUT_NAMES,
        dynamic_shapes={"pixels": {0: batch}}, opset_version=opset, external_data=False, optimize=True,
    )
    proto = program.model_proto
    props = {"class_names": json.dumps(checkpoint["class_names"]), "data_digest": checkpoint.get("data_digest", ""),
             "arch": checkpoint["model_config"]["arch"], "producer": "nightshift", **(metadata or {})}
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=str(v))
    onnx.checker.check_model(proto, full_check=True)
    return atomic_write_bytes(out_path, proto.SerializeToString())


def _batches(images: Any, batch_size: int):
    """Batches of uint8 images from one array or from an iterable of arrays (shards)."""
    parts = [images] if isinstance(images, np.ndarray) else images
    for part in parts:
        if isinstance(part, tuple):  # (images, labels) from Snapshot.iter_split
            part = part[0]
        for i in range(0, len(part), batch_size):
            yield np.ascontiguousarray(part[i:i + batch_size], dtype=np.uint8)


def check_parity(checkpoint: dict[str, Any], onnx_path: str | Path, images: Any, *,
                 atol: float = 1e-3, min_top1_agreement: float = 0.995, batch_size: int = 256) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch on ``images``; raise :class:`ParityError` on a breach.

    :param images: a uint8 NHWC array, or an iterable of them (or of ``(images,
        labels)``, as :meth:`Snapshot.iter_split` yields) read one at a time.
    """
    import onnxruntime as ort
    import torch

    from nightshift.models import classifier_from_checkpoint

    model = classifier_from_checkpoint(checkpoint)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    max_diff_logits = max_diff_emb = 0.0
    agree = n = 0
    for xb in _batches(images, batch_size):
        n += len(xb)
        with torch.inference_mode():
            t_logits, t_emb = (t.numpy() for t in model(torch.from_numpy(xb)))
        o_logits, o_emb = sess.run(OUTPUT_NAMES, {INPUT_NAME: xb})
        max_diff_logits = max(max_diff_logits, float(np.abs(t_logits - o_logits).max()))
        max_diff_emb = max(max_diff_emb, float(np.abs(t_emb - o_emb).max()))
        agree += int((t_logits.argmax(1) == o_logits.argmax(1)).sum())
    report = {"n": n, "max_abs_diff_logits": max_diff_logits, "max_abs_diff_embedding": max_diff_emb,
              "top1_agreement": agree / n if n else 0.0, "atol": atol, "min_top1_agreement": min_top1_agreement}
    report["passed"] = bool(n > 0 and max_diff_logits <= atol and report["top1_agreement"] >= min_top1_agreement)
    if not report["passed"]:
        raise ParityError(
            f"ONNX/PyTorch parity breached on {n} held-out images: max |Δlogits| = {max_diff_logits:.3g} "
            f"(limit {atol:g}), top-1 agreement = {report['top1_agreement']:.4f} (min {min_top1_agreement:g})",
            report,
        )
    return report


def export_and_verify(checkpoint: dict[str, Any], out_dir: str | Path, images: Any, *, model_name: str,
                      atol: float = 1e-3, min_top1_agreement: float = 0.995) -> dict[str, Any]:
    """Export to ``out_dir/model.onnx``, check parity, write ``model.json`` and ``parity.json``.

    ``out_dir`` is then exactly the model directory the inference image serves.
    """
    out_dir = Path(out_dir)
    onnx_path = export_onnx(checkpoint, out_dir / "model.onnx")
    try:
        parity = check_parity(checkpoint, onnx_path, images, atol=atol, min_top1_agreement=min_top1_agreement)
    except ParityError as exc:
        atomic_write_json(out_dir / "parity.json", exc.report)
        raise
    atomic_write_json(out_dir / "parity.json", parity)
    digest = sha256_file(onnx_path)
    h, w, c = checkpoint["model_config"]["image_shape"]
    meta = {"name": model_name, "version": digest[:12], "class_names": checkpoint["class_names"],
            "input_name": INPUT_NAME, "input_shape": [h, w, c], "input_datatype": "UINT8",
            "outputs": OUTPUT_NAMES, "onnx_sha256": digest, "data_digest": checkpoint.get("data_digest")}
    atomic_write_json(out_dir / "model.json", meta)
    return {"onnx_path": str(onnx_path), "model_dir": str(out_dir), "onnx_sha256": digest,
            "size_bytes": onnx_path.stat().st_size, "parity": parity, "model_meta": meta}

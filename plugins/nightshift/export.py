"""Export a trained checkpoint to ONNX and prove it matches PyTorch.

The graph's input is ``pixels: uint8 [batch, H, W, C]`` (NHWC, values 0–255,
normalisation inside the graph), the batch axis is dynamic, and the outputs are
``logits``, ``probabilities`` (softmax of the logits, inside the graph) and
``embedding`` (the penultimate layer), all ``float32``. ``onnx.checker`` runs on
the result; ONNX Runtime must agree with PyTorch on held-out images, and on a
batch of 1 and a batch of 64, or :class:`ParityError` is raised.

The model carries its contract in ``metadata_props`` (class names, input
layout, data digest, training run, git SHA, opset, ...; see
``docs/contracts.md``). With ``quantize=True`` an int8 model is made
(:mod:`nightshift.quantization`) and served instead of the fp32 one only when its
test accuracy drop is within tolerance.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from nightshift import lineage
from nightshift.artifacts import atomic_write_bytes, atomic_write_json, sha256_file
from nightshift.contracts import PARITY_FILE, QUANTIZATION_FILE
from nightshift.errors import ConfigError, ParityError

log = logging.getLogger(__name__)

INPUT_NAME = "pixels"
INPUT_LAYOUT = "NHWC"
OUTPUT_NAMES = ["logits", "probabilities", "embedding"]
#: Batch sizes the exported graph is run at after export (dynamic batch axis).
BATCH_CHECK_SIZES = (1, 64)
#: Opset 20 is the first with ONNX's own ``Gelu``: torch exports ``nn.GELU`` as that one
#: node, which ONNX Runtime keeps inside its blocked (NCHWc) convolution layout. At 18
#: it is Div/Erf/Add/Mul/Mul, which ONNX Runtime 1.31 does not fuse, with a layout
#: reorder around each: the same small_cnn runs 1.12x faster at 20 (``bench/onnx_opset.py``).
DEFAULT_OPSET = 20
#: torch's dynamo exporter emits opset 18 at the lowest (asking for less silently gives
#: 18); 18..25 export, pass onnx.checker and run on the pinned ONNX Runtime.
MIN_OPSET, MAX_OPSET = 18, 25
#: Files of a model directory besides ``model.onnx``, ``model.json`` and the two reports
#: (``contracts.PARITY_FILE``, ``contracts.QUANTIZATION_FILE``).
FP32_FILE, INT8_FILE = "model.fp32.onnx", "model.int8.onnx"


def validate_opset(opset: Any) -> int:
    """``opset`` as an int in ``MIN_OPSET..MAX_OPSET``.

    :raises ConfigError: not an integer, or outside the supported range.
    """
    if isinstance(opset, bool):
        raise ConfigError(f"opset must be an integer, got {opset!r}")
    try:
        value = int(str(opset).strip())
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"opset must be an integer ONNX opset version, got {opset!r}") from exc
    if not MIN_OPSET <= value <= MAX_OPSET:
        raise ConfigError(f"ONNX opset {value} is not supported: choose {MIN_OPSET}..{MAX_OPSET} "
                          f"(the PyTorch exporter emits at least {MIN_OPSET}; ONNX Runtime in the image runs up to "
                          f"{MAX_OPSET})")
    return value


def model_metadata(checkpoint: dict[str, Any], *, opset: int, training_run_id: str | None = None,
                   git_sha: str | None = None) -> dict[str, str]:
    """The ``metadata_props`` every exported model carries (all values strings)."""
    import torch

    from nightshift import __version__

    h, w, c = checkpoint["model_config"]["image_shape"]
    return {
        "class_names": json.dumps(list(checkpoint["class_names"])),
        "input_name": INPUT_NAME,
        "input_shape": json.dumps([h, w, c]),
        "input_layout": INPUT_LAYOUT,
        "input_dtype": "uint8",
        "input_range": "0-255",
        "outputs": json.dumps(OUTPUT_NAMES),
        "data_digest": str(checkpoint.get("data_digest") or ""),
        "training_run_id": str(training_run_id or ""),
        "git_sha": git_sha if git_sha is not None else lineage.git_sha(),
        "opset": str(opset),
        "arch": str(checkpoint["model_config"]["arch"]),
        "variant": "fp32",
        "producer": "nightshift",
        "producer_version": __version__,
        "exporter": f"torch.onnx (dynamo) {torch.__version__.split('+')[0]}",
    }


def _with_probabilities(model: Any) -> Any:
    """Wrap a :class:`~nightshift.models.Classifier`: ``pixels -> (logits, softmax(logits), embedding)``."""
    import torch

    class WithProbabilities(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            logits, emb = self.inner(pixels)
            logits = logits.float()
            return logits, torch.softmax(logits, dim=1), emb.float()

    return WithProbabilities(model).eval()


def _set_metadata(proto: Any, props: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=str(v))


def export_onnx(checkpoint: dict[str, Any], out_path: str | Path, *, opset: int = DEFAULT_OPSET,
                metadata: dict[str, str] | None = None) -> Path:
    """Write ``checkpoint``'s model to ``out_path`` as a self-contained ONNX file.

    :param metadata: ``metadata_props`` (default :func:`model_metadata` without a run id).
    :raises ConfigError: ``opset`` is unsupported, or the exporter produced another one.
    """
    import onnx
    import torch

    from nightshift.models import classifier_from_checkpoint

    opset = validate_opset(opset)
    model = _with_probabilities(classifier_from_checkpoint(checkpoint))
    h, w, c = checkpoint["model_config"]["image_shape"]
    example = torch.zeros((2, h, w, c), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=OUTPUT_NAMES,
        dynamic_shapes={"pixels": {0: batch}}, opset_version=opset, external_data=False, optimize=True,
    )
    proto = program.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ConfigError(f"asked the exporter for ONNX opset {opset} but it produced {got}")
    _set_metadata(proto, metadata if metadata is not None else model_metadata(checkpoint, opset=opset))
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


def _tile(sample: np.ndarray, n: int) -> np.ndarray:
    """``n`` images from ``sample``, repeating it when it holds fewer."""
    reps = -(-n // len(sample))
    return np.ascontiguousarray(np.concatenate([sample] * reps)[:n])


def _batch_check(model: Any, sess: Any, x: np.ndarray, num_classes: int, atol: float,
                 min_top1_agreement: float) -> dict[str, Any]:
    import torch

    n = len(x)
    with torch.inference_mode():
        t_logits, t_probs, t_emb = (t.numpy() for t in model(torch.from_numpy(x)))
    o_logits, o_probs, o_emb = sess.run(OUTPUT_NAMES, {INPUT_NAME: x})
    shapes = {"logits": list(o_logits.shape), "probabilities": list(o_probs.shape), "embedding": list(o_emb.shape)}
    shapes_ok = (o_logits.shape == (n, num_classes) and o_probs.shape == (n, num_classes)
                 and o_emb.shape == (n, t_emb.shape[1]))
    out = {"n": n, "shapes": shapes, "shapes_ok": bool(shapes_ok)}
    if shapes_ok:
        out.update({
            "max_abs_diff_logits": float(np.abs(t_logits - o_logits).max()),
            "max_abs_diff_probabilities": float(np.abs(t_probs - o_probs).max()),
            "max_abs_diff_embedding": float(np.abs(t_emb - o_emb).max()),
            "top1_agreement": float((t_logits.argmax(1) == o_logits.argmax(1)).mean()),
            "max_abs_probability_sum_error": float(np.abs(o_probs.sum(axis=1) - 1.0).max()),
        })
        out["passed"] = bool(out["max_abs_diff_logits"] <= atol and out["top1_agreement"] >= min_top1_agreement
                             and out["max_abs_probability_sum_error"] <= 1e-4)
    else:
        out["passed"] = False
    return out


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b|; ``inf`` when either side holds NaN/inf (``max(0.0, nan)`` is 0.0, which
    would let a NaN output pass the parity check)."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.max()) if d.size and np.isfinite(d).all() else (float("inf") if d.size else 0.0)


def check_parity(checkpoint: dict[str, Any], onnx_path: str | Path, images: Any, *,
                 atol: float = 1e-3, min_top1_agreement: float = 0.995, batch_size: int = 256,
                 batch_check_sizes: Iterable[int] = BATCH_CHECK_SIZES) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch on ``images``; raise :class:`ParityError` on a breach.

    Besides the whole set (in batches of ``batch_size``), the graph is run on a
    batch of each of ``batch_check_sizes`` (the first images, tiled when there
    are fewer) to prove the dynamic batch axis: output shapes, ``|Δlogits| <=
    atol``, top-1 agreement, probabilities summing to 1.

    :param images: a uint8 NHWC array, or an iterable of them (or of ``(images,
        labels)``, as :meth:`Snapshot.iter_split` yields) read one at a time.
    """
    import torch

    from nightshift.models import classifier_from_checkpoint
    from nightshift.scoring import open_session

    model = _with_probabilities(classifier_from_checkpoint(checkpoint))
    sess = open_session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    if names != OUTPUT_NAMES:
        raise ParityError(f"{onnx_path} has outputs {names}, expected {OUTPUT_NAMES}", {"passed": False,
                                                                                         "outputs": names})
    sizes = sorted({int(s) for s in batch_check_sizes})
    keep = max(sizes, default=0)
    sample: list[np.ndarray] = []
    have = 0
    max_diff_logits = max_diff_probs = max_diff_emb = 0.0
    agree = n = 0
    for xb in _batches(images, batch_size):
        n += len(xb)
        if have < keep:
            sample.append(xb[:keep - have])
            have += len(sample[-1])
        with torch.inference_mode():
            t_logits, t_probs, t_emb = (t.numpy() for t in model(torch.from_numpy(xb)))
        o_logits, o_probs, o_emb = sess.run(OUTPUT_NAMES, {INPUT_NAME: xb})
        max_diff_logits = max(max_diff_logits, _max_abs_diff(t_logits, o_logits))
        max_diff_probs = max(max_diff_probs, _max_abs_diff(t_probs, o_probs))
        max_diff_emb = max(max_diff_emb, _max_abs_diff(t_emb, o_emb))
        agree += int((t_logits.argmax(1) == o_logits.argmax(1)).sum())
    report: dict[str, Any] = {
        "n": n, "max_abs_diff_logits": max_diff_logits, "max_abs_diff_probabilities": max_diff_probs,
        "max_abs_diff_embedding": max_diff_emb, "top1_agreement": agree / n if n else 0.0, "atol": atol,
        "min_top1_agreement": min_top1_agreement, "outputs": names,
    }
    checks: dict[str, Any] = {}
    if sample:
        pool = np.concatenate(sample)
        num_classes = len(checkpoint["class_names"])
        for s in sizes:
            checks[str(s)] = {**_batch_check(model, sess, _tile(pool, s), num_classes, atol, min_top1_agreement),
                              "tiled": bool(len(pool) < s)}
    report["batch_checks"] = checks
    failed_batches = [s for s, c in checks.items() if not c["passed"]]
    report["passed"] = bool(n > 0 and max_diff_logits <= atol and report["top1_agreement"] >= min_top1_agreement
                            and len(checks) == len(sizes) and not failed_batches)
    if not report["passed"]:
        extra = f"; batch-size checks failed at {failed_batches}" if failed_batches else ""
        raise ParityError(
            f"ONNX/PyTorch parity breached on {n} held-out images: max |Δlogits| = {max_diff_logits:.3g} "
            f"(limit {atol:g}), top-1 agreement = {report['top1_agreement']:.4f} (min {min_top1_agreement:g})"
            f"{extra}",
            report,
        )
    return report


def _quantize(checkpoint: dict[str, Any], out_dir: Path, onnx_path: Path, props: dict[str, str], *,
              calibration: Any, evaluation: Any, max_accuracy_drop: float, calibration_images: int,
              latency_runs: int) -> dict[str, Any]:
    """Make, score and keep or discard the int8 model; write ``quantization.json``.

    Kept: ``model.onnx`` becomes the int8 model and the fp32 one is kept as
    ``model.fp32.onnx``. Discarded: the int8 file is deleted, the report says why.
    """
    import onnx

    from nightshift.quantization import evaluate_int8, quantize_static_int8, sample_images

    calib = sample_images(calibration, calibration_images)
    int8_path = out_dir / INT8_FILE
    settings = quantize_static_int8(onnx_path, int8_path, calib)
    int8 = onnx.load(str(int8_path))
    _set_metadata(int8, {**props, "variant": "int8", "fp32_sha256": sha256_file(onnx_path),
                         "quantization": json.dumps({k: v for k, v in settings.items() if k != "excluded_nodes"})})
    onnx.checker.check_model(int8)
    atomic_write_bytes(int8_path, int8.SerializeToString())
    report = evaluate_int8(onnx_path, int8_path, evaluation, max_accuracy_drop=max_accuracy_drop,
                           latency_image=calib[0], latency_runs=latency_runs)
    report["settings"] = settings
    report["batch_checks"] = _int8_batch_checks(int8_path, calib, len(checkpoint["class_names"]))
    if report["kept"] and not all(c["shapes_ok"] for c in report["batch_checks"].values()):
        report.update(kept=False, decision="discarded",
                      reason=f"discarded: the int8 model's output shapes are wrong: {report['batch_checks']}")
    if report["kept"]:
        shutil.copy2(onnx_path, out_dir / f".{FP32_FILE}.tmp")
        os.replace(out_dir / f".{FP32_FILE}.tmp", out_dir / FP32_FILE)
        os.replace(int8_path, onnx_path)  # model.onnx is now the int8 model
        report["served"] = "int8"
        report["files"] = {"served": "model.onnx", "fp32": FP32_FILE}
    else:
        int8_path.unlink(missing_ok=True)
        report["served"] = "fp32"
        report["files"] = {"served": "model.onnx"}
    atomic_write_json(out_dir / QUANTIZATION_FILE, report)
    log.info("int8 model %s: %s", report["decision"], report["reason"])
    return report


def _int8_batch_checks(path: Path, images: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Output shapes of the int8 model at each of :data:`BATCH_CHECK_SIZES`."""
    from nightshift.scoring import open_session

    sess = open_session(path)
    names = [o.name for o in sess.get_outputs()]
    out = {}
    for s in BATCH_CHECK_SIZES:
        res = dict(zip(names, sess.run(None, {INPUT_NAME: _tile(images, s)}), strict=True))
        shapes = {k: list(v.shape) for k, v in res.items()}
        ok = (names == OUTPUT_NAMES and shapes["logits"] == [s, num_classes]
              and shapes["probabilities"] == [s, num_classes] and shapes["embedding"][0] == s)
        out[str(s)] = {"n": s, "shapes": shapes, "shapes_ok": bool(ok)}
    return out


def export_and_verify(checkpoint: dict[str, Any], out_dir: str | Path, images: Any, *, model_name: str,
                      opset: int = DEFAULT_OPSET, atol: float = 1e-3, min_top1_agreement: float = 0.995,
                      training_run_id: str | None = None, git_sha: str | None = None,
                      quantize: bool = False, calibration: Iterable[Any] | None = None,
                      evaluation: Iterable[tuple[np.ndarray, np.ndarray]] | None = None,
                      int8_max_accuracy_drop: float = 0.01, calibration_images: int = 512,
                      latency_runs: int = 200) -> dict[str, Any]:
    """Export to ``out_dir/model.onnx``, check parity, write ``model.json`` and ``parity.json``
    (and, with ``quantize``, ``quantization.json``).

    ``out_dir`` is then exactly the model directory the inference image serves.

    :param images: held-out images for the parity check (array or shards).
    :param training_run_id: the MLflow run that trained the checkpoint (metadata).
    :param quantize: also make a static int8 model; it replaces ``model.onnx``
        (fp32 kept as ``model.fp32.onnx``) only when its top-1 accuracy on
        ``evaluation`` is at most ``int8_max_accuracy_drop`` below the fp32 one.
    :param calibration: images (shards) the int8 activation ranges are calibrated
        on (a seeded sample of ``calibration_images`` of them).
    :param evaluation: ``(images, labels)`` batches both models are scored on.
    :raises ConfigError: unsupported ``opset``, or ``quantize`` without data.
    :raises ParityError: ONNX Runtime and PyTorch disagree (``parity.json`` is still written).
    """
    opset = validate_opset(opset)
    if quantize and (calibration is None or evaluation is None):
        raise ConfigError("quantize=True needs calibration images and a test split to evaluate the int8 model on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (FP32_FILE, INT8_FILE, QUANTIZATION_FILE):  # from an earlier try with other settings
        (out_dir / stale).unlink(missing_ok=True)
    props = model_metadata(checkpoint, opset=opset, training_run_id=training_run_id, git_sha=git_sha)
    onnx_path = export_onnx(checkpoint, out_dir / "model.onnx", opset=opset, metadata=props)
    fp32_sha = sha256_file(onnx_path)
    try:
        parity = check_parity(checkpoint, onnx_path, images, atol=atol, min_top1_agreement=min_top1_agreement)
    except ParityError as exc:
        atomic_write_json(out_dir / PARITY_FILE, exc.report)
        raise
    atomic_write_json(out_dir / PARITY_FILE, parity)
    quant = None
    if quantize:
        quant = _quantize(checkpoint, out_dir, onnx_path, props, calibration=calibration, evaluation=evaluation,
                          max_accuracy_drop=float(int8_max_accuracy_drop), calibration_images=calibration_images,
                          latency_runs=latency_runs)
    variant = "int8" if quant and quant["kept"] else "fp32"
    digest = sha256_file(onnx_path)
    h, w, c = checkpoint["model_config"]["image_shape"]
    meta = {"name": model_name, "version": digest[:12], "class_names": checkpoint["class_names"],
            "input_name": INPUT_NAME, "input_shape": [h, w, c], "input_datatype": "UINT8",
            "input_layout": INPUT_LAYOUT, "input_range": [0, 255],
            "outputs": OUTPUT_NAMES, "onnx_sha256": digest, "data_digest": checkpoint.get("data_digest"),
            "opset": opset, "arch": props["arch"], "training_run_id": training_run_id, "git_sha": props["git_sha"],
            "variant": variant}
    if variant == "int8":
        meta["fp32_sha256"] = fp32_sha
    atomic_write_json(out_dir / "model.json", meta)
    return {"onnx_path": str(onnx_path), "model_dir": str(out_dir), "onnx_sha256": digest,
            "size_bytes": onnx_path.stat().st_size, "parity": parity, "model_meta": meta, "variant": variant,
            "quantization": quant}

"""Optional int8 post-training quantization of the exported ONNX classifier.

Static quantization with ONNX Runtime (``onnxruntime.quantization``): QDQ format,
per-channel int8 weights, int8 activations, MinMax ranges calibrated on real
images of the snapshot (a seeded sample of the train split, read shard by shard).

The graph takes raw ``uint8`` pixels and normalises them inside
(``Transpose -> Cast -> Mul -> Sub -> Div``). Those preprocessing nodes, and the
``Softmax`` that makes ``probabilities``, are kept in float: quantizing the
normalisation would only add error before the first convolution (whose input is
quantized anyway), the uint8 input must not get a QuantizeLinear, and the
probabilities should stay exactly ``softmax(logits)``.

The int8 model is then scored next to the fp32 one on the test split (ONNX
Runtime, both in one pass) and kept only when its top-1 accuracy drop is within
``max_accuracy_drop``; sizes and batch-1 latencies of both go in the report.
Airflow-free; onnx and onnxruntime are imported inside the functions.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from nightshift.errors import DataError

log = logging.getLogger(__name__)

#: Ops whose output is the ONNX-graph preprocessing (or the probabilities): never quantized.
_FLOAT_ONLY_OPS = {"Softmax", "LogSoftmax"}
#: The first op that carries weights ends the in-graph preprocessing.
_WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def float_only_nodes(model: Any) -> list[str]:
    """Names of the nodes to exclude from quantization: every node before the first
    weighted op (the uint8 -> float normalisation) and every Softmax."""
    exclude: list[str] = []
    in_preprocessing = True
    for node in model.graph.node:
        if node.op_type in _WEIGHTED_OPS:
            in_preprocessing = False
        if (in_preprocessing or node.op_type in _FLOAT_ONLY_OPS) and node.name:
            exclude.append(node.name)
    return exclude


def sample_images(batches: Iterable[Any], n: int, *, seed: int = 0) -> np.ndarray:
    """A seeded uniform sample of at most ``n`` images from shards (reservoir sampling).

    Shards can be class-ordered (ImageFolder lists folder by folder), so the
    first ``n`` images would not represent the data; memory stays ``O(n)``.

    :param batches: uint8 arrays, or ``(images, labels)`` as :meth:`Snapshot.iter_split` yields.
    """
    rng = np.random.default_rng(seed)
    reservoir: np.ndarray | None = None
    seen = 0
    for part in batches:
        images = part[0] if isinstance(part, tuple) else part
        images = np.asarray(images, dtype=np.uint8)
        if reservoir is None and len(images):
            reservoir = np.empty((n, *images.shape[1:]), np.uint8)
        for img in images:
            if seen < n:
                reservoir[seen] = img  # type: ignore[index]
            else:
                j = int(rng.integers(0, seen + 1))
                if j < n:
                    reservoir[j] = img  # type: ignore[index]
            seen += 1
    if reservoir is None or seen == 0:
        raise DataError("no calibration images: the calibration split is empty")
    return reservoir[:min(seen, n)]


def quantize_static_int8(fp32_path: str | Path, int8_path: str | Path, calibration: np.ndarray, *,
                         batch_size: int = 64) -> dict[str, Any]:
    """Write the int8 (QDQ, per-channel) model of ``fp32_path`` to ``int8_path``.

    :param calibration: uint8 NHWC images the activation ranges are calibrated on.
    :returns: the settings used (for the report and the model's metadata).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(str(fp32_path))
    input_name = model.graph.input[0].name
    exclude = float_only_nodes(model)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(range(0, len(calibration), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self._it, None)
            return None if i is None else {input_name: np.ascontiguousarray(calibration[i:i + batch_size])}

    int8_path = Path(int8_path)
    tmp = int8_path.with_name(f".{int8_path.name}.{os.getpid()}.tmp")
    # quantize_static writes its output itself: write a temp sibling and rename (atomic for readers)
    try:
        quantize_static(
            model, str(tmp), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibMaxIntermediateOutputs": 16},
        )
        os.replace(tmp, int8_path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"method": "static", "format": "QDQ", "per_channel": True, "activation_type": "int8",
            "weight_type": "int8", "calibrate_method": "MinMax", "calibration_images": int(len(calibration)),
            "excluded_nodes": exclude}


def _session(path: str | Path, threads: int):
    from nightshift.scoring import open_session

    return open_session(path, threads=threads)


def batch1_latency_ms(path: str | Path, image: np.ndarray, *, runs: int = 200, warmup: int = 20,
                      threads: int = 1) -> float:
    """Median wall time of ``runs`` batch-1 ``session.run`` calls (ms), after ``warmup``."""
    sess = _session(path, threads)
    name = sess.get_inputs()[0].name
    x = np.ascontiguousarray(image[None] if image.ndim == 3 else image[:1], dtype=np.uint8)
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def compare_accuracy(fp32_path: str | Path, int8_path: str | Path, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                     *, batch_size: int = 512, threads: int | None = None) -> dict[str, Any]:
    """Top-1 accuracy of both models on the same ``(images, labels)`` batches, one pass."""
    s32 = _session(fp32_path, threads or 0)
    s8 = _session(int8_path, threads or 0)
    name = s32.get_inputs()[0].name
    n = c32 = c8 = agree = 0
    for images, labels in batches:
        for i in range(0, len(labels), batch_size):
            x = np.ascontiguousarray(images[i:i + batch_size], dtype=np.uint8)
            y = np.asarray(labels[i:i + batch_size])
            p32 = s32.run(["logits"], {name: x})[0].argmax(1)
            p8 = s8.run(["logits"], {name: x})[0].argmax(1)
            n += len(y)
            c32 += int((p32 == y).sum())
            c8 += int((p8 == y).sum())
            agree += int((p32 == p8).sum())
    if n == 0:
        raise DataError("no test images to compare the fp32 and int8 models on")
    return {"n": n, "fp32_accuracy": c32 / n, "int8_accuracy": c8 / n, "accuracy_drop": (c32 - c8) / n,
            "top1_agreement": agree / n}


def evaluate_int8(fp32_path: str | Path, int8_path: str | Path, test_batches: Iterable[tuple[np.ndarray, np.ndarray]],
                  *, max_accuracy_drop: float, latency_image: np.ndarray, latency_runs: int = 200,
                  latency_threads: int = 1) -> dict[str, Any]:
    """Score, size and time both models; decide whether the int8 one is kept.

    Kept when ``fp32_accuracy - int8_accuracy <= max_accuracy_drop`` (a negative
    tolerance always discards). The report says why either way.
    """
    acc = compare_accuracy(fp32_path, int8_path, test_batches)
    lat32 = batch1_latency_ms(fp32_path, latency_image, runs=latency_runs, threads=latency_threads)
    lat8 = batch1_latency_ms(int8_path, latency_image, runs=latency_runs, threads=latency_threads)
    size32, size8 = Path(fp32_path).stat().st_size, Path(int8_path).stat().st_size
    drop = acc["accuracy_drop"]
    kept = bool(drop <= max_accuracy_drop)
    if kept:
        reason = (f"int8 top-1 accuracy {acc['int8_accuracy']:.4f} vs fp32 {acc['fp32_accuracy']:.4f} on "
                  f"{acc['n']} test images: drop {drop:.4f} is within the tolerance {max_accuracy_drop:g}")
    else:
        reason = (f"discarded: int8 top-1 accuracy {acc['int8_accuracy']:.4f} vs fp32 {acc['fp32_accuracy']:.4f} on "
                  f"{acc['n']} test images: drop {drop:.4f} exceeds the tolerance {max_accuracy_drop:g}")
    return {
        **acc, "max_accuracy_drop": max_accuracy_drop, "kept": kept, "decision": "kept" if kept else "discarded",
        "reason": reason,
        "fp32": {"size_bytes": size32, "latency_ms_batch1_median": lat32},
        "int8": {"size_bytes": size8, "latency_ms_batch1_median": lat8},
        "size_ratio": size8 / size32 if size32 else None,
        "latency": {"runs": latency_runs, "warmup": 20, "intra_op_threads": latency_threads, "batch_size": 1,
                    "statistic": "median"},
    }

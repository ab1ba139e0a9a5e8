"""Scoring a model on labelled images, offline or as served.

**Offline** (:func:`score_onnx`): ONNX Runtime in process on a snapshot split, so
candidate and champion are compared on exactly the same examples (TFX Evaluator
style); :func:`open_session` and :func:`run_onnx` are the one way Nightshift opens
and runs a model outside the server (export's parity check, quantization, the drift
reference use them too).

**Served** (:func:`score_endpoint`): the same labelled images sent through a running
server's ``POST /v2/models/{name}/infer`` (Open Inference Protocol), with accuracy,
latency and errors; :func:`skew_report` compares its predictions with the offline
ones. The container it runs in is :class:`nightshift.containers.InferenceContainer`;
the whole system evaluation (accuracy, skew, load) is
:func:`nightshift.system_eval.run_system_eval`.

Airflow-free; onnxruntime, requests and MLflow are imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from nightshift.errors import DataError, ScoringError

log = logging.getLogger(__name__)

__all__ = ["ScoringError", "fetch_model_onnx", "merge_endpoint_scores", "open_session", "paired_counts", "run_onnx",
           "score_endpoint", "score_onnx", "skew_report"]


def open_session(onnx_path: str | Path, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session on ``onnx_path`` (the one way Nightshift opens a model offline).

    :raises ScoringError: the file is missing or ONNX Runtime cannot load it.
    """
    import onnxruntime as ort

    path = Path(onnx_path)
    if not path.is_file():
        raise ScoringError(f"ONNX model {path} does not exist")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: no warnings about unused initializers on every load
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ScoringError(f"ONNX model {path} cannot be loaded: {exc}") from exc


def run_onnx(sess: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]], outputs: Sequence[str] = ("logits",), *,
             batch_size: int = 512, name: str = "model") -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Run ``sess`` (:func:`open_session`) over ``(images, labels)`` batches, ``batch_size`` images at a
    time, in input order; yield ``(labels, {output: array})`` per chunk.

    :raises ScoringError: the model lacks one of ``outputs`` or expects another image shape.
    """
    have = [o.name for o in sess.get_outputs()]
    missing = [o for o in outputs if o not in have]
    if missing:
        raise ScoringError(f"{name} has no output {missing} (its outputs: {have})")
    inp = sess.get_inputs()[0]
    want = [d if isinstance(d, int) else None for d in inp.shape[1:]]
    for images, labels in batches:
        got = list(images.shape[1:])
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            raise ScoringError(f"{name} expects images of shape {want} but the data is {got}")
        for i in range(0, len(images), batch_size):
            x = np.ascontiguousarray(images[i:i + batch_size], dtype=np.uint8)
            yield np.asarray(labels[i:i + batch_size]), dict(zip(outputs, sess.run(list(outputs), {inp.name: x})))


def score_onnx(onnx_path: str | Path, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
               batch_size: int = 512, threads: int | None = None,
               class_names: list[str] | None = None) -> dict[str, Any]:
    """Top-1 accuracy of an ONNX model (``pixels`` uint8 NHWC -> ``logits``) on ``batches``.

    :param batches: ``(images, labels)`` pairs, e.g. :meth:`Snapshot.iter_split`.
    :param class_names: the data's label order; the model's ``class_names`` metadata must be
        the same list, else its logits index other classes and its accuracy means nothing.
    :returns: ``accuracy``, ``n``, ``correct``, ``predictions`` (int array, input order) and
        ``hits`` (bool array, input order: whether each image was classified correctly), so two
        models scored on the same batches can be compared image by image (:func:`paired_counts`).
    :raises ScoringError: the model is missing, broken, expects another input shape, or
        (with ``class_names``) was trained on other classes or does not say which.
    """
    path = Path(onnx_path)
    sess = open_session(path, threads=threads)
    if class_names is not None:
        raw = sess.get_modelmeta().custom_metadata_map.get("class_names")
        try:
            model_classes = json.loads(raw) if raw else None
        except ValueError:
            model_classes = None
        if model_classes is None:
            raise ScoringError(f"model {path.name} does not record its class names (metadata 'class_names'): "
                               "its predictions cannot be matched to today's labels")
        if list(map(str, model_classes)) != list(map(str, class_names)):
            raise ScoringError(f"model {path.name} was trained on classes {model_classes}, today's data has "
                               f"{list(class_names)}: its accuracy on these labels would mean nothing")
    preds: list[np.ndarray] = []
    hits: list[np.ndarray] = []
    for labels, out in run_onnx(sess, batches, batch_size=batch_size, name=f"model {path.name}"):
        p = out["logits"].argmax(axis=1)
        preds.append(p)
        hits.append(p == labels)
    n = sum(len(p) for p in preds)
    if n == 0:
        raise ScoringError("no images to score on")
    hit = np.concatenate(hits)
    correct = int(hit.sum())
    return {"accuracy": correct / n, "n": n, "correct": correct, "predictions": np.concatenate(preds), "hits": hit}


def paired_counts(champion_hits: np.ndarray, candidate_hits: np.ndarray) -> dict[str, int]:
    """The 2x2 table of two models scored on the same images, in the same order.

    :returns: ``both`` right, ``neither``, ``champion_only`` (only the champion right) and
        ``candidate_only``: the last two are McNemar's discordant pairs.
    :raises ScoringError: the two were not scored on the same number of images.
    """
    a, b = np.asarray(champion_hits, bool), np.asarray(candidate_hits, bool)
    if a.shape != b.shape:
        raise ScoringError(f"champion and candidate were scored on different images ({a.size} vs {b.size}): "
                           "they cannot be compared image by image")
    return {"both": int((a & b).sum()), "neither": int((~a & ~b).sum()),
            "champion_only": int((a & ~b).sum()), "candidate_only": int((~a & b).sum())}


def fetch_model_onnx(c, model_name: str, version: str, dst: str | Path | None = None) -> Path:
    """Download the ``model.onnx`` of a registered version (its ``source``) to ``dst``.

    :raises ScoringError: the version has no ``model.onnx`` artifact.
    Registry connectivity errors propagate (the caller decides: retry).
    """
    from mlflow.exceptions import MlflowException

    from nightshift.registry import is_not_found

    mv = c.get_model_version(model_name, str(version))
    dst = Path(dst or tempfile.mkdtemp(prefix="nightshift-champion-"))
    try:
        local = c.download_artifacts(mv.run_id, _artifact_path(mv.source, mv.run_id) + "/model.onnx", str(dst))
    except MlflowException as exc:
        if is_not_found(exc) or "No such file" in str(exc) or "not found" in str(exc).lower():
            raise ScoringError(f"{model_name} v{version} has no model.onnx under {mv.source}: {exc}") from exc
        raise
    except OSError as exc:
        raise ScoringError(f"{model_name} v{version}: model.onnx under {mv.source} cannot be read: {exc}") from exc
    return Path(local)


def _artifact_path(source: str, run_id: str) -> str:
    prefix = f"runs:/{run_id}/"
    if source.startswith(prefix):
        return source[len(prefix):].strip("/")
    # models:/ or a plain artifact URI: the registry copies under the run's "onnx" folder
    return "onnx"


# --------------------------------------------------------------------------- served


def skew_report(served_pred: np.ndarray, offline_pred: np.ndarray, *, max_examples: int = 10) -> dict[str, Any]:
    """Where the served predictions differ from the offline ones (preprocessing skew).

    :returns: ``n``, ``mismatches``, ``mismatch_rate``, ``examples`` (image indices with both predictions).
    """
    served_pred = np.asarray(served_pred)
    offline_pred = np.asarray(offline_pred)
    if served_pred.shape != offline_pred.shape:
        raise DataError(f"served and offline predictions differ in shape: {served_pred.shape} vs {offline_pred.shape}")
    answered = served_pred >= 0
    bad = np.flatnonzero(answered & (served_pred != offline_pred))
    n = int(answered.sum())
    return {"n": n, "mismatches": int(bad.size), "mismatch_rate": (bad.size / n) if n else None,
            "examples": [{"index": int(i), "served": int(served_pred[i]), "offline": int(offline_pred[i])}
                         for i in bad[:max_examples]]}



def merge_endpoint_scores(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from :func:`score_endpoint` results over parts of a split
    (shards), each made with ``return_predictions=True``."""
    n = sum(p["n"] for p in parts)
    answered = sum(p["answered"] for p in parts)
    correct = sum(p["correct"] for p in parts)
    wall = sum(p["wall_s"] for p in parts)
    latencies = [x for p in parts for x in p.get("latencies", [])]
    preds = [p["predictions"] for p in parts if "predictions" in p]
    return {
        "n": n, "requests": sum(p["requests"] for p in parts), "errors": sum(p["errors"] for p in parts),
        "errored_images": sum(p["errored_images"] for p in parts), "answered": answered, "correct": correct,
        "accuracy": correct / answered if answered else None, "accuracy_all": correct / n if n else None,
        "latency_ms": _percentiles(latencies), "throughput_ips": round(answered / wall, 3) if wall > 0 else None,
        "wall_s": round(wall, 4), "batch_size": parts[0]["batch_size"] if parts else None,
        "error_samples": [e for p in parts for e in p["error_samples"]][:5], "shards": len(parts),
        "predictions": np.concatenate(preds) if preds else np.zeros(0, np.int64),
    }


def _percentiles(latencies_ms: list[float]) -> dict[str, float | None]:
    if not latencies_ms:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(latencies_ms, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p95": round(float(np.percentile(a, 95)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
        "max": round(float(a.max()), 3),
    }


def _payload(batch: np.ndarray, input_name: str) -> bytes:
    return json.dumps(
        {"inputs": [{"name": input_name, "shape": list(batch.shape), "datatype": "UINT8",
                     "data": batch.reshape(-1).tolist()}]},
        separators=(",", ":"),
    ).encode("utf-8")


def _predictions(body: Any, n: int, class_names: Sequence[str] | None) -> np.ndarray:
    """Predicted class indices from an OIP answer; ``ValueError`` says what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("outputs"), list):
        raise ValueError("response has no 'outputs' list")
    outputs = {o.get("name"): o for o in body["outputs"] if isinstance(o, dict)}
    if "logits" in outputs:
        o = outputs["logits"]
        shape = o.get("shape")
        if not isinstance(shape, list) or len(shape) != 2 or shape[0] != n:
            raise ValueError(f"logits shape is {shape}, expected [{n}, num_classes]")
        data = np.asarray(o.get("data"), dtype=np.float64)
        if data.size != shape[0] * shape[1]:
            raise ValueError(f"logits carry {data.size} values for shape {shape}")
        return data.reshape(shape).argmax(axis=1)
    if "label" in outputs and class_names is not None:
        data = outputs["label"].get("data")
        if not isinstance(data, list) or len(data) != n:
            got = len(data) if isinstance(data, list) else repr(data)
            raise ValueError(f"label output has {got} entries, expected {n}")
        index = {str(c): i for i, c in enumerate(class_names)}
        unknown = [d for d in data if str(d) not in index]
        if unknown:
            raise ValueError(f"label output holds unknown class names {unknown[:3]}")
        return np.asarray([index[str(d)] for d in data])
    raise ValueError(f"response has neither 'logits' nor (with class_names) 'label' outputs; got {list(outputs)}")


def score_endpoint(
    base_url: str,
    model_name: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 1,
    timeout_s: float = 10,
    class_names: Sequence[str] | None = None,
    input_name: str = "pixels",
    warmup: int = 3,
    max_error_samples: int = 5,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Send a labelled image set through ``POST /v2/models/{model_name}/infer``.

    Errors (connection failures, timeouts, non-200 answers, malformed or
    wrongly shaped responses) are counted, not raised; the first few messages
    are kept in ``error_samples``. ``warmup`` requests with the first batch are
    sent first and not counted.

    :param base_url: e.g. ``http://127.0.0.1:8080``.
    :param images: ``uint8`` array ``(N, H, W, C)``.
    :param labels: integer array ``(N,)``, indices into the class list.
    :param batch_size: images per request.
    :param timeout_s: per-request timeout.
    :param class_names: needed only if the server returns ``label`` but no ``logits``.
    :param input_name: the model's input tensor name.
    :returns: ``n``, ``requests``, ``errors`` (failed requests), ``errored_images``,
        ``answered`` (images), ``correct``, ``accuracy`` (over answered images,
        ``None`` if none), ``accuracy_all`` (errored images count as wrong),
        ``latency_ms`` (``p50``/``p95``/``p99``/``mean``/``max`` over successful
        requests), ``throughput_ips`` (answered images per second of wall time),
        ``wall_s``, ``batch_size``, ``error_samples`` (and with ``return_predictions``,
        ``predictions``: an int array, -1 where the request failed).
    :raises DataError: ``images``/``labels`` have the wrong type or shape.
    """
    import requests

    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"images must be a uint8 array (N, H, W, C); got {images.dtype} with shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"labels must have shape ({images.shape[0]},) to match images; got {labels.shape}")
    if labels.size and labels.dtype.kind not in "iu":
        raise DataError(f"labels must be integers (class indices); got {labels.dtype}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n = int(images.shape[0])
    url = f"{base_url.rstrip('/')}/v2/models/{model_name}/infer"
    headers = {"Content-Type": "application/json"}

    latencies: list[float] = []
    predictions = np.full(n, -1, dtype=np.int64)
    error_samples: list[str] = []
    n_requests = n_errors = errored_images = answered = correct = 0

    def record_error(msg: str, lo: int, hi: int) -> None:
        nonlocal n_errors, errored_images
        n_errors += 1
        errored_images += hi - lo
        if len(error_samples) < max_error_samples:
            error_samples.append(f"images {lo}..{hi - 1}: {msg}")

    with requests.Session() as http:
        http.trust_env = False  # never send 127.0.0.1 traffic through a proxy
        if n:
            first = _payload(images[: min(batch_size, n)], input_name)
            for _ in range(max(0, warmup)):
                try:
                    http.post(url, data=first, headers=headers, timeout=timeout_s)
                except requests.RequestException:
                    pass  # the timed loop will count and report failures
        t_start = time.perf_counter()
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            body = _payload(images[lo:hi], input_name)
            n_requests += 1
            t0 = time.perf_counter()
            try:
                r = http.post(url, data=body, headers=headers, timeout=timeout_s)
            except requests.RequestException as exc:
                record_error(f"{type(exc).__name__}: {exc}", lo, hi)
                continue
            ms = (time.perf_counter() - t0) * 1000.0
            if r.status_code != 200:
                try:
                    detail = r.json().get("error", r.text)
                except ValueError:
                    detail = r.text
                record_error(f"HTTP {r.status_code}: {str(detail)[:300]}", lo, hi)
                continue
            try:
                pred = _predictions(r.json(), hi - lo, class_names)
            except ValueError as exc:
                record_error(f"malformed response: {exc}", lo, hi)
                continue
            latencies.append(ms)
            predictions[lo:hi] = pred
            answered += hi - lo
            correct += int((pred == labels[lo:hi]).sum())
        wall = time.perf_counter() - t_start

    result = {
        "n": n,
        "requests": n_requests,
        "errors": n_errors,
        "errored_images": errored_images,
        "answered": answered,
        "correct": correct,
        "accuracy": (correct / answered) if answered else None,
        "accuracy_all": (correct / n) if n else None,
        "latency_ms": _percentiles(latencies),
        "throughput_ips": round(answered / wall, 3) if wall > 0 else None,
        "wall_s": round(wall, 4),
        "batch_size": batch_size,
        "error_samples": error_samples,
    }
    if return_predictions:
        result["predictions"] = predictions
        result["latencies"] = latencies
    log.info(
        "evaluated %s: n=%d requests=%d errors=%d accuracy=%s p95=%sms throughput=%s img/s",
        url, n, n_requests, n_errors, result["accuracy"], result["latency_ms"]["p95"], result["throughput_ips"],
    )
    return result

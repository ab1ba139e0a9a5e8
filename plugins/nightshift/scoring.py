"""Score ONNX models on a snapshot split, so candidate and champion are compared
on exactly the same examples (TFX Evaluator style).

Airflow-free; onnxruntime and MLflow are imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from nightshift.errors import ScoringError

log = logging.getLogger(__name__)

__all__ = ["ScoringError", "fetch_model_onnx", "open_session", "paired_counts", "run_onnx", "score_onnx"]


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

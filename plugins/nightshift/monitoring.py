"""Drift monitoring of served traffic (the ``drift_monitor`` DAG's core). Airflow-free.

The serving container writes a sampled request log (``docs/serving.md``,
"Request log": JSON Lines files ``requests-*.jsonl``, one record per image with
``timestamp``, ``model_name``, ``model_version``, the profile features
``brightness``/``contrast``/``mean_ch<k>`` computed exactly as the training
profile table, ``predicted_class``, ``confidence`` and ``embedding``).

The *reference* is the champion on its own held-out data: the test split of
the snapshot it was trained on, with the champion's predictions, confidences
and embeddings on it (computed once per champion version and ONNX file, then
cached). The test split is drawn by content hash from the same data as the
training split, so its image statistics are the training distribution.

:func:`check_served_drift` compares one window of traffic with that reference
using Evidently: per-feature drift on the image statistics and the confidence,
the predicted-class mix, and embedding drift (``EmbeddingsDrift``, a
classifier that tries to tell reference from current embeddings). A window
with fewer than ``min_rows`` records is "not enough data", never an alarm.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nightshift.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text, json_safe
from nightshift.errors import ConfigError, DataError

log = logging.getLogger(__name__)

REQUEST_LOG_GLOB = "requests-*.jsonl"
#: The window of request-log records a check read, published beside its report (the request
#: log itself stays on the Docker host that serves).
REQUEST_WINDOW = "request_window.parquet"
#: Records below which a window is "not enough data".
DEFAULT_MIN_ROWS = 100
#: Embedding drift: ROC AUC of a classifier separating reference from current embeddings.
DEFAULT_EMBEDDING_THRESHOLD = 0.6


def _ts(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def read_request_log(directory: str | Path, start: datetime, end: datetime, *,
                     model_name: str | None = None) -> pd.DataFrame:
    """Records of the request log with ``start <= timestamp < end`` (one row per image).

    Only published files (``requests-*.jsonl``) are read; a line that is not valid
    JSON is skipped and counted in ``df.attrs["bad_lines"]``. ``embedding`` is kept
    as a list column.
    """
    directory = Path(directory)
    start, end = _ts(start), _ts(end)
    rows: list[dict[str, Any]] = []
    bad = 0
    if directory.is_dir():
        for f in sorted(directory.glob(REQUEST_LOG_GLOB)):
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                        t = _ts(rec["timestamp"])
                    except (ValueError, KeyError, TypeError):
                        bad += 1
                        continue
                    if start <= t < end and (model_name is None or rec.get("model_name") == model_name):
                        rows.append(rec)
    df = pd.DataFrame(rows)
    df.attrs["bad_lines"] = bad
    return df


def write_request_window(window: pd.DataFrame, path: str | Path) -> Path:
    """Write the request-log records a check read (:func:`read_request_log`'s frame) as Parquet,
    atomically, so the window can be judged again away from the host whose log it came from."""
    import io

    buf = io.BytesIO()
    window.reset_index(drop=True).to_parquet(buf, index=False)
    return atomic_write_bytes(path, buf.getvalue())


def champion_reference(snapshot, onnx_path: str | Path | None, cache_path: str | Path) -> pd.DataFrame:
    """The champion's reference frame: its test-split profile rows plus its own
    ``predicted_class``, ``confidence`` and ``embedding`` on them. Cached at
    ``cache_path`` (the caller names it by champion version and ONNX digest)."""
    cache_path = Path(cache_path)
    if cache_path.is_file():
        return pd.read_parquet(cache_path)
    if snapshot is None:
        raise DataError(f"no cached reference at {cache_path} and no snapshot to build it from")
    from nightshift.scoring import open_session, run_onnx

    sess = open_session(onnx_path)
    preds, confs, embs = [], [], []
    for _, out in run_onnx(sess, snapshot.iter_split("test"), ("logits", "embedding"),
                           name=f"champion model {Path(onnx_path).name} (drift reference)"):
        z = out["logits"] - out["logits"].max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        preds.append(p.argmax(axis=1))
        confs.append(p.max(axis=1))
        embs.append(out["embedding"])
    if not preds:
        raise DataError(f"the champion's snapshot {snapshot.path} has no test images to build a reference from")
    prof = snapshot.profile()
    prof = prof[prof["split"] == "test"].sort_values(["shard", "row"]).reset_index(drop=True)
    classes = snapshot.class_names
    idx = np.concatenate(preds)
    ref = prof[[c for c in prof.columns if c in ("brightness", "contrast") or c.startswith("mean_ch")]].copy()
    ref["predicted_class"] = [classes[i] for i in idx]
    ref["confidence"] = np.concatenate(confs).astype(np.float64)
    ref["embedding"] = list(np.concatenate(embs).astype(np.float64))
    import io

    buf = io.BytesIO()
    ref.to_parquet(buf, index=False)
    atomic_write_bytes(cache_path, buf.getvalue())
    return ref


def _expand(frame: pd.DataFrame, numerical: list[str], dim: int) -> pd.DataFrame:
    out = pd.DataFrame({c: pd.to_numeric(frame[c], errors="coerce").astype("float64") for c in numerical})
    out["predicted_class"] = frame["predicted_class"].astype(str).to_numpy()
    emb = np.stack([np.asarray(e, dtype=np.float64) for e in frame["embedding"]])
    if emb.shape[1] != dim:
        raise DataError(f"embedding size differs: {emb.shape[1]} in traffic vs {dim} in the reference "
                        "(the request log is from another model)")
    for k in range(dim):
        out[f"emb_{k}"] = emb[:, k]
    return out.reset_index(drop=True)


def check_served_drift(reference: pd.DataFrame, current: pd.DataFrame, out_dir: str | Path, *,
                       min_rows: int = DEFAULT_MIN_ROWS, drift_share_threshold: float = 0.5,
                       embedding_threshold: float = DEFAULT_EMBEDDING_THRESHOLD,
                       max_reference_rows: int = 5000, seed: int = 0) -> dict[str, Any]:
    """Compare a window of served traffic with the champion's reference; write reports.

    :returns: ``status`` (``ok`` / ``not_enough_data``), ``drift_detected``,
        ``drifted_share`` (of the per-feature tests), ``drifted_columns``,
        ``embedding_drift_score`` and ``embedding_drift``, ``class_mix`` (current vs
        reference shares), ``n_current``, ``n_reference``, ``report_html``, ``report_json``.
    """
    if not 0 < drift_share_threshold <= 1:
        raise ConfigError(f"drift_share_threshold must be in (0, 1], got {drift_share_threshold}")
    out_dir = Path(out_dir)
    report_json = out_dir / "served_drift.json"
    n = int(len(current))
    base = {"n_current": n, "n_reference": int(len(reference)), "min_rows": min_rows,
            "drift_share_threshold": drift_share_threshold, "embedding_threshold": embedding_threshold,
            "report_json": str(report_json), "report_html": None}
    if n < min_rows:
        result = {**base, "status": "not_enough_data", "drift_detected": False, "drifted_share": None,
                  "message": f"{n} request(s) in this window, fewer than min_rows={min_rows}: no verdict"}
        atomic_write_json(report_json, {"summary": result})
        return result
    started = time.perf_counter()
    numerical = [c for c in reference.columns if c in ("brightness", "contrast", "confidence") or c.startswith("mean_ch")]
    missing = [c for c in numerical + ["predicted_class", "embedding"] if c not in current.columns]
    if missing:
        raise DataError(f"request-log records lack {missing}: is the serving image older than this Nightshift?")
    ref = reference
    if len(ref) > max_reference_rows:
        ref = ref.sample(max_reference_rows, random_state=seed)
    dim = len(ref["embedding"].iloc[0])
    ref_x, cur_x = _expand(ref, numerical, dim), _expand(current, numerical, dim)
    emb_cols = [f"emb_{k}" for k in range(dim)]

    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.presets import DataDriftPreset

    columns = numerical + ["predicted_class"]
    definition = DataDefinition(numerical_columns=numerical + emb_cols, categorical_columns=["predicted_class"],
                                embeddings={"embedding": emb_cols})
    report = Report([DataDriftPreset(columns=columns, drift_share=drift_share_threshold),
                     EmbeddingsDrift(embeddings_name="embedding")], include_tests=True)
    snap = report.run(current_data=Dataset.from_pandas(cur_x, data_definition=definition),
                      reference_data=Dataset.from_pandas(ref_x, data_definition=definition))
    ev = json_safe(snap.dict())
    from nightshift.drift import _parse_snapshot

    parsed = _parse_snapshot(ev, {c: "numerical" for c in numerical} | {"predicted_class": "categorical"})
    per_col = {c: parsed["columns"][c] for c in columns if c in parsed["columns"]}
    if len(per_col) != len(columns):
        raise DataError(f"Evidently returned no drift result for {sorted(set(columns) - set(per_col))}")
    emb_score = None
    for m in ev.get("metrics") or []:
        if str((m.get("config") or {}).get("type", "")).endswith("EmbeddingsDrift"):
            v = m.get("value")
            emb_score = float(v if not isinstance(v, dict) else v.get("value"))
    if emb_score is None or emb_score != emb_score:  # fail closed: no verdict on embeddings is no verdict
        raise DataError("Evidently returned no embedding drift score; the window cannot be judged")
    drifted = [c for c, v in per_col.items() if v["drifted"]]
    share = len(drifted) / len(per_col)
    emb_drift = emb_score >= embedding_threshold
    ref_mix = ref["predicted_class"].astype(str).value_counts(normalize=True).round(4).to_dict()
    cur_mix = current["predicted_class"].astype(str).value_counts(normalize=True).round(4).to_dict()
    html = out_dir / "served_drift.html"
    atomic_write_text(html, snap.get_html_str(as_iframe=False))
    result = {**base, "status": "ok", "drift_detected": bool(share >= drift_share_threshold or emb_drift),
              "drifted_share": share, "drifted_columns": drifted, "columns": per_col,
              "embedding_drift_score": emb_score, "embedding_drift": bool(emb_drift),
              "class_mix": {"reference": ref_mix, "current": cur_mix},
              "report_html": str(html), "duration_s": round(time.perf_counter() - started, 3)}
    atomic_write_text(report_json, json.dumps({"summary": result, "evidently": ev}, indent=2, sort_keys=True,
                                              allow_nan=False, default=str) + "\n")
    log.info("served drift: %d/%d features drifted (share %.2f), embedding score %s -> %s", len(drifted),
             len(per_col), share, emb_score, "DRIFT" if result["drift_detected"] else "no drift")
    return result

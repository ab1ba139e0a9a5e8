"""Data drift between two snapshots' profile tables, with Evidently 0.7.

:func:`check_drift` compares the per-image statistics of new data (``current``)
with the data the champion model was trained on (``reference``) using
Evidently's :class:`~evidently.presets.DataDriftPreset`: one ``ValueDrift``
metric per column (Evidently picks the statistical test from the column type
and sample size: K-S / chi-square up to 1,000 rows, normed Wasserstein /
Jensen-Shannon above) and a ``DriftedColumnsCount``. The dataset counts as
drifted when the share of drifted columns reaches ``drift_share_threshold``
(Evidently's own rule: ``share >= drift_share``).

Evidently is imported inside :func:`check_drift` (about 3-4 s).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import pandas as pd

from nightshift.artifacts import atomic_write_json, atomic_write_text, json_safe
from nightshift.contracts import DRIFT_HTML_FILE, DRIFT_JSON_FILE
from nightshift.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Numerical profile columns always compared (``mean_ch*`` are added per channel).
BASE_NUMERICAL_COLUMNS: tuple[str, ...] = ("brightness", "contrast")
#: Categorical profile columns compared.
CATEGORICAL_COLUMNS: tuple[str, ...] = ("label_name",)

_MEAN_CH = re.compile(r"^mean_ch(\d+)$")


def drift_columns(profile: pd.DataFrame) -> list[str]:
    """The numerical profile columns drift is measured on.

    ``brightness``, ``contrast`` and every ``mean_ch<k>`` present, in channel
    order. The categorical columns (:data:`CATEGORICAL_COLUMNS`, i.e.
    ``label_name``) are compared as well, separately.

    :param profile: a profile table (``docs/architecture.md``).
    :returns: column names, e.g. ``["brightness", "contrast", "mean_ch0"]``.
    :raises DataError: ``brightness`` or ``contrast`` is missing.
    """
    missing = [c for c in BASE_NUMERICAL_COLUMNS if c not in profile.columns]
    if missing:
        raise DataError(
            f"profile lacks column(s) {', '.join(missing)} needed for drift detection; "
            f"it has {', '.join(map(str, profile.columns))}"
        )
    channels = sorted(
        (int(m.group(1)), str(col)) for col in profile.columns if (m := _MEAN_CH.match(str(col)))
    )
    return list(BASE_NUMERICAL_COLUMNS) + [col for _, col in channels]


def _to_float(value: Any) -> float | None:
    """A metric value as float: plain numbers, or ``{"value": x}`` shapes."""
    if isinstance(value, dict):
        for key in ("value", "share", "count"):
            if key in value:
                return _to_float(value[key])
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _drifted_by_direction(method: str, score: float, threshold: float) -> bool:
    """Fallback when Evidently reported no per-column test: p-values drift when small, distances when large."""
    if "p_value" in method.lower():
        return score <= threshold
    return score >= threshold


def _parse_snapshot(snapshot_dict: dict[str, Any], column_types: dict[str, str]) -> dict[str, Any]:
    """Pull per-column scores and the drifted-columns count out of ``Snapshot.dict()``.

    Evidently 0.7 shape: ``{"metrics": [{"id", "metric_name", "config": {"type", ...}, "value"}],
    "tests": [{"status", "metric_config": {"metric_id", "params"}, ...}]}``; a ``ValueDrift``
    value is the drift score, a ``DriftedColumnsCount`` value is ``{"count", "share"}``, and with
    ``include_tests=True`` each ``ValueDrift`` gets a test whose status is ``FAIL`` when Evidently
    detected drift in that column.
    """
    status_by_metric: dict[str, str] = {}
    for test in snapshot_dict.get("tests") or []:
        metric_id = (test.get("metric_config") or {}).get("metric_id")
        if metric_id is not None and test.get("status") is not None:
            status = test["status"]
            status_by_metric[str(metric_id)] = str(getattr(status, "value", status)).upper()

    columns: dict[str, dict[str, Any]] = {}
    count: float | None = None
    share: float | None = None
    for metric in snapshot_dict.get("metrics") or []:
        config = metric.get("config") or {}
        kind = str(config.get("type", "")).rsplit(":", 1)[-1]
        if kind == "ValueDrift":
            column = str(config.get("column"))
            method = str(config.get("method") or "unknown")
            threshold = _to_float(config.get("threshold"))
            score = _to_float(metric.get("value"))
            status = status_by_metric.get(str(metric.get("id")))
            if status is not None:
                drifted = status == "FAIL"
            elif score is not None and threshold is not None:
                drifted = _drifted_by_direction(method, score, threshold)
            else:
                drifted = False
            columns[column] = {
                "score": score,
                "drifted": bool(drifted),
                "method": method,
                "threshold": threshold,
                "type": column_types.get(column, "unknown"),
            }
        elif kind == "DriftedColumnsCount":
            value = metric.get("value")
            if isinstance(value, dict):
                count = _to_float(value.get("count"))
                share = _to_float(value.get("share"))
    return {"columns": columns, "count": count, "share": share}


def _frame_for_drift(frame: pd.DataFrame, numerical: list[str], categorical: list[str]) -> pd.DataFrame:
    out = pd.DataFrame(index=range(len(frame)))
    for col in numerical:
        out[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64").to_numpy()
    for col in categorical:
        out[col] = frame[col].astype("string").fillna("<missing>").astype(str).to_numpy()
    return out


def check_drift(
    reference: pd.DataFrame | None,
    current: pd.DataFrame,
    out_dir: Path,
    *,
    drift_share_threshold: float = 0.5,
) -> dict[str, Any]:
    """Compare ``current`` with ``reference`` profile tables and write an Evidently report.

    With no reference (first run, no champion yet) nothing is compared: a small
    ``drift_report.json`` records that and the result has
    ``status == "no_reference"`` and ``drift_detected`` false; that is not a failure.

    :param reference: profile table of the champion's training data, or ``None``.
    :param current: profile table of the new data.
    :param out_dir: folder for ``drift_report.html`` and ``drift_report.json`` (created if needed).
    :param drift_share_threshold: dataset drift when at least this share of columns drifted.
    :returns: ``{"status", "drift_detected", "drifted_share", "n_drifted", "n_columns", "columns",
        "report_html", "report_json", "n_reference", "n_current", ...}`` where ``columns`` maps each
        compared column to ``{"score", "drifted", "method", "threshold", "type"}``.
    :raises ConfigError: ``drift_share_threshold`` outside ``(0, 1]``.
    :raises DataError: empty data, or columns needed for drift detection are missing.
    """
    if not 0.0 < drift_share_threshold <= 1.0:
        raise ConfigError(f"drift_share_threshold must be in (0, 1], got {drift_share_threshold}")
    if not isinstance(current, pd.DataFrame) or current.empty:
        raise DataError("current profile is empty: there is no new data to check for drift")
    out_dir = Path(out_dir)
    report_json = out_dir / DRIFT_JSON_FILE
    started = time.perf_counter()

    if reference is None:
        result: dict[str, Any] = {
            "status": "no_reference",
            "drift_detected": False,
            "drifted_share": None,
            "n_drifted": None,
            "n_columns": None,
            "columns": {},
            "report_html": None,
            "report_json": str(report_json),
            "n_reference": 0,
            "n_current": int(len(current)),
            "drift_share_threshold": drift_share_threshold,
            "message": "no reference data (no champion model yet): drift not measured",
        }
        atomic_write_json(report_json, {"summary": result})
        log.info("drift check skipped: no reference data")
        return result

    if reference.empty:
        raise DataError("reference profile is empty: cannot compare the new data with it")

    cur_numerical = drift_columns(current)
    ref_numerical = drift_columns(reference)
    numerical = [c for c in cur_numerical if c in ref_numerical]
    skipped = sorted(set(cur_numerical) ^ set(ref_numerical))
    if skipped:
        log.warning("drift check: column(s) %s are not in both profiles and are skipped", ", ".join(skipped))
    categorical = [c for c in CATEGORICAL_COLUMNS if c in current.columns and c in reference.columns]
    skipped += [c for c in CATEGORICAL_COLUMNS if c not in categorical]
    column_types = {**{c: "numerical" for c in numerical}, **{c: "categorical" for c in categorical}}
    compared = numerical + categorical

    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    reference_ds = Dataset.from_pandas(
        _frame_for_drift(reference, numerical, categorical), data_definition=definition
    )
    current_ds = Dataset.from_pandas(_frame_for_drift(current, numerical, categorical), data_definition=definition)
    report = Report(
        [DataDriftPreset(columns=compared, drift_share=drift_share_threshold)],
        include_tests=True,  # per-column pass/fail as Evidently decides it
    )
    snapshot = report.run(current_data=current_ds, reference_data=reference_ds)
    evidently_dict = json_safe(snapshot.dict())

    parsed = _parse_snapshot(evidently_dict, column_types)
    columns = {c: parsed["columns"][c] for c in compared if c in parsed["columns"]}
    absent = [c for c in compared if c not in columns]
    if absent:
        raise DataError(f"Evidently returned no drift result for column(s) {', '.join(absent)}")
    n_columns = len(columns)
    n_drifted = sum(1 for v in columns.values() if v["drifted"])
    drifted_share = n_drifted / n_columns
    if parsed["count"] is not None and int(parsed["count"]) != n_drifted:
        log.warning(
            "drift check: Evidently counted %s drifted columns, per-column tests say %d; using the per-column tests",
            parsed["count"],
            n_drifted,
        )
    drift_detected = drifted_share >= drift_share_threshold

    report_html = out_dir / DRIFT_HTML_FILE
    atomic_write_text(report_html, snapshot.get_html_str(as_iframe=False))
    result = {
        "status": "ok",
        "drift_detected": bool(drift_detected),
        "drifted_share": float(drifted_share),
        "n_drifted": int(n_drifted),
        "n_columns": int(n_columns),
        "columns": columns,
        "drifted_columns": [c for c, v in columns.items() if v["drifted"]],
        "skipped_columns": skipped,
        "report_html": str(report_html),
        "report_json": str(report_json),
        "n_reference": int(len(reference)),
        "n_current": int(len(current)),
        "drift_share_threshold": drift_share_threshold,
        "duration_s": round(time.perf_counter() - started, 3),
    }
    atomic_write_text(
        report_json,
        json.dumps({"summary": result, "evidently": evidently_dict}, indent=2, sort_keys=True, allow_nan=False) + "\n",
    )
    log.info(
        "drift check: %d of %d columns drifted (share %.2f, threshold %.2f) -> drift %s",
        n_drifted,
        n_columns,
        drifted_share,
        drift_share_threshold,
        "DETECTED" if drift_detected else "not detected",
    )
    return result

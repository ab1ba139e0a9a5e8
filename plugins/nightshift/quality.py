"""Data validation of a snapshot with Great Expectations 1.x.

:func:`validate_snapshot` checks a snapshot's per-image profile table and its
manifest (formats in ``docs/architecture.md``) against a
:class:`ValidationConfig`. Every check is a Great Expectations expectation run
by GX itself through an ephemeral data context (pandas data source, one
dataframe asset per frame, a whole-dataframe batch definition, an
:class:`~great_expectations.core.ExpectationSuite` and ``batch.validate``).
Checks that span rows (train/test duplicates, per-class counts) or come from
the manifest (undecodable files) are first turned into small derived frames
with pandas, and GX validates those frames, so every check shows up in the
result in the same shape.

Two kinds of check. **Integrity** checks (schema, nulls, shape, label set,
undecodable or unread files, too few rows or images per class, train/test
leakage, identical pixels under two labels) fail the validation on any
offending row. **Appearance** checks (per-image brightness range, minimum
contrast) describe what an image usually looks like, and real data has
legitimate outliers (a sky crop, a product on a white background): each fails
only when more than ``ValidationConfig.max_outlier_share`` of the images are
outside its range. Either way the report lists the outlier images (source
path, row index, value, the range) under ``appearance``.

Great Expectations is imported inside the functions that need it (about 2-3 s),
so importing this module for :class:`ValidationConfig` stays cheap.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from nightshift.artifacts import atomic_write_json, json_safe
from nightshift.contracts import VALIDATION_FILE
from nightshift.errors import ConfigError, DataError, ValidationFailed

log = logging.getLogger(__name__)

#: Splits a profile row may belong to.
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Columns every profile has, whatever the channel count (``mean_ch*`` come on top).
BASE_COLUMNS: tuple[str, ...] = (
    "image_id",
    "sha256",
    "split",
    "label",
    "label_name",
    "orig_height",
    "orig_width",
    "orig_channels",
    "height",
    "width",
    "channels",
    "brightness",
    "contrast",
    "source",
)

#: How many offending values/rows a summary sentence names before "and N more".
_SHOW = 5
#: How many offending rows GX returns per expectation (and ``details`` keeps).
_PARTIAL = 20
#: How many outlier images the report lists per appearance check (the count is always complete).
OUTLIER_LIST = 100
#: Default share of images each appearance check tolerates outside its range.
DEFAULT_MAX_OUTLIER_SHARE = 0.02

_DATASOURCE = "nightshift"
_PROFILE = "profile"
_UNDECODABLE = "undecodable_files"
_CLASS_COUNTS = "train_class_counts"
_OVERLAP = "train_test_overlap"
_CONFLICTS = "conflicting_labels"


@dataclass
class ValidationConfig:
    """What a valid snapshot looks like.

    :param class_names: expected class list, in label-index order; ``None`` uses
        ``manifest["class_names"]``.
    :param image_shape: expected ``(height, width, channels)`` after conversion.
    :param min_rows: the profile must have at least this many rows (decoded images).
    :param min_per_class: every class needs at least this many ``train`` images.
    :param brightness_range: allowed ``(low, high)`` of per-image mean pixel value, inclusive
        (an appearance check).
    :param min_contrast: per-image pixel std should be at least this (an appearance check:
        blank frames are outliers).
    :param max_outlier_share: the largest share of images (0..1) each appearance check
        (brightness, contrast) may find outside its range and still pass; default 0.02
        (2%: at least one image in any set of 50 or more). ``0`` makes every image count.
        Outliers are listed in the report either way. Integrity checks (schema, nulls,
        shape, labels, undecodable files, per-class counts, leakage, conflicting labels)
        are always strict.
    """

    class_names: list[str] | None
    image_shape: tuple[int, int, int]
    min_rows: int = 50
    min_per_class: int = 5
    brightness_range: tuple[float, float] = (5.0, 250.0)
    min_contrast: float = 1.0
    max_outlier_share: float = DEFAULT_MAX_OUTLIER_SHARE

    def __post_init__(self) -> None:
        shape = tuple(self.image_shape)
        if len(shape) != 3 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in shape):
            raise ConfigError(
                f"image_shape must be three positive integers (height, width, channels), got {self.image_shape!r}"
            )
        self.image_shape = tuple(int(v) for v in shape)  # type: ignore[assignment]
        if self.class_names is not None:
            names = [str(c) for c in self.class_names]
            if not names or len(set(names)) != len(names):
                raise ConfigError(f"class_names must be a non-empty list of distinct names, got {self.class_names!r}")
            self.class_names = names
        lo, hi = (float(v) for v in self.brightness_range)
        if not lo < hi:
            raise ConfigError(f"brightness_range must be (low, high) with low < high, got {self.brightness_range!r}")
        self.brightness_range = (lo, hi)
        if self.min_rows < 0 or self.min_per_class < 0:
            raise ConfigError(
                f"min_rows and min_per_class must be >= 0, got {self.min_rows} and {self.min_per_class}"
            )
        share = float(self.max_outlier_share)
        if not 0.0 <= share <= 1.0:
            raise ConfigError(
                "max_outlier_share must be a share of images in [0, 1] (e.g. 0.02 for 2%), "
                f"got {self.max_outlier_share!r}"
            )
        self.max_outlier_share = share

    @property
    def mostly(self) -> float:
        """GX ``mostly`` of the appearance checks: passes while outliers are at most ``max_outlier_share``
        (a hair below ``1 - share`` so that exactly that share, e.g. 1 of 50 at 2%, passes despite rounding)."""
        return 1.0 if self.max_outlier_share == 0 else max(0.0, 1.0 - self.max_outlier_share - 1e-9)

    def allowed_outliers(self, n: int) -> int:
        """How many of ``n`` images an appearance check tolerates outside its range."""
        return int(np.floor(self.max_outlier_share * n + 1e-9))


# --------------------------------------------------------------------------- helpers


def _fmt(value: Any) -> str:
    """Short human form of a number (``5``, ``250``, ``0.25``) or other value."""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value)


def _listing(items: Sequence[str], total: int | None = None, show: int = _SHOW) -> str:
    """``a, b, c`` or ``a, b, c and 7 more``."""
    total = len(items) if total is None else total
    shown = ", ".join(str(i) for i in list(items)[:show])
    rest = total - min(len(items), show)
    return f"{shown} and {rest} more" if rest > 0 else shown


def _offending(result: dict[str, Any], value_column: str | None) -> list[dict[str, Any]]:
    """The offending rows GX reported (``partial_unexpected_index_list``), JSON-safe."""
    rows = result.get("partial_unexpected_index_list") or []
    out = [json_safe(r) for r in rows if isinstance(r, dict)]
    if not out and value_column is not None:
        out = [{value_column: json_safe(v)} for v in result.get("partial_unexpected_list") or []]
    return out


def _row_names(rows: list[dict[str, Any]]) -> list[str]:
    """Name offending rows by ``source``, else ``image_id``, else their content."""
    names = []
    for r in rows:
        if r.get("source") is not None:
            names.append(str(r["source"]))
        elif r.get("image_id") is not None:
            names.append(f"image_id {r['image_id']}")
        else:
            names.append(str(r))
    return names


# --------------------------------------------------------------------------- checks


@dataclass
class _Check:
    """One expectation plus how to phrase its failure.

    ``summarize(gx_result_dict)`` returns ``(observed, summary, details)``: the JSON-safe
    observed value, one human sentence with the numbers, and the offending rows/files.
    """

    name: str
    frame: str
    expectation: Any
    column: str | None
    summarize: Callable[[dict[str, Any]], tuple[Any, str, Any]]
    kind: str = "integrity"  # or "appearance": tolerated up to ValidationConfig.max_outlier_share
    appearance: _Appearance | None = None  # an appearance check's outliers (computed with pandas)


def _map_summary(
    column: str,
    n_rows: int,
    condition: str,
    *,
    show_values: bool = True,
) -> Callable[[dict[str, Any]], tuple[Any, str, Any]]:
    """Summarizer for per-row (map) expectations: count, condition, offending sources."""

    def summarize(res: dict[str, Any]) -> tuple[Any, str, Any]:
        count = int(res.get("unexpected_count") or 0)
        rows = _offending(res, column)
        observed = {
            "unexpected_count": count,
            "unexpected_percent": json_safe(res.get("unexpected_percent")),
            "partial_unexpected_list": json_safe((res.get("partial_unexpected_list") or [])[:_PARTIAL]),
        }
        text = f"{count} of {n_rows} rows have {condition}"
        values = sorted({_fmt(v) for v in res.get("partial_unexpected_list") or [] if json_safe(v) is not None})
        if show_values and values:
            text += f" (values {_listing(values)})"
        if rows and any(("source" in r or "image_id" in r) for r in rows):
            text += f": {_listing(_row_names(rows), count)}"
        return observed, text, rows

    return summarize


def _outliers(profile: pd.DataFrame, column: str, low: float | None, high: float | None) -> tuple[pd.Series, int]:
    """``(mask, considered)``: the rows whose non-null ``column`` is outside ``[low, high]`` (inclusive
    bounds, as GX's ``expect_column_values_to_be_between``), and how many non-null rows there are."""
    values = pd.to_numeric(profile[column], errors="coerce")
    mask = pd.Series(False, index=profile.index)
    if low is not None:
        mask |= values < low
    if high is not None:
        mask |= values > high
    return mask & values.notna(), int(values.notna().sum())


def _outlier_images(profile: pd.DataFrame, column: str, mask: pd.Series, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` outlier rows: ``{"index", "image_id", "source", "value"}`` (what is present)."""
    rows = profile.loc[mask].head(limit)
    out = []
    for index, row in rows.iterrows():
        item: dict[str, Any] = {"index": int(index)}
        for key in ("image_id", "source"):
            if key in profile.columns:
                item[key] = json_safe(row[key])
        item["value"] = json_safe(round(float(row[column]), 4))
        out.append(item)
    return out


@dataclass
class _Appearance:
    """One appearance check's outliers, computed with pandas (GX decides pass/fail)."""

    check: str
    column: str
    low: float | None
    high: float | None
    condition: str
    mask: pd.Series
    considered: int

    def entry(self, profile: pd.DataFrame, config: ValidationConfig, count: int, passed: bool) -> dict[str, Any]:
        """What the report lists for this check: counts, the range, the tolerance and the outlier images."""
        n = self.considered
        allowed = config.allowed_outliers(n)
        images = _outlier_images(profile, self.column, self.mask, OUTLIER_LIST)
        share = count / n if n else 0.0
        named = [f"{i.get('source', 'row ' + str(i['index']))} ({_fmt(i['value'])})" for i in images]
        text = f"{count} of {n} images ({100 * share:.3g}%) have {self.condition}"
        if named:
            text += f": {_listing(named, count)}"
        tolerance = (f"{100 * config.max_outlier_share:g}% ({allowed} of {n}) tolerated "
                     f"(max_outlier_share={config.max_outlier_share:g})")
        text += f"; {'within' if passed else 'more than'} the {tolerance}"
        return {
            "check": self.check,
            "column": self.column,
            "range": [self.low, self.high],
            "rows": n,
            "outliers": int(count),
            "share": round(share, 6),
            "max_share": config.max_outlier_share,
            "allowed": allowed,
            "passed": bool(passed),
            "summary": text,
            "listed": len(images),
            "images": images,
        }


def _profile_checks(profile: pd.DataFrame, config: ValidationConfig, class_names: list[str]) -> list[_Check]:
    """Expectations on the profile table itself."""
    import great_expectations.expectations as gxe

    n = len(profile)
    h, w, c = config.image_shape
    present = set(profile.columns)
    required = list(BASE_COLUMNS) + [f"mean_ch{i}" for i in range(c)]
    lo, hi = config.brightness_range
    checks: list[_Check] = []

    def add(name: str, expectation: Any, column: str | None, summarize: Callable, kind: str = "integrity",
            appearance: _Appearance | None = None) -> None:
        expectation.meta = {"check": name, "kind": kind}
        checks.append(_Check(name, _PROFILE, expectation, column, summarize, kind, appearance))

    def row_count(res: dict[str, Any]) -> tuple[Any, str, Any]:
        obs = res.get("observed_value")
        return obs, f"profile has {obs} rows (decoded images); at least {config.min_rows} required", None

    add("min_rows", gxe.ExpectTableRowCountToBeBetween(min_value=config.min_rows), None, row_count)

    def schema(res: dict[str, Any]) -> tuple[Any, str, Any]:
        missing = ((res.get("details") or {}).get("mismatched") or {}).get("missing", [])
        return missing, f"profile lacks required column(s) {', '.join(missing)}; checks on them were skipped", None

    add("schema", gxe.ExpectTableColumnsToMatchSet(column_set=required, exact_match=False), None, schema)

    for col in profile.columns:
        add(
            f"not_null:{col}",
            gxe.ExpectColumnValuesToNotBeNull(column=str(col)),
            str(col),
            _map_summary(str(col), n, f"a null {col}", show_values=False),
        )

    if "image_id" in present:
        add(
            "unique_image_id",
            gxe.ExpectColumnValuesToBeUnique(column="image_id"),
            "image_id",
            _map_summary("image_id", n, "a duplicated image_id", show_values=False),
        )

    if "label_name" in present:

        def label_set(res: dict[str, Any]) -> tuple[Any, str, Any]:
            extra = [str(v) for v in res.get("partial_unexpected_list") or []]
            missing = [str(v) for v in res.get("partial_missing_list") or []]
            parts = []
            if extra:
                parts.append(f"not in the class list: {_listing(sorted(extra), show=10)}")
            if missing:
                parts.append(f"classes with no images: {_listing(sorted(missing), show=10)}")
            text = f"label_name values differ from the {len(class_names)} expected classes ({'; '.join(parts)})"
            return {"unexpected": extra, "missing": missing}, text, None

        add(
            "label_set",
            gxe.ExpectColumnDistinctValuesToEqualSet(column="label_name", value_set=list(class_names)),
            "label_name",
            label_set,
        )

    if "label" in present:
        add(
            "label_range",
            gxe.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=len(class_names) - 1),
            "label",
            _map_summary("label", n, f"label outside [0, {len(class_names) - 1}]"),
        )

    if {"label", "label_name"} <= present:
        add(
            "label_name_matches_label",
            gxe.ExpectColumnPairValuesToBeInSet(
                column_A="label",
                column_B="label_name",
                value_pairs_set=[(i, name) for i, name in enumerate(class_names)],
            ),
            "label_name",
            _map_summary("label_name", n, "a (label, label_name) pair that does not match the class list"),
        )

    if "split" in present:
        add(
            "split_values",
            gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
            "split",
            _map_summary("split", n, f"split not in {list(SPLITS)}"),
        )

    for col, expected in (("height", h), ("width", w), ("channels", c)):
        if col in present:
            add(
                f"shape:{col}",
                gxe.ExpectColumnValuesToBeInSet(column=col, value_set=[expected]),
                col,
                _map_summary(col, n, f"{col} != {expected} (configured shape {h}x{w}x{c})"),
            )

    # appearance: each tolerates up to max_outlier_share of the images outside its range
    appearance = []
    if "brightness" in present:
        appearance.append(("brightness_range", "brightness", lo, hi, f"brightness outside [{_fmt(lo)}, {_fmt(hi)}]"))
    if "contrast" in present:
        appearance.append(("min_contrast", "contrast", config.min_contrast, None,
                           f"contrast (pixel std) below {_fmt(config.min_contrast)} (blank or near-blank images)"))
    for name, col, low, high, condition in appearance:
        mask, considered = _outliers(profile, col, low, high)
        info = _Appearance(name, col, low, high, condition, mask, considered)

        def summarize(res: dict[str, Any], info: _Appearance = info) -> tuple[Any, str, Any]:
            count = int(res.get("unexpected_count") or 0)
            entry = info.entry(profile, config, count, passed=False)
            observed = {
                "unexpected_count": count,
                "unexpected_percent": json_safe(res.get("unexpected_percent")),
                "max_outlier_share": config.max_outlier_share,
                "allowed": entry["allowed"],
            }
            return observed, entry["summary"], entry["images"][:_PARTIAL]

        add(
            name,
            gxe.ExpectColumnValuesToBeBetween(column=col, min_value=low, max_value=high, mostly=config.mostly),
            col,
            summarize,
            kind="appearance",
            appearance=info,
        )
    return checks


def _undecodable_frame(manifest: dict[str, Any]) -> pd.DataFrame:
    entries = manifest.get("undecodable") or []
    rows = []
    for e in entries:
        if isinstance(e, dict):
            rows.append({"path": str(e.get("path", "?")), "error": str(e.get("error", "?"))})
        else:
            rows.append({"path": str(e), "error": "?"})
    return pd.DataFrame(rows, columns=["path", "error"])


def _class_count_frame(profile: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """Train images per class, one row per expected class (0 when absent) plus any unexpected name."""
    train = profile.loc[profile["split"] == "train", "label_name"].dropna().astype(str)
    counts = train.value_counts()
    names = list(class_names) + sorted(set(counts.index) - set(class_names))
    return pd.DataFrame(
        {"label_name": names, "count": [int(counts.get(name, 0)) for name in names]},
        columns=["label_name", "count"],
    )


def _overlap_frame(profile: pd.DataFrame) -> pd.DataFrame:
    """One row per test image whose sha256 also appears in train."""
    cols = ["sha256", "test_source", "train_source"]
    has_source = "source" in profile.columns
    src = profile["source"].astype(str) if has_source else profile.index.astype(str)
    frame = pd.DataFrame({"sha256": profile["sha256"], "split": profile["split"], "source": src})
    frame = frame.dropna(subset=["sha256"])  # null hashes are reported by the not-null check, not matched here
    train = frame[frame["split"] == "train"].drop_duplicates("sha256")
    test = frame[frame["split"] == "test"]
    merged = test.merge(train, on="sha256", suffixes=("_test", "_train"))
    return pd.DataFrame(
        {
            "sha256": merged["sha256"].astype(str),
            "test_source": merged["source_test"].astype(str),
            "train_source": merged["source_train"].astype(str),
        },
        columns=cols,
    )


def _conflict_frame(profile: pd.DataFrame) -> pd.DataFrame:
    """One row per image whose pixels (``sha256``) also appear under another label."""
    cols = ["sha256", "label", "source", "index"]
    label_col = "label_name" if "label_name" in profile.columns else "label"
    src = profile["source"].astype(str) if "source" in profile.columns else profile.index.map(lambda i: f"row {i}")
    frame = pd.DataFrame(
        {"sha256": profile["sha256"], "label": profile[label_col], "source": src, "index": profile.index}
    ).dropna(subset=["sha256", "label"])  # nulls are reported by the not-null checks, not matched here
    frame["label"] = frame["label"].astype(str)
    labels = frame.groupby("sha256")["label"].transform("nunique")
    out = frame[labels > 1].sort_values(["sha256", "label", "source"])
    return pd.DataFrame(
        {
            "sha256": out["sha256"].astype(str),
            "label": out["label"],
            "source": out["source"],
            "index": out["index"].astype(int),
        },
        columns=cols,
    ).reset_index(drop=True)


def _derived_checks(
    profile: pd.DataFrame, manifest: dict[str, Any], config: ValidationConfig, class_names: list[str]
) -> tuple[dict[str, pd.DataFrame], list[_Check]]:
    """Frames computed with pandas and the expectations GX runs on them."""
    import great_expectations.expectations as gxe

    frames: dict[str, pd.DataFrame] = {}
    checks: list[_Check] = []

    undecodable = _undecodable_frame(manifest)
    frames[_UNDECODABLE] = undecodable

    def undecodable_summary(res: dict[str, Any]) -> tuple[Any, str, Any]:
        files = undecodable.to_dict("records")
        named = [f"{f['path']} ({f['error']})" for f in files]
        text = f"{len(files)} source file(s) could not be read or decoded: {_listing(named, show=10)}"
        return len(files), text, files[:_PARTIAL]

    exp = gxe.ExpectTableRowCountToEqual(value=0, meta={"check": "no_undecodable"})
    checks.append(_Check("no_undecodable", _UNDECODABLE, exp, None, undecodable_summary))

    if {"split", "label_name"} <= set(profile.columns):
        counts = _class_count_frame(profile, class_names)
        frames[_CLASS_COUNTS] = counts

        def per_class_summary(res: dict[str, Any]) -> tuple[Any, str, Any]:
            short = counts[counts["count"] < config.min_per_class]
            named = [f"'{r.label_name}' ({r.count})" for r in short.itertuples()]
            text = (
                f"{len(short)} of {len(counts)} classes have fewer than {config.min_per_class} "
                f"train images: {_listing(named, show=10)}"
            )
            observed = dict(zip(counts["label_name"], counts["count"].astype(int)))
            return json_safe(observed), text, json_safe(short.to_dict("records"))

        exp = gxe.ExpectColumnValuesToBeBetween(
            column="count", min_value=config.min_per_class, meta={"check": "min_per_class"}
        )
        checks.append(_Check("min_per_class", _CLASS_COUNTS, exp, "label_name", per_class_summary))

    if {"split", "sha256"} <= set(profile.columns):
        overlap = _overlap_frame(profile)
        frames[_OVERLAP] = overlap

        def overlap_summary(res: dict[str, Any]) -> tuple[Any, str, Any]:
            n_hashes = overlap["sha256"].nunique()
            named = [
                f"{r.sha256[:12]} (test {r.test_source} = train {r.train_source})"
                for r in overlap.drop_duplicates("sha256").itertuples()
            ]
            text = (
                f"{len(overlap)} test image(s) also appear in train ({n_hashes} distinct sha256): "
                f"{_listing(named, n_hashes)}"
            )
            return len(overlap), text, overlap.head(_PARTIAL).to_dict("records")

        exp = gxe.ExpectTableRowCountToEqual(value=0, meta={"check": "no_train_test_overlap"})
        checks.append(_Check("no_train_test_overlap", _OVERLAP, exp, "sha256", overlap_summary))

    if "sha256" in profile.columns and ({"label_name", "label"} & set(profile.columns)):
        conflicts = _conflict_frame(profile)
        frames[_CONFLICTS] = conflicts

        def conflict_summary(res: dict[str, Any]) -> tuple[Any, str, Any]:
            groups = []
            for sha, grp in conflicts.groupby("sha256", sort=True):
                groups.append(
                    {
                        "sha256": sha,
                        "labels": sorted(grp["label"].unique().tolist()),
                        "images": [
                            {"source": r.source, "index": int(r.index), "label": r.label} for r in grp.itertuples()
                        ],
                    }
                )
            named = []
            for g in groups:
                files = ", ".join(f"{i['source']} as {i['label']!r}" for i in g["images"])
                named.append(f"{g['sha256'][:12]} ({files})")
            text = (
                f"{len(groups)} image(s) have identical pixels under different labels ({len(conflicts)} files): "
                f"{_listing(named, len(groups))}"
            )
            return len(groups), text, groups[:_PARTIAL]

        exp = gxe.ExpectTableRowCountToEqual(value=0, meta={"check": "no_conflicting_labels"})
        checks.append(_Check("no_conflicting_labels", _CONFLICTS, exp, "label_name", conflict_summary))

    return frames, checks


# --------------------------------------------------------------------------- GX plumbing


def _quiet_gx() -> None:
    """Turn GX usage analytics off for this process and its import-time INFO chatter
    (~200 "Skipping registering function ..." / "Multiple declarations of metric ..."
    lines) down to warnings; call before GX is imported."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    for name in ("great_expectations._docs_decorators", "great_expectations.expectations.registry"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _ephemeral_context() -> Any:
    """An in-memory GX context: no analytics, no progress bars, no temporary data-docs site."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        # without this every validation prints tqdm "Calculating Metrics" bars to stderr
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _exception_message(exception_info: Any) -> str | None:
    """The first exception message in a GX result's ``exception_info`` (flat or keyed by metric)."""
    if not exception_info:
        return None
    if isinstance(exception_info, dict):
        if exception_info.get("raised_exception"):
            return str(exception_info.get("exception_message"))
        for value in exception_info.values():
            if isinstance(value, dict) and value.get("raised_exception"):
                return str(value.get("exception_message"))
    return None


def _run_suites(
    frames: dict[str, pd.DataFrame], checks: list[_Check], index_columns: dict[str, list[str]]
) -> dict[str, Any]:
    """Validate each frame with the suite of its checks; return ``{frame: ExpectationSuiteValidationResult}``."""
    import great_expectations as gx

    context = _ephemeral_context()
    datasource = context.data_sources.add_pandas(name=_DATASOURCE)
    results: dict[str, Any] = {}
    for frame_name, frame in frames.items():
        frame_checks = [c for c in checks if c.frame == frame_name]
        if not frame_checks:
            continue
        asset = datasource.add_dataframe_asset(name=frame_name)
        batch_definition = asset.add_batch_definition_whole_dataframe(f"{frame_name}_whole")
        batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
        suite = gx.ExpectationSuite(name=f"nightshift_{frame_name}")
        for check in frame_checks:
            suite.add_expectation(check.expectation)
        result_format: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": _PARTIAL}
        if index_columns.get(frame_name):
            result_format["unexpected_index_column_names"] = index_columns[frame_name]
        results[frame_name] = batch.validate(suite, result_format=result_format)
    return results


# --------------------------------------------------------------------------- public API


def _statistics(
    profile: pd.DataFrame, frames: dict[str, pd.DataFrame], n_evaluated: int, n_failed: int
) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "evaluated_expectations": n_evaluated,
        "successful_expectations": n_evaluated - n_failed,
        "unsuccessful_expectations": n_failed,
        "success_percent": round(100.0 * (n_evaluated - n_failed) / n_evaluated, 2) if n_evaluated else None,
        "rows": int(len(profile)),
        "undecodable": int(len(frames[_UNDECODABLE])),
    }
    if "split" in profile.columns:
        stats["per_split"] = json_safe(profile["split"].value_counts(dropna=False).to_dict())
    if _CLASS_COUNTS in frames:
        counts = frames[_CLASS_COUNTS]
        stats["per_class_train"] = json_safe(dict(zip(counts["label_name"], counts["count"])))
    if _OVERLAP in frames:
        stats["train_test_overlap"] = int(len(frames[_OVERLAP]))
    if _CONFLICTS in frames:
        stats["conflicting_labels"] = int(frames[_CONFLICTS]["sha256"].nunique())
    for col in ("brightness", "contrast"):
        if col in profile.columns and len(profile):
            values = pd.to_numeric(profile[col], errors="coerce")
            stats[col] = json_safe(
                {"min": values.min(), "mean": values.mean(), "max": values.max(), "std": values.std()}
            )
    return stats


def validate_snapshot(
    profile: pd.DataFrame,
    manifest: dict[str, Any],
    config: ValidationConfig,
    report_dir: Path,
) -> dict[str, Any]:
    """Validate a snapshot's profile table and manifest with Great Expectations.

    Checks (each one GX expectation): minimum row count; required columns
    present; no nulls in any column; unique ``image_id``; ``label_name`` set
    equals the class list; ``label`` within ``0..num_classes-1`` and consistent
    with ``label_name``; ``split`` in train/val/test; ``height``/``width``/
    ``channels`` equal the configured shape; no undecodable (or unread) files
    in the manifest; at least ``min_per_class`` train images per class; no
    image (same ``sha256``) in both train and test; no image (same ``sha256``)
    under two labels. These integrity checks fail on any offending row.

    Appearance checks: per-image brightness within ``brightness_range`` and
    contrast at least ``min_contrast``; each fails only when more than
    ``max_outlier_share`` of the images are outside its range. The outliers
    are listed under ``appearance`` (and, when tolerated, in ``warnings``)
    whether the check passed or not.

    Never raises on failed expectations: call :func:`raise_for_failures` for
    that. The full GX results plus the summary are written atomically to
    ``report_dir/validation.json``.

    :param profile: the per-image profile table (one row per decoded image).
    :param manifest: the snapshot manifest (``class_names``, ``undecodable`` ...).
    :param config: what a valid snapshot looks like.
    :param report_dir: folder for ``validation.json`` (created if needed).
    :returns: ``{"success", "evaluated", "failed", "failures", "appearance", "warnings", "statistics",
        "report_path"}``; each failure is ``{"expectation", "check", "kind", "column", "observed", "summary",
        "details"}`` (``kind``: ``integrity`` or ``appearance``); each ``appearance`` entry is
        ``{"check", "column", "range", "rows", "outliers", "share", "max_share", "allowed", "passed",
        "summary", "listed", "images"}`` with up to :data:`OUTLIER_LIST` images as
        ``{"index", "image_id", "source", "value"}``.
    :raises ConfigError: no class list in ``config`` nor in ``manifest``.
    :raises DataError: ``profile`` is not a DataFrame.
    """
    started = time.perf_counter()
    class_names = config.class_names if config.class_names is not None else manifest.get("class_names")
    if not class_names:
        raise ConfigError(
            "no class list to validate against: ValidationConfig.class_names is None and the manifest has no "
            "'class_names'"
        )
    class_names = [str(c) for c in class_names]
    if not isinstance(profile, pd.DataFrame):
        raise DataError(f"profile must be a pandas DataFrame, got {type(profile).__name__}")

    _quiet_gx()
    profile = profile.reset_index(drop=True)

    frames: dict[str, pd.DataFrame] = {_PROFILE: profile}
    checks = _profile_checks(profile, config, class_names)
    derived_frames, derived_checks = _derived_checks(profile, manifest, config, class_names)
    frames.update(derived_frames)
    checks.extend(derived_checks)
    index_columns = {
        _PROFILE: [c for c in ("image_id", "source") if c in profile.columns],
        _CLASS_COUNTS: ["label_name"],
        _OVERLAP: ["test_source"],
    }

    gx_started = time.perf_counter()
    suite_results = _run_suites(frames, checks, index_columns)
    gx_seconds = time.perf_counter() - gx_started

    by_name = {c.name: c for c in checks}
    failures: list[dict[str, Any]] = []
    appearance: list[dict[str, Any]] = []
    evaluated = 0
    for frame_name, suite_result in suite_results.items():
        for res in suite_result.results:
            evaluated += 1
            cfg = res.expectation_config
            check = by_name.get((cfg.meta or {}).get("check", ""))
            error = _exception_message(res.exception_info)
            result_dict = res.result.to_json_dict() if hasattr(res.result, "to_json_dict") else dict(res.result or {})
            if check is not None and check.appearance is not None and error is None:
                count = int(result_dict.get("unexpected_count") or 0)
                appearance.append(check.appearance.entry(profile, config, count, passed=bool(res.success)))
            if res.success:
                continue
            column = cfg.kwargs.get("column") if check is None else check.column
            if error is not None:
                observed, summary, details = None, f"could not be evaluated: {error}", None
            elif check is None:
                observed, summary, details = json_safe(result_dict.get("observed_value")), "failed", None
            else:
                observed, summary, details = check.summarize(result_dict)
            failures.append(
                {
                    "expectation": cfg.type,
                    "check": check.name if check else None,
                    "kind": check.kind if check else "integrity",
                    "column": column,
                    "observed": json_safe(observed),
                    "summary": summary,
                    "details": json_safe(details),
                }
            )
    order = {c.name: i for i, c in enumerate(checks)}
    failures.sort(key=lambda f: order.get(f["check"], len(order)))
    appearance.sort(key=lambda a: order.get(a["check"], len(order)))
    warnings = [f"tolerated appearance outliers: {a['summary']}" for a in appearance if a["passed"] and a["outliers"]]

    stats = _statistics(profile, frames, evaluated, len(failures))
    masks = [c.appearance.mask for c in checks if c.appearance is not None]
    stats["appearance_outliers"] = int(pd.concat(masks, axis=1).any(axis=1).sum()) if masks else 0
    stats["gx_seconds"] = round(gx_seconds, 3)
    stats["duration_s"] = round(time.perf_counter() - started, 3)

    report_path = Path(report_dir) / VALIDATION_FILE
    result: dict[str, Any] = {
        "success": not failures,
        "evaluated": evaluated,
        "failed": len(failures),
        "failures": failures,
        "appearance": appearance,
        "warnings": warnings,
        "statistics": stats,
        "report_path": str(report_path),
    }
    import great_expectations as gx

    atomic_write_json(
        report_path,
        {
            "summary": result,
            "config": json_safe(asdict(config)),
            "class_names": class_names,
            "great_expectations_version": gx.__version__,
            "gx_results": {name: r.to_json_dict() for name, r in suite_results.items()},
        },
    )
    for warning in warnings:
        log.warning("snapshot validation: %s", warning)
    if failures:
        log.warning("snapshot validation: %d of %d expectations failed", len(failures), evaluated)
    else:
        log.info("snapshot validation: all %d expectations passed in %.2fs", evaluated, stats["duration_s"])
    return result


def raise_for_failures(result: dict[str, Any]) -> None:
    """Raise :class:`~nightshift.errors.ValidationFailed` if ``result`` (from :func:`validate_snapshot`) failed.

    :param result: the dict :func:`validate_snapshot` returned.
    :raises ValidationFailed: ``result["success"]`` is false; the message lists every failure.
    """
    if not result.get("success", False):
        raise ValidationFailed(list(result.get("failures") or []), result.get("report_path"))

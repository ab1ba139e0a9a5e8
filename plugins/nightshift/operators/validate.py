from __future__ import annotations

from typing import Any, Sequence

from nightshift.errors import ConfigError
from nightshift.operators.base import NightshiftOperator, shape3
from nightshift.operators.links import ValidationReportLink


class ValidateDataOperator(NightshiftOperator):
    """Validate a snapshot with Great Expectations; fail with a readable list of
    failed expectations (the full result is saved in the run's artifact folder).

    Integrity checks (undecodable or unread files, shape, label set, leakage,
    conflicting labels, per-class counts) fail on any offending image;
    appearance checks (brightness, contrast) fail only past
    ``max_outlier_share``, and their outliers are logged and listed in the
    report either way.

    :param snapshot: the ``collect_data`` result (XCom). (templated)
    :param classes: expected class names; default: the snapshot's. (templated)
    :param image_shape: expected ``[H, W, C]``; default: the snapshot's. (templated)
    :param min_rows: minimum number of images. (templated)
    :param min_per_class: minimum training images per class. (templated)
    :param max_outlier_share: share of images (0..1) each appearance check may find
        out of range and still pass; default ``None``: the suite's default
        (:data:`nightshift.quality.DEFAULT_MAX_OUTLIER_SHARE`, 2%). (templated)
    """

    template_fields: Sequence[str] = ("snapshot", "classes", "image_shape", "min_rows", "min_per_class",
                                      "max_outlier_share")
    #: what of the run folder it reads (fetched first on an object store): its own folder
    run_folder_reads: Sequence[str] = ("validation",)
    operator_extra_links = (ValidationReportLink(),)

    def __init__(self, *, snapshot: Any, classes: list[str] | None = None, image_shape: Any = None,
                 min_rows: int = 50, min_per_class: int = 5, max_outlier_share: float | str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot = snapshot
        self.classes = classes
        self.image_shape = image_shape
        self.min_rows = min_rows
        self.min_per_class = min_per_class
        self.max_outlier_share = max_outlier_share

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift import quality
        from nightshift.data.snapshot import fetch_snapshot, load_snapshot

        snap_info = self.require(self.snapshot, "snapshot", "collect_data")
        snap = load_snapshot(fetch_snapshot(self.store, snap_info["snapshot_uri"]))
        suite: dict[str, Any] = {}
        if self.max_outlier_share not in (None, "", "None"):
            try:
                suite["max_outlier_share"] = float(self.max_outlier_share)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"max_outlier_share of task {self.task_id} must be a share of images in [0, 1] "
                                  f"(e.g. 0.02), got {self.max_outlier_share!r}") from exc
        config = quality.ValidationConfig(
            class_names=list(self.classes) if self.classes else snap.class_names,
            image_shape=shape3(self.image_shape) or snap.image_shape,
            min_rows=int(self.min_rows),
            min_per_class=int(self.min_per_class),
            **suite,
        )
        result = quality.validate_snapshot(snap.profile(locations=False), snap.manifest, config, self.run_dir(context, "validation"))
        self.log.info("Validation of %s: %d expectations, %d failed; report %s",
                      snap.digest[:12], result["evaluated"], result["failed"], result["report_path"])
        for warning in result["warnings"]:
            self.log.warning("%s", warning)
        quality.raise_for_failures(result)
        return {"success": True, "evaluated": result["evaluated"], "failed": 0,
                "report_path": result["report_path"], "digest": snap.digest,
                "appearance_outliers": result["statistics"]["appearance_outliers"],
                "warnings": [w[:500] for w in result["warnings"]]}

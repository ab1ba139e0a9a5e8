from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator, shape3
from nightshift.operators.links import ValidationReportLink


class ValidateDataOperator(NightshiftOperator):
    """Validate a snapshot with Great Expectations; fail with a readable list of
    failed expectations (the full result is saved in the run's artifact folder).

    :param snapshot: the ``collect_data`` result (XCom). (templated)
    :param classes: expected class names; default: the snapshot's. (templated)
    :param image_shape: expected ``[H, W, C]``; default: the snapshot's. (templated)
    :param min_rows: minimum number of images. (templated)
    :param min_per_class: minimum training images per class. (templated)
    """

    template_fields: Sequence[str] = ("snapshot", "classes", "image_shape", "min_rows", "min_per_class")
    operator_extra_links = (ValidationReportLink(),)

    def __init__(self, *, snapshot: Any, classes: list[str] | None = None, image_shape: Any = None,
                 min_rows: int = 50, min_per_class: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot = snapshot
        self.classes = classes
        self.image_shape = image_shape
        self.min_rows = min_rows
        self.min_per_class = min_per_class

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift import quality
        from nightshift.data.snapshot import load_snapshot

        snap_info = self.require(self.snapshot, "snapshot", "collect_data")
        snap = load_snapshot(snap_info["snapshot_uri"])
        config = quality.ValidationConfig(
            class_names=list(self.classes) if self.classes else snap.class_names,
            image_shape=shape3(self.image_shape) or snap.image_shape,
            min_rows=int(self.min_rows),
            min_per_class=int(self.min_per_class),
        )
        result = quality.validate_snapshot(snap.profile(locations=False), snap.manifest, config, self.run_dir(context, "validation"))
        self.log.info("Validation of %s: %d expectations, %d failed; report %s",
                      snap.digest[:12], result["evaluated"], result["failed"], result["report_path"])
        quality.raise_for_failures(result)
        return {"success": True, "evaluated": result["evaluated"], "failed": 0,
                "report_path": result["report_path"], "digest": snap.digest}

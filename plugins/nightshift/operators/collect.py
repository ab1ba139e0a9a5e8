from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.assets import SNAPSHOT_ASSET
from nightshift.operators.base import NightshiftOperator, shape3


class CollectDataOperator(NightshiftOperator):
    """Collect labelled images into a content-addressed snapshot with a profile table.

    :param source: ``bundled`` (scikit-learn digits), an ImageFolder path or
        object-storage URI (``s3://bucket/prefix``), ``torchvision:<Dataset>``, or a
        dict with ``kind``. (templated)
    :param image_shape: ``[height, width, channels]`` images are converted to; default
        by source (8×8×1 for bundled, 32×32×3 otherwise). (templated)
    :param classes: expected class names in label order; ImageFolder class folders
        outside this list are an error. (templated)
    :param val_fraction: share of images in the validation split. (templated)
    :param test_fraction: share of images in the test split. (templated)
    :param conn_id: Airflow connection for an object-storage source. (templated)
    """

    template_fields: Sequence[str] = ("source", "image_shape", "classes", "val_fraction", "test_fraction", "conn_id")

    def __init__(self, *, source: str | dict[str, Any] = "bundled", image_shape: Any = None,
                 classes: list[str] | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 conn_id: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("outlets", [SNAPSHOT_ASSET])
        super().__init__(**kwargs)
        self.source = source
        self.image_shape = image_shape
        self.classes = classes
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.conn_id = conn_id

    def _root(self, path: str):
        if "://" in path and not path.startswith("file://"):
            from airflow.sdk import ObjectStoragePath

            return ObjectStoragePath(path, conn_id=self.conn_id) if self.conn_id else ObjectStoragePath(path)
        from pathlib import Path

        return Path(path.removeprefix("file://"))

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift.data import sources
        from nightshift.data.snapshot import write_snapshot

        src = sources.parse_source(self.source)
        shape = shape3(self.image_shape) or sources.default_shape(src)
        classes = list(self.classes) if self.classes else None
        self.log.info("Collecting %s as %s images", src, "x".join(map(str, shape)))
        if src["kind"] == "bundled":
            data = sources.load_bundled(shape)
        elif src["kind"] == "imagefolder":
            data = sources.load_imagefolder(self._root(src["path"]), shape, classes)
        else:
            root = src.get("root") or str(self.settings.home / "datasets")
            data = sources.load_torchvision(src["name"], root, shape, limit=src.get("limit"),
                                            download=src.get("download", True), options=src.get("options"))
        for bad in data.undecodable:
            self.log.warning("Undecodable file %s: %s", bad["path"], bad["error"])
        ti = context.get("ti")
        who = {"dag_id": self.dag_id, "task_id": self.task_id, "run_id": context.get("run_id"),
               "try_number": getattr(ti, "try_number", None)}
        snap = write_snapshot(data, self.settings.artifact_root / "snapshots",
                              val_fraction=float(self.val_fraction), test_fraction=float(self.test_fraction),
                              context=who)
        m = snap.manifest
        self.log.info("Collection %s (data %s): %s", snap.collection_id[:12], snap.digest[:12], m["counts"])
        context["outlet_events"][SNAPSHOT_ASSET].extra = {"digest": snap.digest, "collection_id": snap.collection_id,
                                                          "uri": str(snap.path)}
        return {"snapshot_uri": str(snap.path), "digest": snap.digest, "collection_id": snap.collection_id,
                "class_names": m["class_names"],
                "image_shape": m["image_shape"], "counts": m["counts"], "source": m["source"],
                "undecodable": len(m["undecodable"])}

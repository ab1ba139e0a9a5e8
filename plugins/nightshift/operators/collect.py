from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.assets import SNAPSHOT_ASSET
from nightshift.operators.base import NightshiftOperator, get_connection, shape3


class CollectDataOperator(NightshiftOperator):
    """Collect labelled images into a content-addressed snapshot with a profile table.

    :param source: ``bundled`` (scikit-learn digits), an ImageFolder path or
        object-storage URI (``s3://bucket/prefix``), ``torchvision:<Dataset>``, or a
        dict with ``kind``. (templated)
    :param image_shape: ``[height, width, channels]`` images are converted to; default
        by source (8×8×1 for bundled, 32×32×3 otherwise). (templated)
    :param classes: expected class names in label order; ImageFolder class folders
        outside this list are an error. Required when the source holds packs
        (``<root>/<name>.tar`` of ``<class>/<image>`` members, read with one request
        each: the layout for object storage). (templated)
    :param val_fraction: share of images in the validation split. (templated)
    :param test_fraction: share of images in the test split. (templated)
    :param conn_id: Airflow connection for an object-storage source. (templated)
    :param workers: decode processes; default one per CPU of the worker. (templated)
    :param shard_mb: MiB of pixels per content-addressed shard (default 64). (templated)
    :param partition_window: for ``<root>/<partition>/<class>/<image>`` sources (e.g.
        date folders), collect only the last N partitions; ``None``: not partitioned. (templated)
    :param incremental: reuse the pixels of files unchanged since the last collection
        of the same source (same path, size and modification time / ETag). (templated)
    """

    template_fields: Sequence[str] = ("source", "image_shape", "classes", "val_fraction", "test_fraction", "conn_id",
                                      "workers", "shard_mb", "partition_window", "incremental")
    #: what of the run folder it reads (fetched first on an object store): nothing (the source, the snapshots)
    run_folder_reads: Sequence[str] = ()
    #: ``source`` is read where it is (it may be a bucket the artifact store also lives in)
    store_inputs: Sequence[str] = ()

    def __init__(self, *, source: str | dict[str, Any] = "bundled", image_shape: Any = None,
                 classes: list[str] | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 conn_id: str | None = None, workers: int | None = None, shard_mb: float = 64,
                 partition_window: int | None = None, incremental: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("outlets", [SNAPSHOT_ASSET])
        super().__init__(**kwargs)
        self.source = source
        self.image_shape = image_shape
        self.classes = classes
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.conn_id = conn_id
        self.workers = workers
        self.shard_mb = shard_mb
        self.partition_window = partition_window
        self.incremental = incremental

    def _root(self, path: str):
        if "://" in path and not path.startswith("file://"):
            from airflow.sdk import ObjectStoragePath

            if not self.conn_id:
                return ObjectStoragePath(path)
            # the amazon provider falls back to anonymous / default credentials for an unknown
            # connection id: a typo must fail here, naming it, not 10 s later as a network error
            get_connection(self.conn_id, "connection", f"conn_id of the source {path}", "with the store's credentials")
            return ObjectStoragePath(path, conn_id=self.conn_id)
        from pathlib import Path

        return Path(path.removeprefix("file://"))

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift.data import sources
        from nightshift.data.collect import collect_imagefolder
        from nightshift.data.snapshot import publish_snapshot, write_snapshot
        from nightshift.settings import to_bool

        src = sources.parse_source(self.source)
        shape = shape3(self.image_shape) or sources.default_shape(src)
        classes = list(self.classes) if self.classes else None
        ti = context.get("ti")
        who = {"dag_id": self.dag_id, "task_id": self.task_id, "run_id": context.get("run_id"),
               "try_number": getattr(ti, "try_number", None)}
        root = self.settings.artifact_root / "snapshots"
        split = {"val_fraction": float(self.val_fraction), "test_fraction": float(self.test_fraction)}
        self.log.info("Collecting %s as %s images", src, "x".join(map(str, shape)))
        incremental: dict[str, Any] = {}
        if src["kind"] == "imagefolder":
            window = src.get("partition_window", self.partition_window)
            snap, stats = collect_imagefolder(
                self._root(src["path"]), shape, root, class_names=classes, context=who,
                workers=int(self.workers) if self.workers not in (None, "") else None,
                shard_mb=float(self.shard_mb), partition_window=int(window) if window not in (None, "") else None,
                incremental=to_bool(self.incremental), progress=lambda msg: self.log.info("%s", msg),
                store=self.store, **split)  # publishes the collection (object store) under the source's lock
            incremental = stats.to_dict()
        else:
            if src["kind"] == "bundled":
                data = sources.load_bundled(shape)
            else:
                data_root = src.get("root") or str(self.settings.home / "datasets")
                data = sources.load_torchvision(src["name"], data_root, shape, limit=src.get("limit"),
                                                download=src.get("download", True), options=src.get("options"))
            snap = write_snapshot(data, root, shard_mb=float(self.shard_mb), context=who, **split)
            publish_snapshot(self.store, snap)
        uri = self.store.to_uri(snap.path)  # the path itself on a local root
        m = snap.manifest
        for bad in m["undecodable"][:50]:
            self.log.warning("Undecodable file %s: %s", bad["path"], bad["error"])
        if len(m["undecodable"]) > 50:
            self.log.warning("... and %d more undecodable files (all listed in %s/manifest.json)",
                             len(m["undecodable"]) - 50, snap.path)
        self.log.info("Collection %s (data %s, %d shard(s)): %s", snap.collection_id[:12], snap.digest[:12],
                      len(snap.shard_digests), m["counts"])
        context["outlet_events"][SNAPSHOT_ASSET].extra = {"digest": snap.digest, "collection_id": snap.collection_id,
                                                          "uri": uri}
        return {"snapshot_uri": uri, "digest": snap.digest, "collection_id": snap.collection_id,
                "class_names": m["class_names"], "image_shape": m["image_shape"], "counts": m["counts"],
                "source": m["source"], "undecodable": len(m["undecodable"]), "shards": len(snap.shard_digests),
                # the promote step compares it with the champion's (a run on other data waits for a person)
                "partition_window": (int(window) if window not in (None, "") else None)
                if src["kind"] == "imagefolder" else None,
                "incremental": incremental}

"""Data sources (nightshift.data.sources): the bundled digits, torchvision datasets, parsing a
source, an ImageFolder's listing (links out of the root are not followed), and an ImageFolder on
object storage against a real S3 endpoint (SeaweedFS, the ``s3_server`` fixture), the way
``collect_data`` reaches it: an Airflow connection (``AIRFLOW_CONN_<ID>``) and
``ObjectStoragePath(uri, conn_id=...)``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from nightshift.data import sources
from nightshift.data.collect import collect_imagefolder
from nightshift.errors import ConfigError, DataError
from tests.snapshots import snapshot_content

SHAPE = (16, 16, 3)
CONN_ID = "nightshift_test_s3"


def _upload(server, folder: Path, prefix: str) -> None:
    s3 = server.client()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            s3.put_object(Bucket=server.bucket, Key=f"{prefix}/{f.relative_to(folder).as_posix()}", Body=f.read_bytes())


@pytest.fixture
def s3_source(s3_server, monkeypatch):
    """(ObjectStoragePath factory, upload prefix): a fresh prefix in the test bucket, reached through an
    aws connection given as an environment variable (JSON form) with the endpoint in its extra."""
    from airflow.sdk import ObjectStoragePath

    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({
        "conn_type": "aws", "login": s3_server.access_key, "password": s3_server.secret_key,
        "extra": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}))
    prefix = f"src-{uuid.uuid4().hex[:8]}"
    return (lambda: ObjectStoragePath(f"s3://{s3_server.bucket}/{prefix}", conn_id=CONN_ID)), prefix


def test_an_s3_source_collects_what_the_same_local_tree_collects(s3_server, s3_source, make_imagefolder, tmp_path):
    root, prefix = s3_source
    folder = make_imagefolder(classes=("0", "1", "2"), per_class=40, corrupt=2)
    (folder / "1" / "notes.txt").write_text("not an image")
    _upload(s3_server, folder, prefix)

    local, lstats = collect_imagefolder(folder, SHAPE, tmp_path / "local", workers=1)
    remote, rstats = collect_imagefolder(root(), SHAPE, tmp_path / "s3", workers=2)

    assert rstats.decoded == lstats.decoded == 120 and rstats.undecodable == 3
    assert remote.manifest["class_names"] == local.manifest["class_names"] == ["0", "1", "2"]
    assert remote.manifest["undecodable"] == local.manifest["undecodable"]
    assert {u["path"] for u in remote.manifest["undecodable"]} == {"0/corrupt_0.png", "0/corrupt_1.png", "1/notes.txt"}
    assert remote.digest == local.digest and snapshot_content(remote) == snapshot_content(local)
    assert remote.manifest["source"]["root"].startswith("s3://") and prefix in remote.manifest["source"]["root"]
    etags = remote.profile()["file_mtime"]
    assert (etags.str.len() > 0).all()  # the object's ETag: what incremental collection compares


def test_recollecting_an_s3_source_decodes_only_new_and_changed_objects(s3_server, s3_source, make_imagefolder,
                                                                        tmp_path):
    root, prefix = s3_source
    folder = make_imagefolder(classes=("0", "1"), per_class=30)
    _upload(s3_server, folder, prefix)
    snaps = tmp_path / "snaps"
    first, stats = collect_imagefolder(root(), SHAPE, snaps, workers=1)
    assert stats.decoded == 60 and stats.reused == 0

    again, stats = collect_imagefolder(root(), SHAPE, snaps, workers=1)
    assert stats.decoded == 0 and stats.reused == 60 and again.digest == first.digest

    more = make_imagefolder(classes=("2",), per_class=7, name="more")
    _upload(s3_server, more, prefix)  # a new class with 7 images
    s3 = s3_server.client()
    victim = f"{prefix}/0/{sorted((folder / '0').iterdir())[0].name}"
    donor = sorted((folder / "1").iterdir())[0].read_bytes()
    s3.put_object(Bucket=s3_server.bucket, Key=victim, Body=donor)  # changed content, same key
    grown, stats = collect_imagefolder(root(), SHAPE, snaps, workers=2)
    assert stats.decoded == 8 and stats.reused == 59  # exactly the 7 new objects and the changed one
    assert grown.manifest["class_names"] == ["0", "1", "2"]
    assert grown.manifest["incremental"]["previous_collection"] == again.collection_id
    fresh, _ = collect_imagefolder(root(), SHAPE, tmp_path / "fresh", workers=1, incremental=False)
    assert snapshot_content(grown) == snapshot_content(fresh)


def test_an_object_deleted_after_the_listing_is_reported_not_dropped(s3_server, s3_source, make_imagefolder,
                                                                    tmp_path, monkeypatch):
    from nightshift.data import sources

    root, prefix = s3_source
    folder = make_imagefolder(classes=("0", "1"), per_class=10)
    _upload(s3_server, folder, prefix)
    gone = f"{prefix}/1/{sorted((folder / '1').iterdir())[3].name}"
    listing = sources.list_imagefolder

    def list_then_delete(*a, **kw):
        out = listing(*a, **kw)
        s3_server.client().delete_object(Bucket=s3_server.bucket, Key=gone)
        return out

    monkeypatch.setattr("nightshift.data.collect.list_imagefolder", list_then_delete)
    snap, stats = collect_imagefolder(root(), SHAPE, tmp_path / "snaps", workers=1)
    assert stats.decoded == 19
    [bad] = snap.manifest["undecodable"]
    assert bad["path"] == gone.split("/", 1)[1] and bad["error"].startswith("could not read: FileNotFoundError")


def test_read_many_keeps_order_and_reports_each_failure(s3_server, s3_source, make_imagefolder):
    from nightshift.data.sources import ObjectFile, read_many

    root, prefix = s3_source
    folder = make_imagefolder(classes=("0",), per_class=5)
    _upload(s3_server, folder, prefix)
    fs = root().fs
    names = sorted(p.name for p in (folder / "0").iterdir())
    paths = [ObjectFile(fs, f"{s3_server.bucket}/{prefix}/0/{n}", {}) for n in names]
    paths.insert(2, ObjectFile(fs, f"{s3_server.bucket}/{prefix}/0/missing.png", {}))
    paths.append(folder / "0" / names[0])  # a local file in the same batch
    got = read_many(paths, concurrency=3)
    assert [g for g in got if isinstance(g, bytes)] == [(folder / "0" / n).read_bytes() for n in [*names, names[0]]]
    assert isinstance(got[2], FileNotFoundError) and f"s3://{s3_server.bucket}/{prefix}/0/missing.png" in str(got[2])


def test_s3_objects_are_read_with_obstore_and_the_connections_credentials(s3_server, s3_source, make_imagefolder,
                                                                          monkeypatch):
    """The fast path reads S3 objects with obstore, signed with the credentials the connection gave
    s3fs (not s3fs's own GETs, which cost ten times the client CPU)."""
    from nightshift.data import sources

    root, prefix = s3_source
    folder = make_imagefolder(classes=("0",), per_class=3)
    _upload(s3_server, folder, prefix)
    fs = root().fs

    def no_s3fs(*a, **k):
        raise AssertionError("s3fs fetched the objects")

    monkeypatch.setattr(fs, "cat_ranges", no_s3fs)
    names = sorted(p.name for p in (folder / "0").iterdir())
    got = sources.read_many([sources.ObjectFile(fs, f"{s3_server.bucket}/{prefix}/0/{n}", {}) for n in names])
    assert got == [(folder / "0" / n).read_bytes() for n in names]
    assert sources._s3_settings(fs)["key"] == s3_server.access_key


def test_an_unreachable_endpoint_is_a_retryable_error_naming_the_uri(monkeypatch, tmp_path):
    import socket

    from airflow.sdk import ObjectStoragePath

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    monkeypatch.setenv("AIRFLOW_CONN_NIGHTSHIFT_DEAD_S3", json.dumps({
        "conn_type": "aws", "login": "AKIDEAD", "password": "dead-secret-key",
        "extra": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1",
                  "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}}))
    src = ObjectStoragePath("s3://nowhere-bucket/images", conn_id="nightshift_dead_s3")
    with pytest.raises(DataError, match=r"imagefolder source 's3://nightshift_dead_s3@nowhere-bucket/images' "
                                        r"cannot be read: .*Could not connect") as err:
        collect_imagefolder(src, SHAPE, tmp_path / "snaps", workers=1)
    assert err.value.retryable


def test_an_undefined_source_connection_fails_at_once_naming_it(monkeypatch):
    from nightshift.errors import ConfigError
    from nightshift.operators import CollectDataOperator

    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_CONN", raising=False)
    op = CollectDataOperator(task_id="collect_data", source="s3://bucket/pets", conn_id="no_such_conn")
    with pytest.raises(ConfigError, match="connection 'no_such_conn'.*not defined"):
        op._root("s3://bucket/pets")


def test_bundled_digits_are_real_uint8_images():
    data = sources.load_bundled()
    assert data.images.shape == (1797, 8, 8, 1) and data.images.dtype == np.uint8
    assert data.images.max() == 255 and data.images.min() == 0
    assert sorted(set(data.labels.tolist())) == list(range(10))
    assert data.class_names == [str(i) for i in range(10)]


def test_torchvision_fakedata_source():
    data = sources.load_torchvision("FakeData", "/nonexistent", (12, 12, 3), options={"size": 20, "num_classes": 4})
    assert data.images.shape[1:] == (12, 12, 3)
    assert set(data.predefined_split.tolist()) == {"train", "test"}
    with pytest.raises(ConfigError):
        sources.load_torchvision("NoSuchDataset", "/tmp", (8, 8, 1))


def test_torchvision_download_failure_is_explained(tmp_path):
    with pytest.raises(DataError, match="could not be loaded.*imagefolder"):
        sources.load_torchvision("MNIST", tmp_path, (28, 28, 1), download=False)


@pytest.mark.parametrize("raw,kind", [("bundled", "bundled"), ("/data/x", "imagefolder"),
                                      ("s3://bucket/prefix", "imagefolder"), ("imagefolder:./x", "imagefolder"),
                                      ("torchvision:CIFAR10", "torchvision")])
def test_parse_source(raw, kind):
    assert sources.parse_source(raw)["kind"] == kind


def test_parse_source_rejects_nonsense():
    with pytest.raises(ConfigError, match="not understood"):
        sources.parse_source("cifar please")


def test_partition_links_out_of_the_root_are_not_followed(make_imagefolder, tmp_path):
    """Item 11 with date partitions: a partition folder linked in from outside is not read; it keeps
    its place in the window and is recorded there; older than the window, it is none of the run's business."""
    root = tmp_path / "parts"
    root.mkdir()
    make_imagefolder(classes=("0", "1"), per_class=6, name="parts/2026-11-02")
    outside = make_imagefolder(classes=("0", "1"), per_class=6, name="elsewhere")
    (root / "2026-11-01").symlink_to(outside, target_is_directory=True)  # older than a window of 1
    (root / "2026-11-03").symlink_to(outside, target_is_directory=True)  # the newest partition

    # the newest partition is the link: no quiet fall-back to an older one
    with pytest.raises(DataError, match=r"no class folders.*not followed: \['2026-11-03/'\]"):
        sources.list_imagefolder(root, partition_window=1)
    listing = sources.list_imagefolder(root, partition_window=2)
    assert listing.partitions == ["2026-11-02"]  # never the linked-in folder
    assert [s["path"] for s in listing.skipped] == ["2026-11-03/"]
    assert "outside the source root" in listing.skipped[0]["error"]
    listing = sources.list_imagefolder(root, partition_window=3)
    assert listing.partitions == ["2026-11-02"]
    assert [s["path"] for s in listing.skipped] == ["2026-11-01/", "2026-11-03/"]


def _tar(folder: Path, tar_path: Path) -> Path:
    import tarfile

    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                tar.add(f, arcname=f.relative_to(folder).as_posix())
    return tar_path


def test_packs_are_listed_as_one_entry_each_and_need_the_class_names(make_imagefolder, tmp_path):
    folder = make_imagefolder(classes=("0", "1"), per_class=5)
    root = tmp_path / "root"
    _tar(folder, root / "2026-12-01" / "shard-0000.tar")
    _tar(folder, root / "2026-12-02" / "shard-0000.tar")
    (root / "2026-12-02" / "old.tgz").write_bytes(b"x")
    (root / "2026-12-02" / "README.md").write_text("beside the packs: not ours")
    _tar(folder, root / "stray.tar")  # at the root of a partitioned source: in no partition
    with pytest.raises(ConfigError, match="set 'classes'"):
        sources.list_imagefolder(root, partition_window=1)
    listing = sources.list_imagefolder(root, ["0", "1", "2"], partition_window=1)
    assert [(e.rel, e.pack, e.class_name) for e in listing.entries] == [("2026-12-02/shard-0000.tar", True, "")]
    assert listing.entries[0].size == (root / "2026-12-02" / "shard-0000.tar").stat().st_size
    assert [s["path"] for s in listing.skipped] == ["2026-12-02/old.tgz", "stray.tar"]
    assert "compressed archive" in listing.skipped[0]["error"] and "partition folder" in listing.skipped[1]["error"]
    # loose folders must still be configured classes; a configured class may live only in packs
    (root / "2026-12-02" / "bird").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) \['bird'\]"):
        sources.list_imagefolder(root, ["0", "1", "2"], partition_window=1)


def test_a_pack_too_large_to_hold_is_reported_not_read(make_imagefolder, monkeypatch):
    folder = make_imagefolder(classes=("0", "1"), per_class=5)
    _tar(folder, folder / "big.tar")
    monkeypatch.setattr(sources, "MAX_PACK_BYTES", 1024)
    listing = sources.list_imagefolder(folder, ["0", "1"])
    assert len(listing.entries) == 10 and not any(e.pack for e in listing.entries)
    assert [s["path"] for s in listing.skipped] == ["big.tar"] and "split it into smaller packs" in listing.skipped[0]["error"]


def test_packs_on_s3_collect_what_the_same_local_packs_collect(s3_server, s3_source, make_imagefolder, tmp_path):
    """One GET per pack: the layout that makes object storage as fast as local disk (docs/benchmarks.md)."""
    root, prefix = s3_source
    folder = make_imagefolder(classes=("0", "1", "2"), per_class=40, corrupt=1)
    local_root = tmp_path / "packs"
    _tar(folder, local_root / "shard-0000.tar")
    _upload(s3_server, local_root, prefix)

    local, lstats = collect_imagefolder(local_root, SHAPE, tmp_path / "local", workers=1, class_names=["0", "1", "2"])
    remote, rstats = collect_imagefolder(root(), SHAPE, tmp_path / "s3", workers=2, class_names=["0", "1", "2"])
    assert rstats.decoded == lstats.decoded == 120 and rstats.packs == 1
    assert remote.manifest["undecodable"] == local.manifest["undecodable"]
    assert [u["path"] for u in remote.manifest["undecodable"]] == ["shard-0000.tar::0/corrupt_0.png"]
    assert remote.digest == local.digest and snapshot_content(remote) == snapshot_content(local)
    again, stats = collect_imagefolder(root(), SHAPE, tmp_path / "s3", workers=1, class_names=["0", "1", "2"])
    assert (stats.decoded, stats.reused) == (120, 0)  # a pack with an undecodable member is read again
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key=f"{prefix}/shard-0000.tar")
    folder_ok = make_imagefolder(classes=("0", "1"), per_class=10, name="ok")
    _upload(s3_server, _tar(folder_ok, tmp_path / "ok-packs" / "shard-0001.tar").parent, prefix)
    first, stats = collect_imagefolder(root(), SHAPE, tmp_path / "s3", workers=1, class_names=["0", "1", "2"])
    assert (stats.decoded, stats.reused) == (20, 0)
    second, stats = collect_imagefolder(root(), SHAPE, tmp_path / "s3", workers=1, class_names=["0", "1", "2"])
    assert (stats.decoded, stats.reused) == (0, 20) and second.digest == first.digest  # same ETag: reused whole

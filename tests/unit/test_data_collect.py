"""Streaming collection (nightshift.data.collect): sharded, parallel, incremental,
restartable, on real PNG/JPEG files."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from nightshift.data import sources
from nightshift.data.collect import collect_imagefolder
from nightshift.data.snapshot import load_snapshot
from nightshift.errors import DataError
from tests.snapshots import snapshot_content

SHAPE = (8, 8, 1)
#: 64 images of 8×8×1 per shard: small shards make every code path run on little data.
SMALL_SHARD_MB = 64 * 64 / 2**20


def _add_images(root: Path, start: int, count: int, classes=("0", "1", "2")) -> None:
    from PIL import Image

    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        cls = classes[i % len(classes)]
        (root / cls).mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
        img[:, :, int(cls) % 3] = 255  # a learnable class signal
        Image.fromarray(img).save(root / cls / f"img_{i:05d}.png")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "src"
    _add_images(root, 0, 300)
    return root


def test_collect_writes_shards_and_a_profile_row_per_image(folder, tmp_path):
    snap, stats = collect_imagefolder(folder, SHAPE, tmp_path / "snaps", shard_mb=SMALL_SHARD_MB, workers=1)
    assert stats.decoded == 300 and stats.reused == 0 and stats.shards_written == 5  # 4 × 64 + 44
    assert [s["count"] for s in snap.manifest["shards"]] == [64, 64, 64, 64, 44]
    prof = snap.profile()
    assert len(prof) == 300 and set(prof.columns) >= {"shard", "row", "file_size", "file_mtime", "sha256"}
    img = snap.shard(int(prof.loc[7, "shard"])).images[int(prof.loc[7, "row"])]
    assert prof.loc[7, "brightness"] == pytest.approx(img.mean(), rel=1e-5)
    loaded = load_snapshot(snap.path)
    assert loaded.digest == snap.digest and sum(len(y) for _, y in loaded.iter_split("train")) == snap.count("train")


def test_two_workers_give_the_same_snapshot_as_one(folder, tmp_path):
    one, _ = collect_imagefolder(folder, SHAPE, tmp_path / "a", shard_mb=SMALL_SHARD_MB, workers=1)
    two, stats = collect_imagefolder(folder, SHAPE, tmp_path / "b", shard_mb=SMALL_SHARD_MB, workers=2)
    assert stats.decoded == 300
    assert two.digest == one.digest and two.shard_digests == one.shard_digests


def test_recollecting_decodes_only_new_and_changed_files(folder, tmp_path):
    snaps = tmp_path / "snaps"
    first, _ = collect_imagefolder(folder, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1)

    again, stats = collect_imagefolder(folder, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1)
    assert stats.decoded == 0 and stats.reused == 300
    assert stats.shards_reused == 4 and stats.shards_written == 1  # the full shards are shared as they are
    assert again.digest == first.digest and again.collection_id != first.collection_id

    _add_images(folder, 1000, 37)
    victim = sorted((folder / "1").iterdir())[0]
    _add_images(tmp_path / "other", 5000, 3)
    victim.write_bytes((tmp_path / "other" / "2" / "img_05000.png").read_bytes())  # changed content
    grown, stats = collect_imagefolder(folder, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=2)
    assert stats.decoded == 38 and stats.reused == 299  # exactly the 37 new files and the changed one
    fresh, _ = collect_imagefolder(folder, SHAPE, tmp_path / "fresh", shard_mb=SMALL_SHARD_MB, workers=1,
                                   incremental=False)
    assert snapshot_content(grown) == snapshot_content(fresh)
    assert grown.manifest["incremental"]["previous_collection"] == again.collection_id


def test_a_same_size_replacement_with_its_old_mtime_restored_is_decoded_again(folder, tmp_path):
    """``cp -p`` / ``rsync -a`` / ``tar x`` put an old mtime on new content: size and mtime match
    yesterday's, but the pixels are not yesterday's."""
    snaps = tmp_path / "snaps"
    collect_imagefolder(folder, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1)
    by_size: dict[int, list[Path]] = {}
    for f in sorted(folder.rglob("*.png")):
        by_size.setdefault(f.stat().st_size, []).append(f)
    victim, donor = next(g[:2] for g in by_size.values() if len(g) > 1 and g[0].read_bytes() != g[1].read_bytes())
    old = victim.stat()
    replaced = tmp_path / "replaced.png"
    replaced.write_bytes(donor.read_bytes())  # other pixels, the very same size
    os.replace(replaced, victim)
    os.utime(victim, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    again, stats = collect_imagefolder(folder, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1)
    assert stats.decoded == 1 and stats.reused == 299
    fresh, _ = collect_imagefolder(folder, SHAPE, tmp_path / "fresh", shard_mb=SMALL_SHARD_MB, workers=1,
                                   incremental=False)
    assert snapshot_content(again) == snapshot_content(fresh)


def test_labels_and_splits_follow_todays_settings_not_the_reused_pixels(folder, tmp_path):
    snaps = tmp_path / "snaps"
    collect_imagefolder(folder, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1)
    other, stats = collect_imagefolder(folder, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1,
                                       test_fraction=0.3, class_names=["2", "1", "0"])
    assert stats.reused == 300 and stats.shards_reused == 0  # same pixels, other labels and splits
    fresh, _ = collect_imagefolder(folder, SHAPE, tmp_path / "fresh", shard_mb=SMALL_SHARD_MB, workers=1,
                                   test_fraction=0.3, class_names=["2", "1", "0"], incremental=False)
    assert snapshot_content(other) == snapshot_content(fresh)
    prof = other.profile()
    assert (prof.loc[prof["label_name"] == "2", "label"] == 0).all()


def test_a_killed_collection_resumes_from_its_finished_shards(folder, tmp_path):
    snaps = tmp_path / "snaps"
    script = textwrap.dedent(f"""
        import os, signal
        from nightshift.data import shards
        real, n = shards.write_shard, [0]
        def dying(*a, **k):
            n[0] += 1
            if n[0] == 4:  # SIGKILL in the middle of the 4th shard: no cleanup code runs
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        shards.write_shard = dying
        from nightshift.data.collect import collect_imagefolder
        collect_imagefolder({str(folder)!r}, {SHAPE}, {str(snaps)!r}, shard_mb={SMALL_SHARD_MB}, workers=1)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "plugins"), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (snaps / "collections").exists()  # no record: the collection did not happen
    assert len(list((snaps / "shards").iterdir())) == 3  # the three finished shards, nothing half-written

    snap, stats = collect_imagefolder(Path(folder), SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1)
    assert stats.reused == 3 * 64 and stats.decoded == 300 - 3 * 64 and stats.shards_reused == 3
    assert not (snaps / "staging").exists() or not any((snaps / "staging").iterdir())
    fresh, _ = collect_imagefolder(folder, SHAPE, tmp_path / "fresh", shard_mb=SMALL_SHARD_MB, workers=1,
                                   incremental=False)
    assert snapshot_content(snap) == snapshot_content(fresh)


def _die_writing_shard(monkeypatch, at: int):
    """Make the ``at``-th shard write raise (a worker lost mid-collection); returns the real writer."""
    from nightshift.data import shards

    real, n = shards.write_shard, [0]

    def dying(*args, **kwargs):
        n[0] += 1
        if n[0] == at:
            raise RuntimeError("worker lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", dying)
    return real


def test_a_retry_on_another_worker_reuses_the_killed_trys_shards_from_the_store(folder, tmp_path, s3_server,
                                                                                  s3_root, monkeypatch):
    """Artifact root in object storage: worker A's try dies in its 4th shard; worker B (an empty
    working copy) fetches A's journal and the three shards it names instead of decoding them."""
    from nightshift.data import shards
    from nightshift.store import open_store

    a = open_store(s3_root, cache_dir=tmp_path / "worker-a", s3=s3_server.options())
    b = open_store(s3_root, cache_dir=tmp_path / "worker-b", s3=s3_server.options())
    real = _die_writing_shard(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="worker lost"):
        collect_imagefolder(folder, SHAPE, a.local_root / "snapshots", shard_mb=SMALL_SHARD_MB, workers=1, store=a)
    monkeypatch.setattr(shards, "write_shard", real)
    journal = sorted(r for r in a.files("snapshots/staging") if r.endswith(".parquet"))
    assert len(journal) == 3, journal
    assert not a.files("snapshots/collections")  # no record: the collection did not happen

    snap, stats = collect_imagefolder(folder, SHAPE, b.local_root / "snapshots", shard_mb=SMALL_SHARD_MB,
                                      workers=1, store=b)
    assert (stats.reused, stats.decoded, stats.shards_reused) == (3 * 64, 300 - 3 * 64, 3)
    assert not a.files("snapshots/staging")  # the journal is gone from the store once published
    fresh, _ = collect_imagefolder(folder, SHAPE, tmp_path / "fresh", shard_mb=SMALL_SHARD_MB, workers=1,
                                   incremental=False)
    assert snapshot_content(snap) == snapshot_content(fresh)


def test_disk_full_is_a_clear_error_and_leaves_no_partial_snapshot(folder, tmp_path, monkeypatch):
    from nightshift.data import shards

    real_save, calls = np.save, [0]

    def full(path, arr, *a, **k):
        calls[0] += 1
        if calls[0] == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(shards.np, "save", full)
    snaps = tmp_path / "snaps"
    with pytest.raises(DataError, match="disk full while writing snapshot data.*nothing partial"):
        collect_imagefolder(folder, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1)
    assert not (snaps / "collections").exists()
    assert [p.name for p in (snaps / "shards").iterdir() if p.name.startswith(".")] == []  # temp folder removed


def test_empty_source_and_a_vanished_class_name_what_was_expected(tmp_path, folder):
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    (empty / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"holds no image files.*<class>/<image>.*\['cats'\]"):
        collect_imagefolder(empty, SHAPE, tmp_path / "snaps")
    for f in (folder / "2").iterdir():
        f.unlink()
    (folder / "2").rmdir()
    with pytest.raises(DataError, match=r"no folder for configured class\(es\) \['2'\]"):
        collect_imagefolder(folder, SHAPE, tmp_path / "snaps", class_names=["0", "1", "2"])


def test_date_partitions_with_a_window(tmp_path):
    root = tmp_path / "daily"
    for day, start in (("2026-11-20", 0), ("2026-11-21", 100), ("2026-11-22", 200)):
        _add_images(root / day, start, 30)
    snap, stats = collect_imagefolder(root, SHAPE, tmp_path / "snaps", partition_window=2, workers=1)
    assert stats.decoded == 60
    assert snap.manifest["source"]["partitions"] == ["2026-11-21", "2026-11-22"]
    assert {s.split("/")[0] for s in snap.profile()["source"]} == {"2026-11-21", "2026-11-22"}
    _add_images(root / "2026-11-23", 300, 30)
    snap, stats = collect_imagefolder(root, SHAPE, tmp_path / "snaps", partition_window=2, workers=1)
    assert stats.decoded == 30 and stats.reused == 30  # 11-22 reused, 11-23 new, 11-21 out of the window


def test_object_storage_source_is_read_through_object_storage_path(folder, tmp_path):
    from airflow.sdk import ObjectStoragePath

    snap, stats = collect_imagefolder(ObjectStoragePath(f"file://{folder}"), SHAPE, tmp_path / "snaps",
                                      shard_mb=SMALL_SHARD_MB, workers=2, io_concurrency=4)
    local, _ = collect_imagefolder(folder, SHAPE, tmp_path / "local", shard_mb=SMALL_SHARD_MB, workers=1)
    assert stats.decoded == 300 and snap.shard_digests == local.shard_digests
    again, stats = collect_imagefolder(ObjectStoragePath(f"file://{folder}"), SHAPE, tmp_path / "snaps",
                                       shard_mb=SMALL_SHARD_MB, workers=2)
    assert stats.decoded == 0 and stats.reused == 300


def test_a_night_with_only_broken_new_files_lists_them(folder, tmp_path):
    snaps = tmp_path / "snaps"
    collect_imagefolder(folder, SHAPE, snaps, workers=1)
    (folder / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "1" / "empty.jpg").write_bytes(b"")
    for workers in (1, 2):
        snap, stats = collect_imagefolder(folder, SHAPE, snaps, workers=workers)
        assert stats.decoded == 0 and stats.reused == 300
        assert {u["path"] for u in snap.manifest["undecodable"]} == {"0/broken.png", "1/empty.jpg"}


def test_files_without_a_modification_stamp_are_decoded_again(folder, tmp_path, monkeypatch):
    from airflow.sdk import ObjectStoragePath

    from nightshift.data import sources

    monkeypatch.setattr(sources, "_stat", lambda p: (p.stat()["size"], ""))  # a store that gives no mtime/ETag
    snaps, src = tmp_path / "snaps", ObjectStoragePath(f"file://{folder}")
    collect_imagefolder(src, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1)
    _, stats = collect_imagefolder(src, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1)
    assert stats.reused == 0 and stats.decoded == 300  # size alone never proves a file unchanged


def test_collect_workers_setting(monkeypatch):
    from nightshift.data.collect import default_workers

    monkeypatch.setenv("NIGHTSHIFT_COLLECT_WORKERS", "3")
    assert default_workers() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("NIGHTSHIFT_COLLECT_WORKERS", bad)
        with pytest.raises(DataError, match="NIGHTSHIFT_COLLECT_WORKERS"):
            default_workers()
    monkeypatch.delenv("NIGHTSHIFT_COLLECT_WORKERS")
    assert default_workers() >= 1


def test_two_collections_of_one_source_take_turns(folder, tmp_path):
    """Overlapping runs collecting the same source share its staging journal, which the first
    to finish removes: the second waits for the first (a flock the kernel drops if the holder
    dies) and then reuses every pixel it decoded."""
    import threading

    from nightshift.data.collect import source_lock
    from nightshift.data.snapshot import source_key

    snaps = tmp_path / "snaps"
    first, _ = collect_imagefolder(folder, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1)
    _add_images(folder, 10_000, 3)
    key = source_key({"kind": "imagefolder", "root": str(folder)}, SHAPE)
    waiting, done, out = threading.Event(), threading.Event(), {}

    def progress(msg: str) -> None:
        if "waiting for it" in msg:
            waiting.set()

    def second() -> None:
        out["snap"], out["stats"] = collect_imagefolder(folder, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1,
                                                        progress=progress)
        done.set()

    with source_lock(snaps, key):  # another collector of this source holds it
        t = threading.Thread(target=second, daemon=True)
        t.start()
        assert waiting.wait(60), "the second collection did not wait for the lock"
        assert not done.is_set()
    t.join(120)
    assert done.is_set()
    assert out["stats"].reused == first.count() and out["stats"].decoded == 3


def _collect(root, shape, snapshots, **kw):
    """An ImageFolder collected the way CollectDataOperator does (one decode process, nothing reused)."""
    snap, _ = collect_imagefolder(root, shape, snapshots, workers=1, incremental=False, **kw)
    return snap


def test_same_pixels_from_another_source_keep_that_source(make_imagefolder, tmp_path):
    root = make_imagefolder(classes=("0", "1"), per_class=6)
    first = _collect(root, (8, 8, 1), tmp_path / "snaps")
    moved = tmp_path / "moved"
    root.rename(moved)
    second = _collect(moved, (8, 8, 1), tmp_path / "snaps")
    assert second.digest == first.digest
    assert second.manifest["source"]["root"] == str(moved) != first.manifest["source"]["root"]
    assert second.profile()["source"].tolist() == first.profile()["source"].tolist()  # relative origins
    assert second.manifest["collected_at"] >= first.manifest["collected_at"]


def test_imagefolder_converts_and_lists_undecodable(make_imagefolder, tmp_path):
    root = make_imagefolder(classes=("0", "1"), per_class=10, corrupt=2)
    (root / "1" / "notes.txt").write_text("not an image")
    snap = _collect(root, (8, 8, 1), tmp_path / "snaps")
    assert snap.images.shape == (20, 8, 8, 1)
    assert snap.class_names == ["0", "1"]
    assert (snap.profile()[["orig_height", "orig_width", "orig_channels"]].to_numpy() == [16, 16, 3]).all()
    bad = {b["path"]: b["error"] for b in snap.manifest["undecodable"]}
    assert set(bad) == {"0/corrupt_0.png", "0/corrupt_1.png", "1/notes.txt"}
    assert "UnidentifiedImageError" in bad["0/corrupt_0.png"] or "cannot identify" in bad["0/corrupt_0.png"]


def test_imagefolder_rejects_unknown_class_and_missing_root(make_imagefolder, tmp_path):
    root = make_imagefolder(classes=("0", "1", "7"), per_class=3)
    with pytest.raises(DataError, match=r"\['7'\].*not in the configured classes"):
        _collect(root, (8, 8, 1), tmp_path / "snaps", class_names=["0", "1"])
    with pytest.raises(DataError, match="does not exist|not a directory"):
        _collect(tmp_path / "nope", (8, 8, 1), tmp_path / "snaps")


def test_imagefolder_through_object_storage_path(make_imagefolder, tmp_path):
    from airflow.sdk import ObjectStoragePath

    root = make_imagefolder(classes=("0", "1"), per_class=4)
    snap = _collect(ObjectStoragePath(f"file://{root}"), (8, 8, 3), tmp_path / "snaps")
    assert snap.images.shape == (8, 8, 8, 3)


def test_truncated_image_is_listed_not_dropped(make_imagefolder, tmp_path):
    root = make_imagefolder(classes=("0", "1"), per_class=5)
    good = sorted((root / "1").iterdir())[0]
    data = good.read_bytes()
    (root / "1" / "truncated.png").write_bytes(data[: len(data) // 2])
    snap = _collect(root, (8, 8, 1), tmp_path / "snaps")
    assert len(snap.images) == 10
    assert [b["path"] for b in snap.manifest["undecodable"]] == ["1/truncated.png"]
    assert "object at 0x" not in snap.manifest["undecodable"][0]["error"]


def test_imagefolder_does_not_follow_symlinks_out_of_the_root(make_imagefolder, tmp_path, caplog):
    """Item 11: a link (file or folder) that resolves outside the source root is not read: it is
    recorded with where it points, a warning is logged, and validation fails naming it; a link
    that stays inside the root is followed."""
    import logging

    from nightshift.quality import ValidationConfig, validate_snapshot

    root = make_imagefolder(classes=("0", "1"), per_class=30)
    private = make_imagefolder(classes=("8",), per_class=5, name="private")
    secret = sorted((private / "8").iterdir())[0]
    (root / "0" / "escape.png").symlink_to(secret)  # a file link out of the root
    (root / "8").symlink_to(private / "8", target_is_directory=True)  # a class folder link out of the root
    inside = sorted((root / "0").glob("0*.png"))[0]
    (root / "1" / "inside.png").symlink_to(inside)  # a link inside the root: fine
    (root / "1" / "dangling.png").symlink_to(root / "1" / "gone.png")  # points nowhere: reported, not a crash

    with caplog.at_level(logging.WARNING, logger="nightshift.data.sources"):
        listing = sources.list_imagefolder(root)
    skipped = {s["path"]: s["error"] for s in listing.skipped}
    assert set(skipped) == {"0/escape.png", "8/", "1/dangling.png"}
    assert skipped["0/escape.png"].startswith(f"symbolic link to {secret}, outside the source root {root}")
    assert "not followed" in skipped["8/"] and str(private / "8") in skipped["8/"]
    assert "cannot be read" in skipped["1/dangling.png"]
    assert listing.class_names == ["0", "1"]  # the linked-in class is not collected
    rels = [e.rel for e in listing.entries]
    assert "1/inside.png" in rels and "0/escape.png" not in rels and not any(r.startswith("8/") for r in rels)
    assert any("lead outside the source root" in r.message and "0/escape.png" in r.message for r in caplog.records)

    snap = _collect(root, (8, 8, 1), tmp_path / "snaps")
    assert len(snap.images) == 61  # 60 photos + the inside link; nothing from outside the root
    assert {u["path"] for u in snap.manifest["undecodable"]} == {"0/escape.png", "8/", "1/dangling.png"}
    config = ValidationConfig(class_names=["0", "1"], image_shape=(8, 8, 1), min_rows=10)
    result = validate_snapshot(snap.profile(), snap.manifest, config, tmp_path / "report")
    assert result["success"] is False
    [f] = [f for f in result["failures"] if f["check"] == "no_undecodable"]
    assert "0/escape.png (symbolic link to" in f["summary"] and "8/ (symbolic link to" in f["summary"]

    # a configured class whose folder is a link out of the root: the error says so
    with pytest.raises(DataError, match=r"no folder for configured class.*\['8'\].*not followed: \['8/'\]"):
        sources.list_imagefolder(root, ["0", "1", "8"])

    # the same through an object-storage path on file://
    from airflow.sdk import ObjectStoragePath

    listing = sources.list_imagefolder(ObjectStoragePath(f"file://{root}"))
    assert {"0/escape.png", "8/"} <= {s["path"] for s in listing.skipped}


def test_one_bright_photo_in_an_imagefolder_is_listed_not_fatal(make_imagefolder, tmp_path):
    """Item 8 end to end: decoded from files, one near-white photo (mean brightness above 250, like
    the sky crop of issue 19) passes validation with the default suite and is named in the report."""
    from PIL import Image

    from nightshift.quality import ValidationConfig, validate_snapshot

    root = make_imagefolder(classes=("0", "1", "2"), per_class=30)
    yy, xx = np.mgrid[0:16, 0:16]
    sky = (255 - (yy + 2 * xx) % 7).astype(np.uint8)  # bright, faintly textured
    Image.fromarray(np.stack([sky, sky, sky], axis=2)).save(root / "2" / "sky.png")
    snap = _collect(root, (16, 16, 1), tmp_path / "snaps")
    config = ValidationConfig(class_names=["0", "1", "2"], image_shape=(16, 16, 1))
    result = validate_snapshot(snap.profile(), snap.manifest, config, tmp_path / "report")

    assert result["success"] is True, result["failures"]
    bright = next(a for a in result["appearance"] if a["check"] == "brightness_range")
    assert bright["outliers"] == 1 and bright["rows"] == 91 and bright["passed"] is True
    [image] = bright["images"]
    assert image["source"] == "2/sky.png" and image["value"] > 250
    assert any("2/sky.png" in w for w in result["warnings"])

    strict = ValidationConfig(class_names=["0", "1", "2"], image_shape=(16, 16, 1), max_outlier_share=0)
    assert validate_snapshot(snap.profile(), snap.manifest, strict, tmp_path / "strict")["success"] is False


# ---- packs: <name>.tar of <class>/<image> members, beside or instead of class folders


def _pack(folder: Path, tar_path: Path, classes=None) -> Path:
    """``folder``'s ``<class>/<image>`` files (only ``classes`` when given) as an uncompressed tar."""
    import tarfile

    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for f in sorted(folder.rglob("*")):
            if f.is_file() and (classes is None or f.parent.name in classes):
                tar.add(f, arcname=f.relative_to(folder).as_posix())
    return tar_path


def test_one_pack_of_a_tree_gives_the_snapshot_of_that_tree(folder, tmp_path):
    """Same pixels, labels and splits in the same order: the same data digest as the class folders;
    each row names its pack and member."""
    loose, _ = collect_imagefolder(folder, SHAPE, tmp_path / "loose", shard_mb=SMALL_SHARD_MB, workers=1)
    packed = _pack(folder, tmp_path / "packed" / "all.tar").parent
    snap, stats = collect_imagefolder(packed, SHAPE, tmp_path / "snaps", shard_mb=SMALL_SHARD_MB, workers=2,
                                      class_names=["0", "1", "2"])
    assert (stats.decoded, stats.packs, stats.undecodable) == (300, 1, 0)
    assert snap.digest == loose.digest and snap.shard_digests == loose.shard_digests
    sources_ = snap.profile()["source"].tolist()
    assert sources_[0] == "all.tar::0/img_00000.png" and len(set(sources_)) == 300


def test_packs_and_class_folders_mix_and_a_pack_is_reused_whole_or_decoded_again(folder, tmp_path):
    mixed = tmp_path / "mixed"
    _pack(folder, mixed / "shard-0000.tar", classes=("0",))
    _pack(folder, mixed / "shard-0001.tar", classes=("1",))
    import shutil

    shutil.copytree(folder / "2", mixed / "2")
    snaps = tmp_path / "snaps"
    first, stats = collect_imagefolder(mixed, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1,
                                       class_names=["0", "1", "2"])
    assert (stats.decoded, stats.packs) == (300, 2)
    assert snapshot_content(first) != [] and sorted(first.labels.tolist()) == sorted([i % 3 for i in range(300)])

    again, stats = collect_imagefolder(mixed, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1,
                                       class_names=["0", "1", "2"])
    assert (stats.decoded, stats.reused) == (0, 300) and again.digest == first.digest

    _add_images(folder, 300, 3, classes=("1",))  # the pack of class 1 is rewritten with 3 more images
    _pack(folder, mixed / "shard-0001.tar", classes=("1",))
    third, stats = collect_imagefolder(mixed, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=2,
                                       class_names=["0", "1", "2"])
    assert (stats.decoded, stats.reused) == (103, 200)  # the whole changed pack, nothing else
    fresh, _ = collect_imagefolder(mixed, SHAPE, tmp_path / "fresh", shard_mb=SMALL_SHARD_MB, workers=1,
                                   class_names=["0", "1", "2"], incremental=False)
    assert snapshot_content(third) == snapshot_content(fresh)


def test_bad_members_and_unreadable_packs_are_listed_by_pack_and_member(folder, tmp_path):
    import io
    import tarfile

    root = tmp_path / "packs"
    tar_path = _pack(folder, root / "a.tar", classes=("0", "1"))
    with tarfile.open(tar_path, "a") as tar:  # appended: a corrupt image, a class nobody configured, a text file
        for name, data in (("0/broken.png", b"\x89PNG not really"), ("7/img.png", (folder / "0" / "img_00000.png").read_bytes()),
                           ("1/readme.txt", b"hello")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / "b.tar").write_bytes(tar_path.read_bytes()[:1500])  # cut short
    (root / "c.tar.gz").write_bytes(b"\x1f\x8b compressed")
    snaps = tmp_path / "snaps"
    snap, stats = collect_imagefolder(root, SHAPE, snaps, workers=2, class_names=["0", "1"])
    bad = {u["path"]: u["error"] for u in snap.manifest["undecodable"]}
    assert set(bad) == {"a.tar::0/broken.png", "a.tar::7/img.png", "a.tar::1/readme.txt", "b.tar", "c.tar.gz"}
    assert "'7' is not one of the configured classes" in bad["a.tar::7/img.png"]
    assert "not a readable tar archive" in bad["b.tar"] and "compressed archive" in bad["c.tar.gz"]
    assert stats.decoded == 200  # classes 0 and 1 of the folder; nothing of the cut pack
    # a pack with an undecodable member is decoded again (its reasons are reported again), not reused
    again, stats = collect_imagefolder(root, SHAPE, snaps, workers=1, class_names=["0", "1"])
    assert (stats.decoded, stats.reused) == (200, 0)
    assert again.manifest["undecodable"] == snap.manifest["undecodable"]


def test_a_killed_collection_of_packs_decodes_packs_again_rather_than_reuse_part_of_one(folder, tmp_path,
                                                                                          monkeypatch):
    from nightshift.data import shards

    root = tmp_path / "packs"
    for k, cls in enumerate(("0", "1", "2")):
        _pack(folder, root / f"p{k}.tar", classes=(cls,))
    snaps = tmp_path / "snaps"
    real = _die_writing_shard(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="worker lost"):
        collect_imagefolder(root, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1, class_names=["0", "1", "2"])
    monkeypatch.setattr(shards, "write_shard", real)
    snap, stats = collect_imagefolder(root, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1,
                                      class_names=["0", "1", "2"])
    assert (stats.decoded, stats.reused) == (300, 0)
    fresh, _ = collect_imagefolder(root, SHAPE, tmp_path / "fresh", shard_mb=SMALL_SHARD_MB, workers=1,
                                   class_names=["0", "1", "2"], incremental=False)
    assert snap.digest == fresh.digest


def test_names_with_the_pack_mark_are_reused_like_any_other(folder, tmp_path):
    """``::`` separates a pack from its member in a row's source; a file or member named with it is
    still matched to its own listing entry and class."""
    import io
    import tarfile

    root = tmp_path / "marks"
    _pack(folder, root / "p.tar", classes=("0",))
    with tarfile.open(root / "p.tar", "a") as tar:
        data = (folder / "0" / "img_00000.png").read_bytes()
        info = tarfile.TarInfo("0/x::y.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (root / "1").mkdir(parents=True)
    for f in sorted((folder / "1").iterdir())[:5]:
        (root / "1" / f.name).write_bytes(f.read_bytes())
        (root / "1" / f"{f.name}::copy.png").write_bytes(f.read_bytes())
    snaps = tmp_path / "snaps"
    first, stats = collect_imagefolder(root, SHAPE, snaps, workers=1, class_names=["0", "1"])
    assert stats.decoded == 100 + 1 + 10 and "p.tar::0/x::y.png" in set(first.profile()["source"])
    again, stats = collect_imagefolder(root, SHAPE, snaps, workers=1, class_names=["0", "1"])
    assert (stats.decoded, stats.reused) == (0, 111) and again.digest == first.digest


def test_a_reused_shard_that_cannot_be_opened_decodes_its_packs_again_once(folder, tmp_path, monkeypatch):
    from nightshift.data import collect as collect_mod

    root = tmp_path / "packs"
    for k, cls in enumerate(("0", "1", "2")):
        _pack(folder, root / f"p{k}.tar", classes=(cls,))
    snaps = tmp_path / "snaps"
    first, _ = collect_imagefolder(root, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1, class_names=["0", "1", "2"])
    gone = first.shard_digests[1]  # holds the end of p0 and the start of p1
    real = collect_mod.open_shard

    def open_or_fail(root_dir, digest, **kw):
        if digest == gone:
            raise DataError(f"shard {digest} is missing")
        return real(root_dir, digest, **kw)

    monkeypatch.setattr(collect_mod, "open_shard", open_or_fail)
    snap, stats = collect_imagefolder(root, SHAPE, snaps, shard_mb=SMALL_SHARD_MB, workers=1, class_names=["0", "1", "2"])
    assert (stats.decoded, stats.reused) == (200, 100)  # p0 and p1 whole, once each; p2 reused
    sources_ = snap.profile()["source"].tolist()
    assert len(sources_) == len(set(sources_)) == 300
    assert snapshot_content(snap) == snapshot_content(first)

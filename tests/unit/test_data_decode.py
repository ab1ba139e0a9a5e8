"""Decoding (nightshift.data.decode): bytes to uint8 arrays of the configured shape, the per-image
statistics of the profile, and undecodable files kept with their error."""

from __future__ import annotations

import numpy as np
import pytest

from nightshift.data import sources


def test_to_shape_channel_conversions():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    gray = sources.to_shape(rgb, (4, 4, 1))
    assert gray.shape == (4, 4, 1) and int(gray[0, 0, 0]) == 76  # 0.299 * 255
    assert sources.to_shape(gray, (2, 2, 3)).shape == (2, 2, 3)


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_blobs_decode_to_the_shape_and_failures_keep_their_position_and_reason():
    from nightshift.data.decode import decode_blobs

    img = np.full((6, 6, 3), 200, np.uint8)
    chunk = decode_blobs([_png(img), b"not an image", OSError("gone after the listing"), _png(img[:4, :4])], (4, 4, 1))
    assert chunk.ok == [0, 3] and chunk.images.shape == (2, 4, 4, 1) and chunk.images.dtype == np.uint8
    assert chunk.orig_sizes.tolist() == [[6, 6, 3], [4, 4, 3]]
    errors = dict(chunk.errors)
    assert set(errors) == {1, 2}
    assert errors[1].startswith("UnidentifiedImageError") and errors[2] == "could not read: OSError: gone after the listing"
    assert len(chunk.stats["sha256"]) == 2 and chunk.stats["brightness"].shape == (2,)


def test_image_stats_are_per_image_whatever_the_batch():
    from nightshift.data.decode import image_stats

    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (5, 7, 7, 3), dtype=np.uint8)
    together = image_stats(batch)
    alone = image_stats(batch[2:3])
    assert together["sha256"][2] == alone["sha256"][0]
    for key in ("brightness", "contrast", "mean_ch0", "mean_ch1", "mean_ch2"):
        assert together[key][2] == alone[key][0], key
    assert together["brightness"][2] == pytest.approx(batch[2].astype(np.float64).mean(), rel=1e-6)
    assert together["mean_ch1"][2] == pytest.approx(batch[2][..., 1].astype(np.float64).mean(), rel=1e-6)
    empty = image_stats(np.zeros((0, 7, 7, 3), np.uint8))
    assert empty["sha256"] == [] and len(empty["mean_ch2"]) == 0


def test_decode_error_is_one_readable_line():
    from nightshift.data.decode import decode_error

    assert decode_error(OSError("image file is truncated (3 bytes not processed)")).startswith("truncated image: ")
    assert decode_error(ValueError("bad mode")) == "ValueError: bad mode"


def _tar_bytes(members: list[tuple[str, bytes | None]], *, link: str | None = None) -> bytes:
    """An in-memory tar: ``(name, data)`` files (``None``: a folder) and optionally one symlink member."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


def test_a_pack_decodes_its_members_in_name_order_and_names_each_one_it_cannot_use():
    from nightshift.data.decode import decode_pack

    img = np.full((6, 6, 3), 90, np.uint8)
    blob = _tar_bytes([("cat", None), ("dog/2.png", _png(img)), ("./cat/1.png", _png(img[:3])),
                       ("cat/._1.png", b"macOS metadata"), ("deep/er/3.png", _png(img)), ("bird/4.png", _png(img)),
                       ("cat/notes.txt", b"hi"), ("dog/bad.png", b"\x89PNG nope")], link="cat/5.png")
    chunk = decode_pack(blob, (4, 4, 3), ["cat", "dog"])
    assert chunk.names == ["bird/4.png", "cat/1.png", "cat/5.png", "cat/notes.txt", "deep/er/3.png", "dog/2.png",
                           "dog/bad.png"]
    assert [chunk.names[i] for i in chunk.ok] == ["cat/1.png", "dog/2.png"]
    assert chunk.orig_sizes.tolist() == [[3, 6, 3], [6, 6, 3]]
    errors = {chunk.names[i]: msg for i, msg in chunk.errors}
    assert "'bird' is not one of the configured classes" in errors["bird/4.png"]
    assert "not a regular file" in errors["cat/5.png"] and "unsupported extension" in errors["cat/notes.txt"]
    assert "<class>/<image>" in errors["deep/er/3.png"] and errors["dog/bad.png"].startswith("UnidentifiedImageError")


@pytest.mark.parametrize("blob", [b"", b"plain text, not a tar" * 40, "cut", "gzip"])
def test_a_pack_that_is_not_a_readable_tar_is_one_error_and_no_rows(blob):
    import gzip

    from nightshift.data.decode import decode_pack

    noise = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)  # ~5 KB of PNG
    whole = _tar_bytes([("cat/1.png", _png(noise))])
    data = {"cut": whole[:700], "gzip": gzip.compress(whole)}.get(blob, blob)
    chunk = decode_pack(data, (4, 4, 3), ["cat"])
    assert chunk.ok == [] and chunk.images.shape == (0, 4, 4, 3)
    assert len(chunk.errors) == 1 and chunk.errors[0][0] == -1 and "not a readable tar archive" in chunk.errors[0][1]


def test_concatenated_packs_and_packs_too_big_to_hold_are_reported_whole(monkeypatch):
    from nightshift.data import decode

    a = _tar_bytes([("cat/1.png", _png(np.zeros((4, 4, 3), np.uint8)))])
    b = _tar_bytes([("cat/2.png", _png(np.ones((4, 4, 3), np.uint8)))])
    chunk = decode.decode_pack(a + b, (4, 4, 3), ["cat"])  # tarfile alone would stop after a's members
    assert chunk.ok == [] and "concatenated archives" in chunk.errors[0][1]
    assert decode.decode_pack(a, (4, 4, 3), ["cat"]).ok == [0]
    monkeypatch.setattr(decode, "MAX_PACK_PIXEL_BYTES", 47)  # one 4x4x3 image is 48 bytes
    chunk = decode.decode_pack(a, (4, 4, 3), ["cat"])
    assert chunk.ok == [] and chunk.errors[0][0] == -1 and "split it into packs of at most 0 images" in chunk.errors[0][1]

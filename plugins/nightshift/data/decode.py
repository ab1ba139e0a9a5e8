"""Decoding images into uint8 arrays of one shape, and their per-image statistics.

Runs in worker processes during collection, so it imports only numpy and
Pillow (lazily). Every function works on a *chunk* of images, so a worker
returns one compact array per chunk instead of thousands of small objects.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

#: Bumped when decoding or resizing changes the pixels of an unchanged file, so
#: incremental collection never reuses pixels decoded by an older method.
DECODER_VERSION = 1

#: Suffixes of image files, in a class folder or a pack.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})


def to_shape(img: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Convert an HxW or HxWxC uint8 image to ``shape`` (bilinear resize + channel conversion)."""
    from PIL import Image

    h, w, c = shape
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 4:  # drop alpha
        img = img[:, :, :3]
    if img.shape[:2] != (h, w):
        mode = "L" if img.shape[2] == 1 else "RGB"
        pil = Image.fromarray(img[:, :, 0] if mode == "L" else img, mode=mode)
        img = np.asarray(pil.resize((w, h), Image.BILINEAR))
        if img.ndim == 2:
            img = img[:, :, None]
    if img.shape[2] != c:
        if c == 1:  # ITU-R 601 luma, as PIL's convert("L")
            img = (img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
            img = np.clip(np.rint(img), 0, 255).astype(np.uint8)[:, :, None]
        elif c == 3 and img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        else:
            raise ValueError(f"cannot convert {img.shape[2]} channels to {c}")
    return np.ascontiguousarray(img, dtype=np.uint8)


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG/... bytes into an HxWxC uint8 array; raises on corrupt data."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()  # forces a full decode: truncated files fail here, not later
        if im.mode not in ("L", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.mode else "RGB")
        arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {arr.dtype}")
    return arr


def decode_error(exc: BaseException) -> str:
    """A one-line, human-readable reason a file could not be decoded."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "UnidentifiedImageError: not a readable image (corrupt, or not PNG/JPEG/BMP/GIF/WebP)"
    if isinstance(exc, OSError) and "truncated" in str(exc):
        return f"truncated image: {exc}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Chunk:
    """Decoded images of one chunk and everything the profile needs about them.

    ``ok`` holds the positions (in the chunk's input order) that decoded;
    ``errors`` the others, as ``(position, reason)``. A chunk decoded from a pack
    (:func:`decode_pack`) also names each position's member (``names``, ``<class>/<image>``);
    position -1 in ``errors`` is the pack itself (not a readable tar archive).
    """

    images: np.ndarray  # (k, H, W, C) uint8, k = len(ok)
    ok: list[int]
    orig_sizes: np.ndarray  # (k, 3)
    stats: dict[str, np.ndarray]
    errors: list[tuple[int, str]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def image_digests(images: np.ndarray) -> list[bytes]:
    """The raw SHA-256 digest of each image's uint8 pixels (``image_stats``'s ``sha256``, as bytes).

    Hashes slices of one buffer (no per-image array objects): it runs once per image
    and is the only per-image Python step of the statistics.
    """
    n = len(images)
    if n == 0:
        return []
    buf = memoryview(np.ascontiguousarray(images)).cast("B")
    k = len(buf) // n
    sha = hashlib.sha256
    return [sha(buf[i * k:(i + 1) * k]).digest() for i in range(n)]


def image_moments(images: np.ndarray) -> dict[str, np.ndarray]:
    """``brightness``, ``contrast`` and ``mean_ch<k>`` of a uint8 NHWC batch, vectorised over it.

    Each image's values depend on that image only (every reduction stays within one
    image), so a batch of any size gives every image the same values as it alone would.
    The definition is float32 numpy ``mean``/``std`` over each image and each channel.
    """
    n = len(images)
    c = images.shape[-1] if images.ndim == 4 else 1
    if n == 0:
        return {"brightness": np.zeros(0), "contrast": np.zeros(0), **{f"mean_ch{k}": np.zeros(0) for k in range(c)}}
    flat = images.reshape(n, -1).astype(np.float32)
    out = {"brightness": flat.mean(axis=1).astype(np.float64), "contrast": flat.std(axis=1).astype(np.float64)}
    per_channel = flat.shape[1] // c
    if c > 1 and per_channel * 255 < 1 << 24:
        # The same values, ~10x faster than a mean over the strided middle axis: a channel's
        # sum of at most 2^24 in float32 is exact in any order (integers), so summing a
        # channel-major copy gives the float32 sums `mean` forms, divided as `mean` divides.
        ch = np.ascontiguousarray(images.reshape(n, -1, c).transpose(0, 2, 1)).astype(np.float32).sum(axis=2)
        np.true_divide(ch, per_channel, out=ch, casting="unsafe")
    else:
        ch = flat.reshape(n, -1, c).mean(axis=1)
    for k in range(c):
        out[f"mean_ch{k}"] = ch[:, k].astype(np.float64)
    return out


def image_stats(images: np.ndarray) -> dict[str, Any]:
    """Per-image profile statistics of a uint8 NHWC batch.

    ``sha256`` of the pixels (hex), ``brightness`` (mean of all values, 0–255),
    ``contrast`` (their std), ``mean_ch<k>`` (per-channel mean). These are the
    definitions of the profile table (``docs/architecture.md``); the serving
    request log uses the same ones (:func:`image_digests` and :func:`image_moments`,
    which this function is made of, over a whole batch of requests at once).
    """
    return {"sha256": [d.hex() for d in image_digests(images)], **image_moments(images)}


def _finish(shape: tuple[int, int, int], arrays: list[np.ndarray], ok: list[int], sizes: list[tuple[int, ...]],
            errors: list[tuple[int, str]], names: list[str] | None = None) -> Chunk:
    h, w, c = shape
    images = np.stack(arrays) if arrays else np.zeros((0, h, w, c), np.uint8)
    return Chunk(images=images, ok=ok, orig_sizes=np.asarray(sizes, np.int64).reshape(-1, 3),
                 stats=image_stats(images), errors=errors, names=list(names or []))


def decode_blobs(blobs: Sequence[bytes | BaseException | str], shape: tuple[int, int, int],
                 names: list[str] | None = None) -> Chunk:
    """Decode a chunk of file contents (an exception in place of bytes = the read failed; a string =
    the reason the entry is not decoded at all)."""
    arrays, ok, sizes, errors = [], [], [], []
    for i, blob in enumerate(blobs):
        if isinstance(blob, str):
            errors.append((i, blob))
            continue
        if isinstance(blob, BaseException):
            errors.append((i, f"could not read: {type(blob).__name__}: {blob}"))
            continue
        try:
            arr = decode_image(blob)
            converted = to_shape(arr, shape)
        except Exception as exc:  # noqa: BLE001 - every failure is reported per file
            errors.append((i, decode_error(exc)))
            continue
        arrays.append(converted)
        ok.append(i)
        sizes.append(arr.shape)
    return _finish(shape, arrays, ok, sizes, errors, names)


def pack_members(blob: bytes | BaseException, classes: Sequence[str]) -> tuple[list[str], list[bytes | BaseException | str]]:
    """The ``<class>/<image>`` members of a tar pack, in name order, with their bytes -- or, in place
    of the bytes, why a member is not an image of the configured ``classes`` (reported, not dropped).

    Directories and hidden entries (a path part starting with ``.``, e.g. macOS ``._`` files) are
    left out; links, devices and other non-regular members are reported. A pack that is not a
    readable tar archive (truncated, compressed, not a tar at all) raises ``ValueError``, so none of
    its members is half-read into a snapshot."""
    import posixpath
    import tarfile

    if isinstance(blob, BaseException):
        raise ValueError(f"could not read: {type(blob).__name__}: {blob}")
    known = set(classes)
    found: dict[str, bytes | str] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            for m in tar:
                name = posixpath.normpath(m.name.lstrip("/"))
                if m.isdir() or any(part.startswith(".") for part in name.split("/")):
                    continue
                parts = name.split("/")
                if not m.isfile():
                    found[name] = "not a regular file in the pack (link or special member): not read"
                elif len(parts) != 2:
                    found[name] = ("not at <class>/<image> in the pack (packs hold <class>/<image> members, "
                                   "like a class folder)")
                elif parts[0] not in known:
                    found[name] = (f"class {parts[0]!r} is not one of the configured classes {sorted(known)}: "
                                   "fix the member's folder or the 'classes' setting")
                elif posixpath.splitext(parts[1])[1].lower() not in IMAGE_SUFFIXES:
                    found[name] = "not an image file (unsupported extension)"
                else:
                    f = tar.extractfile(m)
                    found[name] = f.read() if f is not None else "cannot be read from the pack"
            # tarfile takes a header cut short after the first member for the end of the archive:
            # a complete archive ends with zero blocks, a cut one does not (its tail would be lost);
            # and it stops at the first archive of several concatenated ones (`cat a.tar b.tar`)
            end = tar.offset
            if len(blob) < end + tarfile.BLOCKSIZE or any(blob[end:end + tarfile.BLOCKSIZE]):
                raise tarfile.ReadError(f"the archive ends without its end-of-archive blocks at byte {end} of "
                                        f"{len(blob)} (cut short?)")
            if blob[end:].strip(b"\0"):
                raise tarfile.ReadError(f"more data follows the end of the archive at byte {end} of {len(blob)} "
                                        "(concatenated archives? make one with `tar -A` or a single `tar -c`)")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"not a readable tar archive: {type(exc).__name__}: {exc} (packs are uncompressed "
                         ".tar files of <class>/<image> members; the images are compressed already)") from exc
    names = sorted(found)
    return names, [found[n] for n in names]


#: The most decoded pixel bytes one pack may hold: a pack is decoded as one chunk (in a worker, then
#: sent back whole), and a few are in flight, so a pack of many large images is reported instead.
MAX_PACK_PIXEL_BYTES = 256 * 2**20


def decode_pack(blob: bytes | BaseException, shape: tuple[int, int, int], classes: Sequence[str]) -> Chunk:
    """Decode every image of one tar pack (:func:`pack_members`). ``names`` holds each member;
    a pack that cannot be read at all, or would decode to more than ``MAX_PACK_PIXEL_BYTES``, is
    one error at position -1, with no rows."""
    try:
        names, blobs = pack_members(blob, classes)
    except ValueError as exc:
        return _finish(shape, [], [], [], [(-1, str(exc))])
    images = sum(isinstance(b, bytes) for b in blobs)
    per_image = int(np.prod(shape))
    if images * per_image > MAX_PACK_PIXEL_BYTES:
        most = MAX_PACK_PIXEL_BYTES // per_image
        return _finish(shape, [], [], [], [(-1, f"pack of {images} images decodes to {images * per_image / 2**20:.0f} "
                                                f"MiB at {list(shape)}, more than the {MAX_PACK_PIXEL_BYTES >> 20} MiB "
                                                f"a decode worker holds at once: split it into packs of at most "
                                                f"{most} images")])
    return decode_blobs(blobs, shape, names)


def decode_pack_file(path: str, shape: tuple[int, int, int], classes: Sequence[str]) -> Chunk:
    """Read and decode a local tar pack (run in a worker process)."""
    try:
        with open(path, "rb") as f:
            blob: bytes | BaseException = f.read()
    except OSError as exc:
        blob = exc
    return decode_pack(blob, shape, classes)


def decode_files(paths: Sequence[str], shape: tuple[int, int, int]) -> Chunk:
    """Read and decode a chunk of local files (run in a worker process)."""
    blobs: list[bytes | BaseException] = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                blobs.append(f.read())
        except OSError as exc:
            blobs.append(exc)
    return decode_blobs(blobs, shape)

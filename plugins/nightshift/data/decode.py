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
    ``errors`` the others, as ``(position, reason)``.
    """

    images: np.ndarray  # (k, H, W, C) uint8, k = len(ok)
    ok: list[int]
    orig_sizes: np.ndarray  # (k, 3)
    stats: dict[str, np.ndarray]
    errors: list[tuple[int, str]] = field(default_factory=list)


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
            errors: list[tuple[int, str]]) -> Chunk:
    h, w, c = shape
    images = np.stack(arrays) if arrays else np.zeros((0, h, w, c), np.uint8)
    return Chunk(images=images, ok=ok, orig_sizes=np.asarray(sizes, np.int64).reshape(-1, 3),
                 stats=image_stats(images), errors=errors)


def decode_blobs(blobs: Sequence[bytes | BaseException], shape: tuple[int, int, int]) -> Chunk:
    """Decode a chunk of file contents (an exception in place of bytes = the read failed)."""
    arrays, ok, sizes, errors = [], [], [], []
    for i, blob in enumerate(blobs):
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
    return _finish(shape, arrays, ok, sizes, errors)


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

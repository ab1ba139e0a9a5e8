"""Decoding an uploaded PNG/JPEG into the model's input pixels (the ``/classify`` route).

Pillow + numpy. The decoding and resizing functions are the collection's own
(``nightshift.data.decode``, copied into the image as ``serving/decode.py``),
so an uploaded file becomes exactly the pixels training saw for the same file.
"""

from __future__ import annotations

import io

import numpy as np

from .errors import InvalidInput, UnsupportedMediaType

try:  # in the image: copied from nightshift/data/decode.py at build time
    from . import decode as _decode  # type: ignore[attr-defined]
except ImportError:  # in the repository
    from nightshift.data import decode as _decode

#: Larger images are refused from their header, before decoding (decompression bombs); nothing
#: process-wide is changed per upload (uploads decode on several threads at once).
MAX_PIXELS = 40_000_000


def decode_upload(data: bytes, shape: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Decode PNG/JPEG bytes and convert them to ``shape`` (H, W, C).

    :returns: a ``(1, H, W, C)`` uint8 batch and the upload's own ``(h, w, c)``.
    :raises UnsupportedMediaType: not a PNG or JPEG file.
    :raises InvalidInput: corrupt, truncated or oversized image.
    """
    if not (data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff")):
        raise UnsupportedMediaType("the body is not a PNG or JPEG file (checked by its signature)")
    from PIL import Image  # its own decompression-bomb limit (~89M pixels) stays: a second fence
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            w, h = probe.size
        if w * h > MAX_PIXELS:
            raise InvalidInput(f"image too large: {w}x{h} = {w * h:,} pixels; this server decodes at most "
                               f"{MAX_PIXELS:,} (resize it before uploading)")
        img = _decode.decode_image(data)
        orig = (int(img.shape[0]), int(img.shape[1]), int(img.shape[2]))
        pixels = _decode.to_shape(img, shape)
    except InvalidInput:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"image too large: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        raise InvalidInput(f"could not decode the image: {type(exc).__name__}: {exc}") from exc
    return pixels[None, ...], orig

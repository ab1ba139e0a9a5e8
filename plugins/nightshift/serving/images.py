"""Decoding an uploaded PNG/JPEG into the model's input pixels (the ``/classify`` route).

Pillow + numpy. The decoding and resizing functions are the collection's own
(``nightshift.data.decode``, copied into the image as ``serving/decode.py``),
so an uploaded file becomes exactly the pixels training saw for the same file.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidInput, UnsupportedMediaType

try:  # in the image: copied from nightshift/data/decode.py at build time
    from . import decode as _decode  # type: ignore[attr-defined]
except ImportError:  # in the repository
    from nightshift.data import decode as _decode

#: Larger images are refused before decoding (decompression bombs).
MAX_PIXELS = 40_000_000


def decode_upload(data: bytes, shape: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Decode PNG/JPEG bytes and convert them to ``shape`` (H, W, C).

    :returns: a ``(1, H, W, C)`` uint8 batch and the upload's own ``(h, w, c)``.
    :raises UnsupportedMediaType: not a PNG or JPEG file.
    :raises InvalidInput: corrupt, truncated or oversized image.
    """
    from PIL import Image

    if not (data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff")):
        raise UnsupportedMediaType("the body is not a PNG or JPEG file (checked by its signature)")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _decode.decode_image(data)
        orig = (int(img.shape[0]), int(img.shape[1]), int(img.shape[2]))
        pixels = _decode.to_shape(img, shape)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"image too large: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        raise InvalidInput(f"could not decode the image: {type(exc).__name__}: {exc}") from exc
    return pixels[None, ...], orig

"""Decoding (nightshift.data.decode): bytes to uint8 arrays of the configured shape, the per-image statistics of the profile, and undecodable files kept with their error."""

from __future__ import annotations

import numpy as np

from nightshift.data import sources


def test_to_shape_channel_conversions():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    gray = sources.to_shape(rgb, (4, 4, 1))
    assert gray.shape == (4, 4, 1) and int(gray[0, 0, 0]) == 76  # 0.299 * 255
    assert sources.to_shape(gray, (2, 2, 3)).shape == (2, 2, 3)

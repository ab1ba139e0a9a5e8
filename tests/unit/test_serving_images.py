"""Image uploads (:mod:`nightshift.serving.images`, the ``/classify`` route): decoded as the
collection decodes them, refused when they are not a PNG or JPEG or too large."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.serving_support import png


def test_classify_upload_matches_the_collection_decoder(serving_server, http, tiny_onnx_forward):
    from nightshift.data.decode import decode_image, to_shape

    img = np.random.default_rng(5).integers(0, 256, (9, 7, 3), dtype=np.uint8)  # other size, RGB
    data = png(img)
    expected_pixels = to_shape(decode_image(data), (4, 4, 1))[None]
    logits, _ = tiny_onnx_forward(expected_pixels)
    r = http.post(f"{serving_server.url}/v2/models/tiny/classify", data=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    ans = r.json()
    assert ans["class"] == ["zero", "one", "two"][int(logits[0].argmax())]
    assert sum(ans["probabilities"].values()) == pytest.approx(1.0)
    assert ans["input_size"] == {"height": 9, "width": 7, "channels": 3}
    jpeg = png(img, "JPEG")
    assert http.post(f"{serving_server.url}/v2/models/tiny/versions/1/classify", data=jpeg,
                     headers={"Content-Type": "image/jpeg"}).status_code == 200


@pytest.mark.parametrize(
    ("data", "ctype", "status", "needle"),
    [
        pytest.param(b"GIF89a....", "image/png", 415, "not a PNG or JPEG", id="gif"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "image/png", 400, "could not decode", id="corrupt-png"),
        pytest.param(b"--x\r\n", "multipart/form-data; boundary=x", 415, "not a form", id="multipart"),
        pytest.param(b"{}", "application/json", 415, "image/png or image/jpeg", id="json"),
    ],
)
def test_classify_rejects_bad_uploads(serving_server, http, data, ctype, status, needle):
    r = http.post(f"{serving_server.url}/v2/models/tiny/classify", data=data, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_an_upload_larger_than_the_pixel_limit_is_refused_from_its_header(monkeypatch):
    import io
    import warnings

    from PIL import Image

    from nightshift.serving import images
    from nightshift.serving.errors import InvalidInput

    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="PNG")
    monkeypatch.setattr(images, "MAX_PIXELS", 300 * 200 - 1)
    decoded: list[bytes] = []
    monkeypatch.setattr(images._decode, "decode_image", lambda data: decoded.append(data))
    filters = list(warnings.filters)
    with pytest.raises(InvalidInput, match=r"image too large: 300x200 = 60,000 pixels; .* at most 59,999"):
        images.decode_upload(buf.getvalue(), (8, 8, 3))
    assert decoded == []  # refused before decoding
    assert warnings.filters == filters  # no process-wide warning filters touched per upload
    monkeypatch.undo()
    pixels, orig = images.decode_upload(buf.getvalue(), (8, 8, 3))
    assert pixels.shape == (1, 8, 8, 3) and orig == (200, 300, 3)

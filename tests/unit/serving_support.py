"""Helpers shared by the serving tests (``test_serving_*.py``): an in-process server on
127.0.0.1, request bodies for the tiny model, and readers of ``/metrics``."""

from __future__ import annotations

import io
import json
import time
from typing import Any, Callable

import numpy as np
import requests


class ServingHandle:
    """A running in-process server (uvicorn in a thread): ``url``, ``model``, ``server``, ``app``."""

    def __init__(self, server, model):
        self.server, self.model, self.app = server, model, server.app
        self.url = server.url
        server.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def serve(model_dir, *, config=None, request_log=None, **uvicorn_kw):
    """The tiny model (at most 8 images a request, one ORT thread) served on a free loopback
    port in a thread; ``config``: an :class:`~nightshift.serving.app.AppConfig`. Call
    ``shutdown()`` and ``server_close()`` when done."""
    from nightshift.serving.app import AppConfig
    from nightshift.serving.server import Model, make_server

    model = Model(model_dir, max_batch=8, intra_op_threads=1)
    model.load()
    return make_server(model, "127.0.0.1", 0, config=config or AppConfig(), request_log=request_log,
                       **uvicorn_kw).start()


def infer_body(pixels: np.ndarray, **extra) -> dict:
    """An OIP JSON infer request for uint8 ``pixels``."""
    return {"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8",
                        "data": pixels.reshape(-1).tolist()}], **extra}


def good_json(n: int = 2) -> bytes:
    """A valid JSON infer body of ``n`` 4x4x1 images (nested data, as ``tolist()`` sends it)."""
    x = np.arange(n * 16, dtype=np.uint8).reshape(n, 4, 4, 1)
    return json.dumps({"inputs": [{"name": "pixels", "shape": [n, 4, 4, 1], "datatype": "UINT8",
                                   "data": x.tolist()}]}).encode()


def infer(http, url: str, body: bytes, **headers) -> requests.Response:
    return http.post(f"{url}/v2/models/tiny/infer", data=body,
                     headers={"Content-Type": "application/json", **headers}, timeout=10)


def assert_still_serving(http, url: str) -> None:
    r = infer(http, url, good_json())
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"][0] == 2


def metric_text(text: str, name: str) -> float:
    """The value of series ``name`` (with its labels, if any) in a Prometheus text exposition; 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " ") or (("{" in name) and line.startswith(name)):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def metric(http, url: str, name: str) -> float:
    return metric_text(http.get(f"{url}/metrics").text, name)


def wait_for(predicate: Callable[[], Any], *, what: str, timeout_s: float = 30.0, every_s: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something true and return that; the deadline only
    bounds a hang (fails the test naming ``what``), it is not part of what is tested."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    """``arr`` (H, W, C) encoded as a PNG (or ``fmt``) file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format=fmt)
    return buf.getvalue()

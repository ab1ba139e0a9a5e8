"""Nightshift's Open Inference Protocol (KServe v2) server.

This package is copied into the inference image as-is, so it imports only the
standard library, :mod:`numpy` and :mod:`onnxruntime` -- never Airflow, torch or
the rest of :mod:`nightshift`.

Run it with ``python -m serving.server`` (inside the image) or
``python server.py``; see :mod:`serving.server` for the environment variables.
The package deliberately does not import :mod:`.server` here, so that
``python -m serving.server`` and the tiny :mod:`.healthcheck` stay cheap.
"""

__all__ = ["server", "healthcheck"]

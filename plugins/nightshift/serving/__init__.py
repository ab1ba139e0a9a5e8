"""Nightshift's Open Inference Protocol (KServe v2) server.

This package is copied into the inference image as-is, so it imports only the
standard library, :mod:`numpy`, :mod:`onnxruntime`, uvicorn (+ httptools,
uvloop), grpcio + protobuf, :mod:`prometheus_client` and Pillow -- never Airflow, torch or the
rest of :mod:`nightshift` (``decode.py`` is copied from ``nightshift.data``).

Modules: :mod:`.model` (the ONNX model and its input validation),
:mod:`.protocol` (JSON and binary OIP bodies), :mod:`.batching` (dynamic
batching), :mod:`.app` (the ASGI routes), :mod:`.metrics`, :mod:`.requestlog`
(drift-monitoring samples), :mod:`.images` (uploads), :mod:`.grpc_service`
(the OIP gRPC service on the same loop, batcher and request log), :mod:`.server`
(the entry point: configuration, logging, uvicorn), :mod:`.healthcheck`.
"""

__version__ = "0.2.0"
__all__ = ["app", "batching", "grpc_service", "healthcheck", "images", "metrics", "model", "protocol", "requestlog", "server"]

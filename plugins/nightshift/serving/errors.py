"""Typed serving errors, KServe style: each maps to one HTTP status.

Standard library only (copied into the inference image).
"""

from __future__ import annotations

from http import HTTPStatus


class InferenceError(Exception):
    """Base class of errors that become an HTTP answer ``{"error": message}``.

    :param message: what went wrong, written for the client.
    """

    status: int = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


class InvalidInput(InferenceError):
    """The request is malformed or does not match the model's input (400)."""

    status = HTTPStatus.BAD_REQUEST


class ModelNotFound(InferenceError):
    """The request names a model (or version) this server does not serve (404)."""

    status = HTTPStatus.NOT_FOUND


class RouteNotFound(InferenceError):
    """No endpoint at this path (404)."""

    status = HTTPStatus.NOT_FOUND


class MethodNotAllowed(InferenceError):
    """The path exists but not for this HTTP method (405).

    :param allowed: the methods the path accepts, for the ``Allow`` header.
    """

    status = HTTPStatus.METHOD_NOT_ALLOWED

    def __init__(self, message: str, allowed: str):
        self.allowed = allowed
        super().__init__(message)


class LengthRequired(InferenceError):
    """A POST came without ``Content-Length`` (411)."""

    status = HTTPStatus.LENGTH_REQUIRED


class PayloadTooLarge(InferenceError):
    """The body or the batch is larger than this server accepts (413)."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class ModelNotReady(InferenceError):
    """The model has not been loaded (yet), or loading it failed (503)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class InferenceFailed(InferenceError):
    """ONNX Runtime raised, or produced an unusable result (500)."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR


class ModelLoadError(Exception):
    """The model directory is missing, incomplete or inconsistent."""


class RequestTimeout(InferenceError):
    """The client did not send its whole body in time (408)."""

    status = HTTPStatus.REQUEST_TIMEOUT


class UnsupportedMediaType(InferenceError):
    """The body's Content-Type is not one this endpoint reads (415)."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class Overloaded(InferenceError):
    """The batching queue is full (503 with ``Retry-After``).

    :param retry_after_s: seconds the client should wait before retrying.
    """

    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, message: str, retry_after_s: int = 1):
        self.retry_after_s = retry_after_s
        super().__init__(message)

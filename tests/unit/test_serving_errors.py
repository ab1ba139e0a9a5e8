"""The serving errors (nightshift.serving.errors): each is one HTTP answer, with its own status."""

from __future__ import annotations

from http import HTTPStatus

from nightshift.serving import errors


def _answers() -> dict[str, type]:
    return {name: cls for name, cls in vars(errors).items()
            if isinstance(cls, type) and issubclass(cls, errors.InferenceError) and cls is not errors.InferenceError}


def test_client_mistakes_are_4xx_and_the_servers_troubles_5xx():
    status = {name: HTTPStatus(cls.status) for name, cls in _answers().items()}
    assert status["InvalidInput"] == HTTPStatus.BAD_REQUEST
    assert status["PayloadTooLarge"] == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    assert status["ModelNotReady"] == status["Overloaded"] == HTTPStatus.SERVICE_UNAVAILABLE
    assert status["InferenceFailed"] == HTTPStatus.INTERNAL_SERVER_ERROR
    assert all(400 <= s < 600 for s in status.values()), status


def test_a_model_that_cannot_load_is_not_an_http_answer():
    """Loading fails before the server answers anything: the process exits, no status is made up."""
    assert not issubclass(errors.ModelLoadError, errors.InferenceError)

"""Shared plumbing for Nightshift operators."""

from __future__ import annotations

import functools
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from airflow.sdk import BaseOperator

from nightshift.artifacts import run_dir
from nightshift.errors import ConfigError, NightshiftError
from nightshift.settings import Settings


def _fail_fast(execute: Callable[..., Any]) -> Callable[..., Any]:
    """Deterministic failures (bad data, bad config, parity breach, no GPU) fail the
    task at once: retrying cannot fix them. Anything else keeps the DAG's retries."""

    @functools.wraps(execute)
    def wrapper(self: "NightshiftOperator", context: Any) -> Any:
        try:
            return execute(self, context)
        except NightshiftError as exc:
            if not exc.retryable:
                from airflow.sdk.exceptions import AirflowFailException

                raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
            raise

    return wrapper


class NightshiftOperator(BaseOperator):
    """Base class: settings, the run's artifact folder, the MLflow client, and
    no retries for errors that a retry cannot fix."""

    ui_color = "#e8eaf6"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "execute" in cls.__dict__:
            cls.execute = _fail_fast(cls.__dict__["execute"])  # type: ignore[method-assign]

    @cached_property
    def settings(self) -> Settings:
        return Settings.from_env()

    def run_dir(self, context: Any, *parts: str) -> Path:
        path = run_dir(self.settings.artifact_root, self.dag_id, context["run_id"]).joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @cached_property
    def mlflow(self):
        from nightshift import registry

        return registry.client(self.settings.mlflow_tracking_uri, self.settings.mlflow_registry_uri)

    @staticmethod
    def require(value: Any, name: str, upstream: str) -> Any:
        """Upstream XCom values must be present; say which task to look at when not."""
        if not value:
            raise ConfigError(f"{name} is empty: expected the result of the '{upstream}' task (XCom)")
        return value


def shape3(value: Any) -> tuple[int, int, int] | None:
    if value in (None, "", []):
        return None
    try:
        h, w, c = (int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"image_shape must be [height, width, channels], got {value!r}") from exc
    if min(h, w) < 1 or c not in (1, 3):
        raise ConfigError(f"image_shape {value!r}: sizes must be positive and channels 1 or 3")
    return (h, w, c)

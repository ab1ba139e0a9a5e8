"""Where Nightshift keeps its state, read from the environment.

Operators resolve these at execute time (never at DAG parse time). Every value
can be overridden per deployment with an environment variable; the Makefile and
``scripts/env.sh`` set them for the local, project-contained setup.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _project_root() -> Path:
    # plugins/nightshift/settings.py -> project root
    return Path(__file__).resolve().parents[2]


def to_bool(value: Any) -> bool:
    """A templated or env flag as bool: ``"true"/"1"/"yes"/"on"`` (any case) are true."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def positive_int(value: Any, what: str, expected: str = "a positive integer") -> int:
    """``value`` as an integer >= 1, else a :class:`~nightshift.errors.ConfigError` naming ``what``
    (e.g. ``"NIGHTSHIFT_GPU_COUNT"``) and the value it got."""
    from nightshift.errors import ConfigError

    try:
        n = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{what} must be {expected}, got {value!r}") from None
    if n < 1:
        raise ConfigError(f"{what} must be {expected}, got {n}")
    return n


@dataclass(frozen=True)
class Settings:
    home: Path
    #: The working copy of the artifact store that code reads and writes: the artifact root itself
    #: when it is a folder, this worker's cache of it when it is ``s3://`` (:mod:`nightshift.store`).
    artifact_root: Path
    mlflow_tracking_uri: str
    mlflow_registry_uri: str
    base_image: str
    wheelhouse: Path
    gates_file: Path
    #: ``NIGHTSHIFT_ARTIFACT_ROOT`` as given: a folder, or ``s3://bucket/prefix``.
    artifact_uri: str = ""
    #: Where an ``s3://`` artifact root keeps its working copy (``NIGHTSHIFT_ARTIFACT_CACHE``).
    artifact_cache: Path | None = None

    def store(self, s3: Any = None):
        """The artifact store (:func:`nightshift.store.open_store`); ``s3``: :class:`~nightshift.store.S3Options`
        resolved from an Airflow connection (default: the environment's)."""
        from nightshift.store import open_store

        return open_store(self.artifact_uri or self.artifact_root, cache_dir=self.artifact_cache, s3=s3)

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(os.environ.get("NIGHTSHIFT_HOME", _project_root() / ".nightshift")).resolve()
        artifact_uri = os.environ.get("NIGHTSHIFT_ARTIFACT_ROOT") or str(home / "artifacts")
        cache = Path(os.environ.get("NIGHTSHIFT_ARTIFACT_CACHE") or home / "artifact-cache")
        if artifact_uri.startswith("s3://"):
            from nightshift.store import open_store

            artifact_root = open_store(artifact_uri, cache_dir=cache).local_root
        else:
            artifact_root = Path(artifact_uri.removeprefix("file://"))
        tracking = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        registry = os.environ.get("MLFLOW_REGISTRY_URI", tracking)
        return cls(
            home=home,
            artifact_root=artifact_root,
            artifact_uri=artifact_uri,
            artifact_cache=cache,
            mlflow_tracking_uri=tracking,
            mlflow_registry_uri=registry,
            base_image=os.environ.get("NIGHTSHIFT_BASE_IMAGE", "nightshift/base:bookworm"),
            wheelhouse=Path(os.environ.get("NIGHTSHIFT_WHEELHOUSE", home / "wheelhouse")),
            gates_file=Path(os.environ.get("NIGHTSHIFT_GATES_FILE", _project_root() / "include" / "gates.yaml")),
        )

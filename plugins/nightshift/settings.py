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
    artifact_root: Path
    mlflow_tracking_uri: str
    mlflow_registry_uri: str
    base_image: str
    wheelhouse: Path
    gates_file: Path

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(os.environ.get("NIGHTSHIFT_HOME", _project_root() / ".nightshift")).resolve()
        artifact_root = Path(os.environ.get("NIGHTSHIFT_ARTIFACT_ROOT", home / "artifacts"))
        tracking = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        registry = os.environ.get("MLFLOW_REGISTRY_URI", tracking)
        return cls(
            home=home,
            artifact_root=artifact_root,
            mlflow_tracking_uri=tracking,
            mlflow_registry_uri=registry,
            base_image=os.environ.get("NIGHTSHIFT_BASE_IMAGE", "nightshift/base:bookworm"),
            wheelhouse=Path(os.environ.get("NIGHTSHIFT_WHEELHOUSE", home / "wheelhouse")),
            gates_file=Path(os.environ.get("NIGHTSHIFT_GATES_FILE", _project_root() / "include" / "gates.yaml")),
        )

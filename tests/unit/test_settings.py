"""Settings from the environment (nightshift.settings): the home, the artifact root (a folder or
``s3://``), MLflow, and the flag and count parsers the operators and placements use."""

from __future__ import annotations

from pathlib import Path

import pytest

from nightshift.errors import ConfigError
from nightshift.settings import Settings, positive_int, to_bool

ENV = ("NIGHTSHIFT_HOME", "NIGHTSHIFT_ARTIFACT_ROOT", "NIGHTSHIFT_ARTIFACT_CACHE", "MLFLOW_TRACKING_URI",
       "MLFLOW_REGISTRY_URI", "NIGHTSHIFT_BASE_IMAGE", "NIGHTSHIFT_WHEELHOUSE", "NIGHTSHIFT_GATES_FILE")


@pytest.fixture
def env(monkeypatch, tmp_path):
    """Nothing of Nightshift in the environment but a home in ``tmp_path``."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path))
    return monkeypatch


@pytest.mark.parametrize("value, expected", [("true", True), (" YES ", True), ("1", True), ("on", True),
                                             ("false", False), ("0", False), ("", False), ("nope", False),
                                             (True, True), (0, False)])
def test_to_bool(value, expected):
    assert to_bool(value) is expected


def test_positive_int_names_the_setting_and_the_value():
    assert positive_int(" 3 ", "NIGHTSHIFT_GPU_COUNT") == 3
    with pytest.raises(ConfigError, match=r"NIGHTSHIFT_GPU_COUNT must be a positive integer, got 'two'"):
        positive_int("two", "NIGHTSHIFT_GPU_COUNT")
    with pytest.raises(ConfigError, match=r"workers must be at least one, got 0"):
        positive_int(0, "workers", "at least one")


def test_defaults_live_under_the_home(env, tmp_path):
    s = Settings.from_env()
    assert s.home == tmp_path.resolve()
    assert s.artifact_root == tmp_path.resolve() / "artifacts" and s.artifact_uri == str(s.artifact_root)
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert s.mlflow_registry_uri == s.mlflow_tracking_uri  # the registry follows tracking unless set
    assert s.wheelhouse == tmp_path.resolve() / "wheelhouse" and s.artifact_cache == tmp_path.resolve() / "artifact-cache"
    assert s.gates_file.name == "gates.yaml" and s.gates_file.parent.name == "include"


def test_the_environment_wins(env, tmp_path):
    env.setenv("NIGHTSHIFT_ARTIFACT_ROOT", f"file://{tmp_path / 'elsewhere'}")
    env.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    env.setenv("MLFLOW_REGISTRY_URI", "http://registry:5000")
    env.setenv("NIGHTSHIFT_BASE_IMAGE", "base:1")
    s = Settings.from_env()
    assert s.artifact_root == tmp_path / "elsewhere"  # file:// is a folder
    assert (s.mlflow_tracking_uri, s.mlflow_registry_uri, s.base_image) == ("http://mlflow:5000",
                                                                            "http://registry:5000", "base:1")


def test_a_local_root_opens_as_a_folder_store(env, tmp_path):
    store = Settings.from_env().store()
    assert Path(store.local_root) == tmp_path.resolve() / "artifacts"

"""The wheelhouse of the inference image (nightshift.wheelhouse): serving requirements pinned to the
installed versions, reused without pip, and a download failure that names the package and the fix."""

from __future__ import annotations

import importlib.metadata as md
import subprocess

import pytest

from nightshift.errors import BuildError, ConfigError
from nightshift.wheelhouse import _wheelhouse_key, ensure_wheelhouse, serving_requirements


def test_serving_requirements_pin_the_installed_versions():
    reqs = serving_requirements()
    pins = dict(r.split("==") for r in reqs)
    assert pins["onnxruntime"] == md.version("onnxruntime")
    assert pins["numpy"] == md.version("numpy")
    assert all("==" in r and r.split("==")[1] for r in reqs)
    # onnxruntime's own runtime dependencies come along; its extras do not
    for dep in ("protobuf", "packaging", "flatbuffers"):
        assert pins.get(dep) == md.version(dep), reqs
    assert "sympy" not in pins and "ml_dtypes" not in pins and "ml-dtypes" not in pins
    assert reqs == sorted(reqs, key=str.lower)


def test_serving_requirements_missing_package():
    with pytest.raises(ConfigError, match="no-such-dist-nightshift .*is not installed"):
        serving_requirements(["no-such-dist-nightshift"])


def test_wheelhouse_is_reused_without_pip(tmp_path, monkeypatch):
    reqs = ["alpha==1.0", "beta-pkg==2.0"]
    folder = tmp_path / _wheelhouse_key(reqs)
    folder.mkdir()
    (folder / "alpha-1.0-py3-none-any.whl").write_bytes(b"")
    (folder / "beta_pkg-2.0-py3-none-any.whl").write_bytes(b"")
    (folder / "requirements.txt").write_text("\n".join(reqs) + "\n")

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the wheelhouse is complete")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert ensure_wheelhouse(tmp_path, reqs) == folder


def test_wheelhouse_rejects_unpinned(tmp_path):
    with pytest.raises(ConfigError, match="'numpy' is not pinned"):
        ensure_wheelhouse(tmp_path, ["numpy"])


def test_wheelhouse_download_failure_names_package_and_fix(tmp_path, monkeypatch):
    # offline on purpose: no index, an empty find-links folder
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(BuildError) as info:
        ensure_wheelhouse(tmp_path / "wh", ["numpy==0.0.1"])
    msg = str(info.value)
    assert "could not download a wheel for numpy==0.0.1" in msg
    assert "NIGHTSHIFT_WHEELHOUSE" in msg and "pip download" in msg
    assert info.value.logs  # pip's output is kept
    assert not list((tmp_path / "wh").glob("*/requirements.txt"))  # nothing half-made left as final

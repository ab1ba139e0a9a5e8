"""Lineage of a training run (nightshift.lineage): the code's git commit, the package versions and the
runtime."""

from __future__ import annotations

import re

from nightshift import lineage


def test_git_sha_falls_back_to_the_environment_then_unknown(monkeypatch):
    sha = lineage.git_sha()
    assert sha == "unknown" or re.fullmatch(r"[0-9a-f]{40}", sha)
    monkeypatch.setattr(lineage, "_git", lambda args, cwd: None)  # no git, or not a checkout
    monkeypatch.setenv(lineage.GIT_SHA_ENV, "abc1234")
    assert lineage.git_sha() == "abc1234"
    monkeypatch.delenv(lineage.GIT_SHA_ENV)
    assert lineage.git_sha() == "unknown" and lineage.git_dirty() is None
    pkgs = lineage.package_versions()
    assert pkgs == sorted(pkgs, key=str.lower) and all("==" in p for p in pkgs)


def test_the_environment_manifest_records_git_versions_and_packages():
    import platform

    manifest = lineage.environment_manifest()
    assert set(manifest) == {"git_sha", "git_dirty", "versions", "packages"}
    versions = manifest["versions"]
    assert versions["python"] == platform.python_version()
    assert isinstance(versions["torch"], str) and type(versions["torch"]) is str  # plain str: weights_only-loadable
    assert versions["numpy"] == lineage._dist_version("numpy") is not None

"""BuildInferenceImageOperator's retention never removes the images that serve or may serve."""

from __future__ import annotations

import json

import pytest

from nightshift import contracts
from nightshift.operators import BuildInferenceImageOperator


@pytest.fixture
def env(nightshift_home):
    return nightshift_home


def _version(c, name: str, image: str, image_id: str) -> str:
    from nightshift import registry

    run = c.create_run(registry.experiment_id(c, name, None))
    mv = c.create_model_version(name, source=f"runs:/{run.info.run_id}/onnx", run_id=run.info.run_id)
    c.set_model_version_tag(name, mv.version, contracts.tag(contracts.VersionTag.IMAGE), image)
    c.set_model_version_tag(name, mv.version, contracts.tag(contracts.VersionTag.IMAGE_ID), image_id)
    return str(mv.version)


def test_protects_champion_challenger_and_deployed_images(env):
    op = BuildInferenceImageOperator(task_id="build", export={}, model_name="m", protect=["pinned:1"])
    c = op.mlflow
    c.create_registered_model("m")
    champ = _version(c, "m", "ns/m:1-aaa", "sha256:champ")
    chall = _version(c, "m", "ns/m:2-bbb", "sha256:chall")
    _version(c, "m", "ns/m:3-ccc", "sha256:other")
    c.set_registered_model_alias("m", contracts.CHAMPION, champ)
    c.set_registered_model_alias("m", contracts.CHALLENGER, chall)
    state = contracts.deployment_path(env / "artifacts", "m")
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"image": "ns/m:4-ddd", "image_id": "sha256:live",
                                 "previous": {"image": "ns/m:0-eee", "container": "x"}}))

    keep = op.protected_images({"image": "ns/m:5-new", "image_id": "sha256:new"})

    assert keep == {"ns/m:5-new", "sha256:new", "pinned:1", "ns/m:1-aaa", "sha256:champ", "ns/m:2-bbb",
                    "sha256:chall", "ns/m:4-ddd", "sha256:live", "ns/m:0-eee"}
    assert "ns/m:3-ccc" not in keep  # neither aliased nor deployed: retention may remove it


def test_unreadable_registry_removes_nothing(env, monkeypatch):
    from nightshift import registry
    from nightshift.errors import RegistryError

    def down(*_a, **_k):
        raise RegistryError("the model registry failed (UNAVAILABLE)")

    monkeypatch.setattr(registry, "get_alias", down)
    monkeypatch.setattr(registry, "get_champion", down)
    op = BuildInferenceImageOperator(task_id="build", export={}, model_name="m")
    assert op.protected_images({"image": "ns/m:5-new", "image_id": "sha256:new"}) is None


def test_corrupt_deployment_state_removes_nothing(env):
    op = BuildInferenceImageOperator(task_id="build", export={}, model_name="m")
    state = contracts.deployment_path(env / "artifacts", "m")
    state.parent.mkdir(parents=True)
    state.write_text("{not json")
    assert op.protected_images({"image": "ns/m:5-new", "image_id": "sha256:new"}) is None

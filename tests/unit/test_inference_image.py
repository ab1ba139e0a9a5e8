"""Pinned serving requirements, the wheelhouse, the content-keyed tag, and real inference-image builds."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess

import pytest

from nightshift.errors import BuildError, ConfigError
from nightshift.inference_image import (
    ImageBuilder,
    build_inference_image,
    build_key,
    connect_docker,
    image_tag,
    push_image,
    remove_image,
    serving_tree_sha256,
)
from nightshift.wheelhouse import _wheelhouse_key, ensure_wheelhouse, serving_requirements
from nightshift.settings import Settings


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


def test_unreachable_daemon_says_how_to_start_one(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/nightshift-docker.sock")
    with pytest.raises(BuildError, match="ensure_docker.sh"):
        connect_docker(timeout_s=5)


def test_missing_onnx_file(tmp_path):
    with pytest.raises(BuildError, match="does not exist; run the export step first"):
        build_inference_image(onnx_path=tmp_path / "model.onnx", model_meta={}, model_name="m", tag="x:y",
                              base_image="b", wheelhouse=tmp_path, docker_client=object())


def test_meta_sha_mismatch(tiny_onnx_model_dir, tmp_path):
    meta = json.loads((tiny_onnx_model_dir / "model.json").read_text())
    with pytest.raises(BuildError, match="does not match"):
        build_inference_image(onnx_path=tiny_onnx_model_dir / "model.onnx",
                              model_meta={**meta, "onnx_sha256": "0" * 64}, model_name="tiny", tag="x:y",
                              base_image="b", wheelhouse=tmp_path, docker_client=object())


@pytest.mark.docker
def test_missing_base_image_says_how_to_make_it(serving_docker, tiny_onnx_model_dir, tmp_path):
    meta = json.loads((tiny_onnx_model_dir / "model.json").read_text())
    with pytest.raises(BuildError, match="ensure_base_image.sh"):
        build_inference_image(onnx_path=tiny_onnx_model_dir / "model.onnx", model_meta=meta, model_name="tiny",
                              tag="nightshift-test/never:1", base_image="nightshift-test/no-such-base:0",
                              wheelhouse=tmp_path, docker_client=serving_docker)


@pytest.mark.docker
def test_build_failure_carries_the_log(serving_docker, tiny_onnx_model_dir, tmp_path):
    settings = Settings.from_env()
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN echo nightshift-boom && exit 3\n")
    meta = json.loads((tiny_onnx_model_dir / "model.json").read_text())
    tag = "nightshift-test/broken:1"
    with pytest.raises(BuildError) as info:
        ImageBuilder(serving_docker).build(
            onnx_path=tiny_onnx_model_dir / "model.onnx", model_meta=meta, model_name="tiny", tag=tag,
            base_image=settings.base_image, wheelhouse=settings.wheelhouse, dockerfile=dockerfile)
    assert "docker build of nightshift-test/broken:1 failed" in str(info.value)
    assert "returned a non-zero code: 3" in str(info.value)
    assert "nightshift-boom" in info.value.logs
    assert remove_image(tag, serving_docker) is False  # nothing was tagged


@pytest.mark.docker
def test_cancel_stops_a_running_build(serving_docker, tiny_onnx_model_dir, tmp_path):
    import threading
    import time
    import uuid

    settings = Settings.from_env()
    dockerfile = tmp_path / "Dockerfile"
    # a unique echo defeats the build cache, so the slow step really runs
    dockerfile.write_text(f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nRUN echo {uuid.uuid4().hex} && sleep 120\n")
    meta = json.loads((tiny_onnx_model_dir / "model.json").read_text())
    builder = ImageBuilder(serving_docker)

    def cancel_when_step_runs() -> None:
        deadline = time.monotonic() + 60
        while builder._step_container is None and time.monotonic() < deadline:
            time.sleep(0.05)
        builder.cancel()

    threading.Thread(target=cancel_when_step_runs, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(BuildError, match="was cancelled"):
        builder.build(onnx_path=tiny_onnx_model_dir / "model.onnx", model_meta=meta, model_name="tiny",
                      tag="nightshift-test/cancelled:1", base_image=settings.base_image,
                      wheelhouse=settings.wheelhouse, dockerfile=dockerfile)
    assert time.monotonic() - t0 < 60
    assert remove_image("nightshift-test/cancelled:1", serving_docker) is False


@pytest.mark.docker
def test_real_build(serving_image, serving_docker, tiny_onnx_model_dir):
    from nightshift.artifacts import sha256_file

    img = serving_docker.images.get(serving_image["image"])
    assert img.id == serving_image["image_id"]
    assert serving_image["size_bytes"] == img.attrs["Size"] > 0
    assert serving_image["serving_requirements"] == serving_requirements()
    assert serving_image["base_image"] == Settings.from_env().base_image
    labels = img.labels
    sha = sha256_file(tiny_onnx_model_dir / "model.onnx")
    assert labels["ai.nightshift.model.name"] == "tiny"
    assert labels["ai.nightshift.model.version"] == "1"
    assert labels["ai.nightshift.model.sha256"] == sha == serving_image["model_sha256"]
    assert labels["org.opencontainers.image.title"] == "nightshift-inference-tiny"
    assert labels["org.opencontainers.image.version"] == "1"
    assert labels["org.opencontainers.image.revision"] == "test-rev"
    assert labels["org.opencontainers.image.created"].endswith("Z")
    assert labels["ai.nightshift.test"] == "1"  # caller's extra labels

    config = img.attrs["Config"]
    assert config["User"] == "10001:10001"  # not root
    assert "NIGHTSHIFT_MODEL_DIR=/models/tiny" in config["Env"]
    assert config["Cmd"] == ["/opt/venv/bin/python", "-m", "serving.server"]
    assert config["Healthcheck"]["Test"][0] == "CMD"

    # what is inside: the pinned runtime, the model, no pip, no wheels
    script = (
        "import json, os, importlib.metadata as m; "
        "print(json.dumps({'uid': os.getuid(), 'ort': m.version('onnxruntime'), 'np': m.version('numpy'), "
        "'model': sorted(os.listdir('/models/tiny')), 'wheels': os.path.exists('/tmp/wheels'), "
        "'pip': os.path.exists('/opt/venv/bin/pip')}))"
    )
    out = serving_docker.containers.run(img.id, ["python", "-c", script], network_mode="host", remove=True,
                                        labels={"ai.nightshift.role": "test"})
    info = json.loads(out)
    assert info == {"uid": 10001, "ort": md.version("onnxruntime"), "np": md.version("numpy"),
                    "model": ["model.json", "model.onnx"], "wheels": False, "pip": False}


@pytest.mark.docker
def test_remove_image(serving_image, serving_docker):
    import docker

    tag = "nightshift-test/alias:remove-me"
    serving_docker.images.get(serving_image["image"]).tag("nightshift-test/alias", "remove-me")
    assert remove_image(tag, serving_docker) is True
    with pytest.raises(docker.errors.ImageNotFound):
        serving_docker.images.get(tag)
    assert remove_image(tag, serving_docker) is False
    serving_docker.images.get(serving_image["image"])  # the original tag is untouched

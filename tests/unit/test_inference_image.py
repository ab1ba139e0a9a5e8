"""The inference image (nightshift.inference_image): the content-keyed tag, and real builds, pushes
and retention. Its wheelhouse and pinned serving requirements: test_wheelhouse.py."""

from __future__ import annotations

import importlib.metadata as md
import json

import numpy as np
import pytest

from nightshift.errors import BuildError
from nightshift.inference_image import (
    ImageBuilder,
    build_key,
    image_tag,
    push_image,
    remove_image,
    serving_tree_sha256,
)
from nightshift.settings import Settings
from nightshift.wheelhouse import serving_requirements


def test_missing_onnx_file(tmp_path):
    with pytest.raises(BuildError, match="does not exist; run the export step first"):
        ImageBuilder(object()).build(onnx_path=tmp_path / "model.onnx", model_meta={}, model_name="m", tag="x:y",
                                     base_image="b", wheelhouse=tmp_path)


def test_meta_sha_mismatch(tiny_onnx_model_dir, tmp_path):
    meta = json.loads((tiny_onnx_model_dir / "model.json").read_text())
    with pytest.raises(BuildError, match="does not match"):
        ImageBuilder(object()).build(onnx_path=tiny_onnx_model_dir / "model.onnx",
                                     model_meta={**meta, "onnx_sha256": "0" * 64}, model_name="tiny", tag="x:y",
                                     base_image="b", wheelhouse=tmp_path)


@pytest.mark.docker
def test_missing_base_image_says_how_to_make_it(serving_docker, tiny_onnx_model_dir, tmp_path):
    meta = json.loads((tiny_onnx_model_dir / "model.json").read_text())
    with pytest.raises(BuildError, match="ensure_base_image.sh"):
        ImageBuilder(serving_docker).build(onnx_path=tiny_onnx_model_dir / "model.onnx", model_meta=meta,
                                           model_name="tiny", tag="nightshift-test/never:1",
                                           base_image="nightshift-test/no-such-base:0", wheelhouse=tmp_path)


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

    step_started: list[float] = []

    def cancel_when_step_runs() -> None:
        deadline = time.monotonic() + 600  # only bounds a hang: the step is cancelled once it runs
        while builder._step_container is None and time.monotonic() < deadline:
            time.sleep(0.05)
        step_started.append(time.monotonic())
        builder.cancel()

    threading.Thread(target=cancel_when_step_runs, daemon=True).start()
    with pytest.raises(BuildError, match="was cancelled"):
        builder.build(onnx_path=tiny_onnx_model_dir / "model.onnx", model_meta=meta, model_name="tiny",
                      tag="nightshift-test/cancelled:1", base_image=settings.base_image,
                      wheelhouse=settings.wheelhouse, dockerfile=dockerfile)
    # stopped, not run to its end: the step sleeps 120 s from when it started, however slow the
    # machine is on the way there
    assert step_started and time.monotonic() - step_started[0] < 120
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
    assert labels["ai.nightshift.model"] == "tiny"  # the same key containers carry (containers.MODEL_LABEL)
    assert labels["ai.nightshift.model.version"] == "1"
    assert labels["ai.nightshift.model.sha256"] == sha == serving_image["model_sha256"]
    assert labels["org.opencontainers.image.title"] == "nightshift-inference-tiny"
    assert labels["org.opencontainers.image.version"] == "1"
    assert labels["org.opencontainers.image.revision"] == "test-rev"
    assert labels["org.opencontainers.image.created"].endswith("Z")
    assert labels["ai.nightshift.test"] == "1"  # caller's extra labels
    assert labels["ai.nightshift.build.key"] == serving_image["build_key"]
    assert labels["ai.nightshift.onnxruntime.version"] == md.version("onnxruntime")
    assert labels["ai.nightshift.variant"] == "model-in-image"
    assert labels["ai.nightshift.role"] == "inference-image"

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
        "'pip': os.path.exists('/opt/venv/bin/pip'), 'uvicorn': m.version('uvicorn'), "
        "'decode': os.path.exists('/opt/nightshift/serving/decode.py')}))"
    )
    out = serving_docker.containers.run(img.id, ["python", "-c", script], network_mode="host", remove=True,
                                        labels={"ai.nightshift.role": "test"})
    info = json.loads(out)
    assert info == {"uid": 10001, "ort": md.version("onnxruntime"), "np": md.version("numpy"),
                    "model": ["model.json", "model.onnx"], "wheels": False, "pip": False,
                    "uvicorn": md.version("uvicorn"), "decode": True}


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


# ----------------------------------------------------------------------------- the content key


def _key(**over):
    base = dict(onnx_sha256="a" * 64, model_json="{}", serving_sha256="s", dockerfile_sha256="d",
                requirements=["numpy==1", "onnxruntime==2"], base_image_id="sha256:b", variant="model-in-image")
    return build_key(**{**base, **over})


@pytest.mark.parametrize("field", ["onnx_sha256", "model_json", "serving_sha256", "dockerfile_sha256",
                                   "base_image_id", "variant"])
def test_every_build_input_changes_the_key(field):
    assert _key() == _key()
    assert _key(**{field: "other"}) != _key()
    assert _key(requirements=["numpy==1", "onnxruntime==3"]) != _key()
    assert _key(requirements=["onnxruntime==2", "numpy==1"]) == _key()  # order does not matter


def test_serving_tree_hash_sees_a_changed_server(tmp_path):
    import shutil

    from nightshift.inference_image import DECODE_SRC, SERVING_SRC

    copy = tmp_path / "serving"
    shutil.copytree(SERVING_SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert serving_tree_sha256(copy) == serving_tree_sha256(SERVING_SRC)
    (copy / "app.py").write_text((copy / "app.py").read_text() + "\n# changed\n")
    assert serving_tree_sha256(copy) != serving_tree_sha256(SERVING_SRC)
    other_decode = tmp_path / "decode.py"
    other_decode.write_text(DECODE_SRC.read_text() + "\n")
    assert serving_tree_sha256(SERVING_SRC, other_decode) != serving_tree_sha256(SERVING_SRC)


def test_image_tag_format():
    assert image_tag("reg/ns", "Digits", "3", "f" * 64) == "reg/ns/digits:3-ffffffffffffffff"
    assert image_tag("ns", "m", "a b/c", "0" * 64) == "ns/m:a_b_c-0000000000000000"
    assert image_tag("ns", None, None, "1" * 64) == "ns/server:1111111111111111"


@pytest.mark.docker
def test_same_inputs_reuse_the_image_without_a_build(serving_image, serving_docker, tiny_onnx_model_dir):
    settings = Settings.from_env()
    meta = json.loads((tiny_onnx_model_dir / "model.json").read_text())
    kw = dict(onnx_path=tiny_onnx_model_dir / "model.onnx", model_meta=meta, model_name="tiny",
              repository="nightshift-test", base_image=settings.base_image, wheelhouse=settings.wheelhouse)
    first = ImageBuilder(serving_docker).build(**kw)
    try:
        assert first["build_key"] == serving_image["build_key"]  # same inputs as the fixture's build
        assert first["image"] == f"nightshift-test/tiny:1-{first['build_key'][:16]}"
        second = ImageBuilder(serving_docker).build(**kw)
        assert second["reused"] is True and second["image_id"] == first["image_id"]
        assert second["image"] == first["image"] and second["build_seconds"] < 5
    finally:
        remove_image(first["image"], serving_docker)


@pytest.mark.docker
def test_model_load_variant_reads_model_uri(serving_docker, tiny_onnx_model_dir, tmp_path):
    import os
    import shutil

    import tritonclient.http as th

    from nightshift.containers import InferenceContainer

    settings = Settings.from_env()
    built = ImageBuilder(serving_docker).build(onnx_path=None, model_meta=None, model_name=None, variant="model-load",
                                               repository="nightshift-test", base_image=settings.base_image,
                                               wheelhouse=settings.wheelhouse)
    try:
        assert built["image"].startswith("nightshift-test/server:")
        assert built["labels"]["ai.nightshift.variant"] == "model-load"
        mount = tmp_path / "m"
        shutil.copytree(tiny_onnx_model_dir, mount)
        for p in [mount, *mount.iterdir()]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        with InferenceContainer(built["image"], docker_client=serving_docker,
                                environment={"MODEL_URI": "file:///mnt/model"},
                                volumes={str(mount): {"bind": "/mnt/model", "mode": "ro"}}) as c:
            c.wait_ready(timeout_s=60)
            client = th.InferenceServerClient(c.url.removeprefix("http://"))
            assert client.is_model_ready("tiny")
            inp = th.InferInput("pixels", [1, 4, 4, 1], "UINT8")
            inp.set_data_from_numpy(np.zeros((1, 4, 4, 1), np.uint8), binary_data=True)
            assert client.infer("tiny", [inp]).as_numpy("logits").shape == (1, 3)
    finally:
        remove_image(built["image"], serving_docker)


@pytest.fixture(scope="session")
def local_registry():
    """``127.0.0.1:<port>`` of the registry started by scripts/ensure_registry.sh (``make setup``)."""
    import os
    import urllib.request

    addr = f"127.0.0.1:{os.environ.get('NIGHTSHIFT_REGISTRY_PORT', '5005')}"
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        assert opener.open(f"http://{addr}/v2/", timeout=3).status == 200
    except Exception as exc:  # noqa: BLE001
        missing = pytest.fail if os.environ.get("NIGHTSHIFT_REQUIRE_DOCKER") == "1" else pytest.skip
        missing(f"no registry on {addr} ({exc}); run scripts/ensure_registry.sh")
    return addr


@pytest.mark.docker
def test_push_to_a_real_registry(serving_image, serving_docker, local_registry):
    import urllib.request

    pushed = push_image(serving_image["image"], local_registry, serving_docker)
    assert pushed["pushed"].startswith(f"{local_registry}/nightshift-test/tiny:")
    assert pushed["digest"].startswith("sha256:")
    repo, _, tag = pushed["pushed"].removeprefix(local_registry + "/").rpartition(":")
    req = urllib.request.Request(f"http://{local_registry}/v2/{repo}/manifests/{tag}", method="HEAD", headers={
        "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        assert resp.headers["Docker-Content-Digest"] == pushed["digest"]
    remove_image(pushed["pushed"], serving_docker)
    with pytest.raises(BuildError, match="pushing"):
        push_image(serving_image["image"], "127.0.0.1:1", serving_docker)  # nothing listens there


@pytest.mark.docker
def test_retention_keeps_newest_and_protected(serving_image, serving_docker):
    import io
    import time

    from nightshift.inference_image import prune_candidates

    made = []
    for name in ("ret-old", "ret-new"):  # two later candidates of the same model (labels inherited)
        dockerfile = f"FROM {serving_image['image']}\nLABEL ai.nightshift.test.candidate={name}\n".encode()
        serving_docker.images.build(fileobj=io.BytesIO(dockerfile), tag=f"nightshift-test/tiny:{name}",
                                    network_mode="host", rm=True, pull=False)
        made.append(f"nightshift-test/tiny:{name}")
        time.sleep(1.1)  # distinct creation times
    try:
        removed = prune_candidates(serving_docker, repository="nightshift-test", model_name="tiny", keep=1,
                                   protect={serving_image["image"]})
        assert removed == ["nightshift-test/tiny:ret-old"]
        serving_docker.images.get("nightshift-test/tiny:ret-new")  # newest kept
        serving_docker.images.get(serving_image["image"])  # protected (the champion's) kept
        with pytest.raises(BuildError, match=">= 0"):
            prune_candidates(serving_docker, repository="nightshift-test", model_name="tiny", keep=-1)
    finally:
        for t in made:
            remove_image(t, serving_docker)

"""The OIP gRPC service (:mod:`nightshift.serving.grpc_service`): ``tritonclient.grpc`` unchanged
(health, metadata, a JSON-free batch of 8 through ``raw_input_contents``), typed contents, the
same answers as HTTP for the same images, bad input as clear status codes (never a crash), the
shared batcher, metrics and request log, wire compatibility of the vendored stubs with
tritonclient's, and the server process's ``NIGHTSHIFT_GRPC_PORT``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from nightshift.containers import free_port
from nightshift.serving import grpc_predict_v2_pb2 as pb
from nightshift.serving import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.unit.serving_support import metric, wait_for

tg = pytest.importorskip("tritonclient.grpc")

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SERVING = ROOT / "plugins" / "nightshift" / "serving"


def _serve(model_dir, *, load: bool = True, request_log=None, max_body_bytes: int = 1 << 20):
    """The tiny model (max batch 8) over REST and gRPC on free loopback ports, in a thread."""
    from nightshift.serving.app import AppConfig
    from nightshift.serving.server import Model, make_server

    model = Model(model_dir, max_batch=8, intra_op_threads=1)
    if load:
        model.load()
    return make_server(model, "127.0.0.1", 0, config=AppConfig(max_body_bytes=max_body_bytes),
                       request_log=request_log, grpc_port=0).start()


@pytest.fixture(scope="module")
def both(tiny_onnx_model_dir):
    """One server answering REST and gRPC (module-wide)."""
    srv = _serve(tiny_onnx_model_dir)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def client(both):
    c = tg.InferenceServerClient(both.grpc_target)
    yield c
    c.close()


@pytest.fixture
def stub(both):
    """The raw generated stub, to send what tritonclient refuses to build."""
    with grpc.insecure_channel(both.grpc_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _images(n: int = 8, seed: int = 21) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)


def _raw_request(x: np.ndarray, **kw) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=kw.pop("model_name", "tiny"), raw_input_contents=[x.tobytes()], **kw)
    req.inputs.add(name="pixels", datatype="UINT8", shape=list(x.shape))
    return req


def _status(call) -> tuple[grpc.StatusCode, str]:
    """The status code and message of an RPC that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


# ----------------------------------------------------------------------------- tritonclient.grpc, unchanged


def test_health_and_metadata_through_tritonclient(client, both, http):
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    assert client.is_model_ready("tiny") is True
    assert client.is_model_ready("tiny", "1") is True

    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "nightshift-serving"
    assert server["version"] == http.get(f"{both.url}/v2").json()["version"]
    assert "model_version_path" in server["extensions"]

    md = client.get_model_metadata("tiny", as_json=True)
    rest = http.get(f"{both.url}/v2/models/tiny").json()
    assert md["name"] == rest["name"] == "tiny"
    assert md["versions"] == rest["versions"] == ["1"]
    assert md["platform"] == rest["platform"]
    # the JSON form of int64 fields is a string: compare as numbers
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in md["inputs"]] == \
        [(t["name"], t["datatype"], t["shape"]) for t in rest["inputs"]] == [("pixels", "UINT8", [-1, 4, 4, 1])]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in md["outputs"]] == \
        [(t["name"], t["datatype"], t["shape"]) for t in rest["outputs"]]


def test_a_batch_of_8_through_raw_contents(client, tiny_onnx_forward):
    """JSON-free: tritonclient sends raw_input_contents and reads raw_output_contents."""
    x = _images(8)
    inp = tg.InferInput("pixels", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    result = client.infer("tiny", [inp], request_id="batch-8")
    logits, emb = tiny_onnx_forward(x)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("embedding"), emb, rtol=1e-5, atol=1e-5)
    names = ["zero", "one", "two"]
    assert [v.decode() for v in result.as_numpy("label")] == [names[i] for i in logits.argmax(1)]
    response = result.get_response()
    assert response.id == "batch-8" and response.model_name == "tiny" and response.model_version == "1"
    assert len(response.raw_output_contents) == len(response.outputs) == 3


def test_requested_outputs_only(client):
    x = _images(2)
    inp = tg.InferInput("pixels", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    result = client.infer("tiny", [inp], outputs=[tg.InferRequestedOutput("label")], model_version="1")
    assert [o.name for o in result.get_response().outputs] == ["label"]
    assert result.as_numpy("logits") is None and result.as_numpy("label").shape == (2,)


def test_answers_are_identical_to_http(client, both, http):
    """The same images over REST (binary tensors, as tritonclient.http sends them) and gRPC:
    bit-identical logits and embeddings, the same labels."""
    x = _images(8, seed=5)
    inp = tg.InferInput("pixels", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    over_grpc = client.infer("tiny", [inp])

    header = json.dumps({"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "UINT8",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    r = http.post(f"{both.url}/v2/models/tiny/infer", data=header + x.tobytes(), timeout=10,
                  headers={"Content-Type": "application/octet-stream",
                           "Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    hl = int(r.headers["Inference-Header-Content-Length"])
    head, blob, offset = json.loads(r.content[:hl]), r.content[hl:], 0
    for out in head["outputs"]:
        size = out["parameters"]["binary_data_size"]
        raw = blob[offset:offset + size]
        offset += size
        got = over_grpc.get_response().raw_output_contents[[o.name for o in over_grpc.get_response().outputs]
                                                           .index(out["name"])]
        assert raw == got, f"output {out['name']} differs between HTTP and gRPC"
        assert list(over_grpc.get_output(out["name"]).shape) == out["shape"]


def test_typed_contents_in_and_out(stub, tiny_onnx_forward):
    """Without raw contents the request's uint_contents are read and the answer is typed too."""
    x = _images(3, seed=9)
    req = pb.ModelInferRequest(model_name="tiny", id="typed")
    tensor = req.inputs.add(name="pixels", datatype="UINT8", shape=list(x.shape))
    tensor.contents.uint_contents.extend(x.ravel().tolist())
    resp = stub.ModelInfer(req, timeout=10)
    assert not resp.raw_output_contents
    by_name = {o.name: o for o in resp.outputs}
    logits, _ = tiny_onnx_forward(x)
    assert list(by_name["logits"].shape) == [3, 3]
    np.testing.assert_allclose(np.asarray(by_name["logits"].contents.fp32_contents).reshape(3, 3), logits,
                               rtol=1e-5, atol=1e-5)
    assert [b.decode() for b in by_name["label"].contents.bytes_contents] == \
        [["zero", "one", "two"][i] for i in logits.argmax(1)]
    assert resp.id == "typed"


# ----------------------------------------------------------------------------- bad input: status codes


def _request_with(mutate) -> pb.ModelInferRequest:
    req = _raw_request(_images(2))
    mutate(req)
    return req


def _typed(values, field="uint_contents", shape=(1, 4, 4, 1)):
    def mutate(req):
        del req.raw_input_contents[:]
        req.inputs[0].shape[:] = list(shape)
        getattr(req.inputs[0].contents, field).extend(values)
    return mutate


BAD_INFER = {
    "unknown model": (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
    "unknown version": (lambda r: setattr(r, "model_version", "7"), grpc.StatusCode.NOT_FOUND, "no version '7'"),
    "no inputs": (lambda r: (r.ClearField("inputs"), r.ClearField("raw_input_contents")),
                  grpc.StatusCode.INVALID_ARGUMENT, "has no inputs"),
    "two inputs": (lambda r: r.inputs.add(name="more", datatype="UINT8", shape=[2, 4, 4, 1]),
                   grpc.StatusCode.INVALID_ARGUMENT, "exactly one tensor"),
    "wrong name": (lambda r: setattr(r.inputs[0], "name", "image"), grpc.StatusCode.INVALID_ARGUMENT,
                   "inputs[0].name is 'image'"),
    "wrong datatype": (lambda r: setattr(r.inputs[0], "datatype", "FP32"), grpc.StatusCode.INVALID_ARGUMENT,
                       "inputs[0].datatype is 'FP32'"),
    "wrong shape": (lambda r: r.inputs[0].shape.__setitem__(slice(None), [2, 4, 4, 3]),
                    grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape is [2, 4, 4, 3]"),
    "zero batch": (lambda r: r.inputs[0].shape.__setitem__(0, 0), grpc.StatusCode.INVALID_ARGUMENT,
                   "at least 1"),
    "batch over max": (lambda r: (r.inputs[0].shape.__setitem__(0, 9), r.raw_input_contents.__setitem__(0, bytes(144))),
                       grpc.StatusCode.INVALID_ARGUMENT, "maximum of 8"),
    "raw size": (lambda r: r.raw_input_contents.__setitem__(0, bytes(31)), grpc.StatusCode.INVALID_ARGUMENT,
                 "raw_input_contents[0] has 31 bytes but inputs[0].shape [2, 4, 4, 1] needs 32"),
    "two raw entries": (lambda r: r.raw_input_contents.append(bytes(32)), grpc.StatusCode.INVALID_ARGUMENT,
                        "raw_input_contents has 2 entries"),
    "raw and typed": (lambda r: r.inputs[0].contents.uint_contents.extend([1] * 32), grpc.StatusCode.INVALID_ARGUMENT,
                      "send one of them"),
    "no data": (lambda r: r.ClearField("raw_input_contents"), grpc.StatusCode.INVALID_ARGUMENT, "carries no data"),
    "typed count": (_typed([1] * 15), grpc.StatusCode.INVALID_ARGUMENT, "uint_contents has 15 values"),
    "typed over 255": (_typed([0] * 15 + [256]), grpc.StatusCode.INVALID_ARGUMENT,
                       "uint_contents[15] = 256 is outside 0..255"),
    "typed wrong field": (_typed([0.5] * 16, field="fp32_contents"), grpc.StatusCode.INVALID_ARGUMENT,
                          "inputs[0].contents.fp32_contents is set"),
    "unknown output": (lambda r: r.outputs.add(name="scores"), grpc.StatusCode.INVALID_ARGUMENT,
                       "outputs[0].name 'scores' is not an output"),
}


@pytest.mark.parametrize("case", list(BAD_INFER))
def test_bad_infer_requests_get_clear_status_codes(case, stub):
    mutate, code, fragment = BAD_INFER[case]
    got_code, message = _status(lambda: stub.ModelInfer(_request_with(mutate), timeout=10))
    assert got_code == code, f"{case}: {got_code} {message}"
    assert fragment in message, f"{case}: {message!r} does not name the problem ({fragment!r})"


def test_bad_input_never_stops_the_server_and_is_counted(stub, both, http, client):
    before = metric(http, both.url, 'nightshift_requests_total{code="400",method="GRPC",route="infer"}')
    for case in ("wrong shape", "raw size", "typed over 255"):
        mutate, code, _ = BAD_INFER[case]
        assert _status(lambda m=mutate: stub.ModelInfer(_request_with(m), timeout=10))[0] == code
    after = metric(http, both.url, 'nightshift_requests_total{code="400",method="GRPC",route="infer"}')
    assert after - before == 3
    assert stub.ModelInfer(_raw_request(_images(2)), timeout=10).outputs[0].name == "logits"


def test_metadata_and_readiness_of_an_unknown_model_are_not_found(stub):
    for call in (lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=10),
                 lambda: stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=10),
                 lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny", version="2"), timeout=10)):
        code, message = _status(call)
        assert code == grpc.StatusCode.NOT_FOUND and ("'nope'" in message or "'2'" in message), message


def test_a_message_over_the_body_limit_is_refused_before_parsing(stub):
    """max_body_bytes (1 MiB here) caps a gRPC message the way it caps an HTTP body."""
    req = _raw_request(_images(2))
    req.raw_input_contents[0] = bytes((1 << 20) + 1)
    code, message = _status(lambda: stub.ModelInfer(req, timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message


def test_methods_this_server_lacks_are_unimplemented(client):
    """Triton's extra methods (model config, statistics ...): UNIMPLEMENTED, not a hang or a crash."""
    with pytest.raises(tg.InferenceServerException) as err:
        client.get_model_config("tiny")
    assert "UNIMPLEMENTED" in str(err.value.status())


def test_not_ready_model(tiny_onnx_model_dir):
    """Before the model loads: live, not ready, and infer/metadata answer UNAVAILABLE naming why."""
    srv = _serve(tiny_onnx_model_dir, load=False)
    try:
        with grpc.insecure_channel(srv.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live is True
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready is False
            assert stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=10).ready is False
            code, message = _status(lambda: stub.ModelInfer(_raw_request(_images(1)), timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE and "not ready" in message, message
            code, message = _status(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE, message
    finally:
        srv.shutdown()
        srv.server_close()


def test_draining_turns_grpc_readiness_false(both, stub):
    both.app.draining = True
    try:
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready is False
        assert stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=10).ready is False
    finally:
        both.app.draining = False
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready is True


# ----------------------------------------------------------------------------- shared with HTTP


def test_concurrent_grpc_and_http_clients_get_their_own_answers(both, http, tiny_onnx_forward):
    """16 gRPC clients and 4 HTTP clients at once, each with its own images: every answer is
    right (batches split back correctly across protocols) and every image ran exactly once."""
    images_before = metric(http, both.url, "nightshift_batch_size_sum")
    ok_before = metric(http, both.url, 'nightshift_requests_total{code="200",method="GRPC",route="infer"}')
    problems: list[str] = []
    n_grpc, n_http, rounds = 16, 4, 10

    def grpc_worker(i: int) -> None:
        x = _images(2, seed=100 + i)
        want = tiny_onnx_forward(x)[0].argmax(1).tolist()
        try:
            c = tg.InferenceServerClient(both.grpc_target)
            inp = tg.InferInput("pixels", list(x.shape), "UINT8")
            inp.set_data_from_numpy(x)
            for _ in range(rounds):
                got = c.infer("tiny", [inp]).as_numpy("logits").argmax(1).tolist()
                if got != want:
                    problems.append(f"grpc {i}: {got} != {want}")
            c.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            problems.append(f"grpc {i}: {type(exc).__name__}: {exc}")

    def http_worker(i: int) -> None:
        import requests

        x = _images(1, seed=200 + i)
        want = tiny_onnx_forward(x)[0].argmax(1).tolist()
        body = {"inputs": [{"name": "pixels", "shape": [1, 4, 4, 1], "datatype": "UINT8", "data": x.ravel().tolist()}]}
        try:
            with requests.Session() as s:
                s.trust_env = False
                for _ in range(rounds):
                    r = s.post(f"{both.url}/v2/models/tiny/infer", json=body, timeout=10)
                    got = np.asarray(r.json()["outputs"][0]["data"]).reshape(1, 3).argmax(1).tolist()
                    if r.status_code != 200 or got != want:
                        problems.append(f"http {i}: {r.status_code} {got} != {want}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"http {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=grpc_worker, args=(i,)) for i in range(n_grpc)]
    threads += [threading.Thread(target=http_worker, args=(i,)) for i in range(n_http)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert problems == []
    images = metric(http, both.url, "nightshift_batch_size_sum") - images_before
    assert images == (2 * n_grpc + n_http) * rounds  # every image ran exactly once
    ok = metric(http, both.url, 'nightshift_requests_total{code="200",method="GRPC",route="infer"}') - ok_before
    assert ok == n_grpc * rounds


def test_grpc_and_http_requests_share_one_batch(tiny_onnx_model_dir, tiny_onnx_forward):
    """One batcher for both protocols: while a batch runs, a gRPC and an HTTP request queue up,
    and the next ONNX Runtime call takes them together (and each gets its own rows back)."""
    import requests

    srv = _serve(tiny_onnx_model_dir)
    batcher = srv.app.batcher
    batcher.concurrent_requests = None  # never run inline: every request goes through the queue
    gate = threading.Event()
    sizes: list[int] = []
    predict = batcher.predict

    def gated(pixels):
        sizes.append(len(pixels))
        if len(sizes) == 1:
            assert gate.wait(30), "the test never opened the gate"
        return predict(pixels)

    batcher.predict = gated
    answers: dict[str, object] = {}
    xg, xh, xfirst = _images(2, seed=1), _images(3, seed=2), _images(1, seed=3)

    def over_grpc(key, x):
        with grpc.insecure_channel(srv.grpc_target) as channel:
            resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_raw_request(x), timeout=30)
        answers[key] = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(len(x), 3)

    def over_http():
        body = {"inputs": [{"name": "pixels", "shape": list(xh.shape), "datatype": "UINT8",
                            "data": xh.ravel().tolist()}], "outputs": [{"name": "logits"}]}
        r = requests.post(f"{srv.url}/v2/models/tiny/infer", json=body, timeout=30)
        answers["http"] = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(3, 3)

    try:
        first = threading.Thread(target=over_grpc, args=("first", xfirst))
        first.start()
        wait_for(lambda: sizes, what="the first batch to start")
        others = [threading.Thread(target=over_grpc, args=("grpc", xg)), threading.Thread(target=over_http)]
        for t in others:
            t.start()
        wait_for(lambda: batcher.depth == 5, what="both requests to queue (5 images)")
        gate.set()
        for t in [first, *others]:
            t.join(30)
    finally:
        gate.set()
        srv.shutdown()
        srv.server_close()
    assert sizes == [1, 5]
    for key, x in (("first", xfirst), ("grpc", xg), ("http", xh)):
        np.testing.assert_allclose(answers[key], tiny_onnx_forward(x)[0], rtol=1e-5, atol=1e-5)


def test_grpc_requests_are_logged_like_http_ones(tiny_onnx_model_dir, tmp_path):
    """The same images over HTTP and gRPC give the same request-log records (the fields
    drift_monitor reads), apart from the time."""
    import requests

    from nightshift.serving.requestlog import RequestLog, read_records

    rl = RequestLog(tmp_path / "log", sample_rate=1.0, rotate_s=60)
    srv = _serve(tiny_onnx_model_dir, request_log=rl)
    x = _images(3, seed=42)
    try:
        body = {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "UINT8",
                            "data": x.ravel().tolist()}]}
        assert requests.post(f"{srv.url}/v2/models/tiny/infer", json=body, timeout=10).status_code == 200
        c = tg.InferenceServerClient(srv.grpc_target)
        inp = tg.InferInput("pixels", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x)
        c.infer("tiny", [inp])
        c.close()
    finally:
        srv.shutdown()  # drains, then closes the log: the open file is published
        srv.server_close()
    recs = read_records(sorted((tmp_path / "log").glob("requests-*.nsrl")))
    assert len(recs) == 6
    strip = [{k: v for k, v in r.items() if k not in ("timestamp", "time_us")} for r in recs]
    over_http, over_grpc = strip[:3], strip[3:]
    assert over_grpc == over_http
    assert {r["endpoint"] for r in recs} == {"infer"}


# ----------------------------------------------------------------------------- the stubs


def _fields(desc) -> dict[str, tuple]:
    return {f.name: (f.number, f.type, getattr(f, "label", None), f.message_type.full_name if f.message_type else None)
            for f in desc.fields}


def _walk(desc):
    yield desc
    for nested in desc.nested_types:
        yield from _walk(nested)


def test_stubs_are_wire_compatible_with_tritonclient():
    """Every message and field the vendored proto declares is in Triton's own proto
    (tritonclient's descriptors) with the same number and type, and every method has the
    same path and message types: what the server sends, tritonclient reads, and back."""
    from tritonclient.grpc import service_pb2 as triton

    ours = pb.DESCRIPTOR
    theirs = triton.DESCRIPTOR
    assert ours.package == theirs.package == "inference"
    checked = 0
    for top in ours.message_types_by_name.values():
        for desc in _walk(top):
            other = theirs.pool.FindMessageTypeByName(desc.full_name)
            theirs_fields = _fields(other)
            for name, spec in _fields(desc).items():
                assert theirs_fields.get(name) == spec, f"{desc.full_name}.{name}: ours {spec}, Triton's " \
                                                        f"{theirs_fields.get(name)}"
                checked += 1
    assert checked > 50
    service = ours.services_by_name["GRPCInferenceService"]
    other = theirs.services_by_name["GRPCInferenceService"]
    assert {m.name for m in service.methods} == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                 "ModelMetadata", "ModelInfer"}
    for m in service.methods:
        o = other.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (o.input_type.full_name, o.output_type.full_name)


def test_stubs_live_in_their_own_descriptor_pool():
    """tritonclient's copy of the same messages is loaded in this process too (the import at
    the top of this file): ours must not be in the default pool, or one of the imports fails."""
    from google.protobuf import descriptor_pool
    from tritonclient.grpc import service_pb2 as triton

    assert pb.DESCRIPTOR.pool is not descriptor_pool.Default()
    assert triton.DESCRIPTOR.pool is descriptor_pool.Default()


def test_committed_stubs_match_the_proto():
    """The committed *_pb2*.py are what scripts/gen_grpc_stubs.py makes from the .proto today."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools (requirements-dev.txt) regenerates the stubs")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_grpc_stubs.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_image_pins_the_grpc_runtime_the_stubs_were_checked_against():
    """The stubs check grpcio and protobuf at import (they imported above, against this
    environment); the image installs exactly this environment's versions (the wheelhouse pins)."""
    import importlib.metadata as md

    from nightshift.wheelhouse import serving_requirements

    reqs = serving_requirements()
    assert f"grpcio=={md.version('grpcio')}" in reqs
    assert f"protobuf=={md.version('protobuf')}" in reqs


# ----------------------------------------------------------------------------- the server process


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTSHIFT_")}
    env.update(PYTHONPATH=str(PLUGIN_SERVING.parent), NIGHTSHIFT_LOG_LEVEL="INFO", **extra)
    return env


def test_process_serves_grpc_on_nightshift_grpc_port(tiny_onnx_model_dir):
    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serving.server"], cwd=PLUGIN_SERVING.parent,
                            env=_env(NIGHTSHIFT_MODEL_DIR=str(tiny_onnx_model_dir), NIGHTSHIFT_PORT=str(port),
                                     NIGHTSHIFT_GRPC_PORT=str(grpc_port)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        c = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}")

        def ready() -> bool:
            try:
                return c.is_server_ready()
            except tg.InferenceServerException:
                assert proc.poll() is None, proc.stderr.read()
                return False

        wait_for(ready, what="the server's gRPC readiness", every_s=0.1)
        x = _images(8)
        inp = tg.InferInput("pixels", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x)
        assert c.infer("tiny", [inp]).as_numpy("logits").shape == (8, 3)
        c.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"OIP gRPC service on 127.0.0.1:{grpc_port}" in err


def test_process_with_its_grpc_port_taken_exits_2(tiny_onnx_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        grpc_port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "serving.server"], cwd=PLUGIN_SERVING.parent,
                              env=_env(NIGHTSHIFT_MODEL_DIR=str(tiny_onnx_model_dir), NIGHTSHIFT_PORT=str(free_port()),
                                       NIGHTSHIFT_GRPC_PORT=str(grpc_port)),
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "NIGHTSHIFT_GRPC_PORT" in proc.stderr and str(grpc_port) in proc.stderr


@pytest.mark.parametrize("raw, expected", [("", None), ("9001", 9001), ("0", 0), ("off", None), (" OFF ", None)])
def test_grpc_port_setting(raw, expected, monkeypatch):
    from nightshift.serving.server import grpc_port_from_env

    monkeypatch.setenv("NIGHTSHIFT_GRPC_PORT", raw)
    assert grpc_port_from_env() == expected


@pytest.mark.parametrize("raw", ["http", "70000", "-1"])
def test_bad_grpc_port_setting_names_the_variable(raw, monkeypatch):
    from nightshift.serving.server import grpc_port_from_env

    monkeypatch.setenv("NIGHTSHIFT_GRPC_PORT", raw)
    with pytest.raises(SystemExit, match="NIGHTSHIFT_GRPC_PORT"):
        grpc_port_from_env()


def test_shutdown_closes_the_grpc_port(tiny_onnx_model_dir):
    srv = _serve(tiny_onnx_model_dir)
    target = srv.grpc_target
    with grpc.insecure_channel(target) as channel:
        assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live
    srv.shutdown()
    srv.server_close()
    host, port = target.rsplit(":", 1)
    with socket.socket() as s:
        assert s.connect_ex((host, int(port))) != 0, "the gRPC port still accepts connections after shutdown"


def test_serving_containers_serve_grpc_only_when_asked():
    """On the host network the image's fixed 8081 would collide between containers: the run
    arguments turn gRPC off unless a port is given, and a picked port differs from the REST one."""
    from nightshift.containers import InferenceContainer, ServingConfig, serving_run_kwargs

    config = ServingConfig(mem_limit=None, environment={})
    plain = serving_run_kwargs("img:1", name="n", port=9000, config=config, request_log_dir=None, labels={})
    assert plain["environment"]["NIGHTSHIFT_GRPC_PORT"] == "off"
    both = serving_run_kwargs("img:1", name="n", port=9000, config=config, request_log_dir=None, labels={},
                              grpc_port=9001)
    assert both["environment"]["NIGHTSHIFT_GRPC_PORT"] == "9001"
    c = InferenceContainer("img:1", docker_client=object(), config=config, grpc_port=0)
    assert c.grpc_port not in (None, 0, c.port)
    assert c.grpc_target == f"127.0.0.1:{c.grpc_port}"
    assert c.run_kwargs()["environment"]["NIGHTSHIFT_GRPC_PORT"] == str(c.grpc_port)
    assert InferenceContainer("img:1", docker_client=object(), config=config).grpc_target is None


def test_the_image_serves_grpc_on_8081_and_exposes_both_ports():
    dockerfile = (ROOT / "include" / "inference" / "Dockerfile").read_text()
    assert "NIGHTSHIFT_GRPC_PORT=8081" in dockerfile
    assert "EXPOSE 8080 8081" in dockerfile


@pytest.mark.docker
def test_the_image_serves_grpc(serving_image, serving_docker, tiny_onnx_forward):
    """The built image (grpcio + protobuf from the wheelhouse, the committed stubs): tritonclient.grpc
    against a container run the way the evaluation runs it, given a gRPC port; REST beside it."""
    from nightshift.containers import InferenceContainer

    with InferenceContainer(serving_image["image"], docker_client=serving_docker, grpc_port=0,
                            environment={"NIGHTSHIFT_GRACEFUL_TIMEOUT_S": "2"}) as c:
        c.wait_ready(timeout_s=60)
        info = serving_docker.containers.get(c.name).attrs
        assert {"8080/tcp", "8081/tcp"} <= set(info["Config"].get("ExposedPorts") or {})
        client = tg.InferenceServerClient(c.grpc_target)
        assert client.is_server_live() and client.is_model_ready("tiny", "1")
        x = _images(8)
        inp = tg.InferInput("pixels", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(client.infer("tiny", [inp]).as_numpy("logits"), tiny_onnx_forward(x)[0],
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(tg.InferenceServerException) as err:
            client.get_model_metadata("nope")
        assert "NOT_FOUND" in str(err.value.status())
        client.close()


def test_a_grpc_port_taken_after_the_check_stops_the_start(tiny_onnx_model_dir):
    """The port is probed when the server is made and bound when it starts: taken in between
    (another process won the race), the lifespan startup fails, uvicorn does not serve, and
    the app says why (``main`` exits 2 with it)."""
    from nightshift.serving.server import Model, make_server

    model = Model(tiny_onnx_model_dir, max_batch=8, intra_op_threads=1)
    model.load()
    port = free_port()
    srv = make_server(model, "127.0.0.1", 0, grpc_port=port)
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            with pytest.raises(RuntimeError, match="did not start"):
                srv.start(timeout_s=30)
    finally:
        srv.shutdown()
        srv.server_close()
    assert isinstance(srv.app.startup_error, OSError)
    assert "NIGHTSHIFT_GRPC_PORT" in str(srv.app.startup_error) and str(port) in str(srv.app.startup_error)

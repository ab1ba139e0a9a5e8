"""The ONNX model (:mod:`nightshift.serving.model`): loading and its errors, the outputs it
lists and serves (``probabilities`` when the graph has it), as the HTTP clients see them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from nightshift.serving.server import Model, ModelLoadError, make_server
from tests.unit.serving_support import infer_body, png, serve


def test_load_errors_name_the_problem(tmp_path, tiny_onnx_factory):
    with pytest.raises(ModelLoadError, match="model.json does not exist"):
        Model(tmp_path / "nowhere").load()

    d = tiny_onnx_factory("badname")
    meta = json.loads((d / "model.json").read_text())
    (d / "model.json").write_text(json.dumps({**meta, "input_name": "image"}))
    m = Model(d)
    with pytest.raises(ModelLoadError, match="input_name 'image' does not match the ONNX graph's input 'pixels'"):
        m.load()
    assert not m.ready and "input_name" in m.load_error

    (d / "model.json").write_text(json.dumps({**meta, "input_shape": [8, 8, 1]}))
    with pytest.raises(ModelLoadError, match=r"input_shape \[8, 8, 1\] disagrees"):
        Model(d).load()
    (d / "model.json").write_text(json.dumps({**meta, "class_names": ["a", "b"]}))
    with pytest.raises(ModelLoadError, match="2 class_names but the model's logits have 3"):
        Model(d).load()
    (d / "model.onnx").write_bytes(b"not onnx")
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="could not load model"):
        Model(d).load()


# ----------------------------------------------------------------------------- the probabilities output


def test_model_with_probabilities_lists_and_serves_all_outputs(tiny_onnx_factory, tiny_onnx_forward):
    model = Model(tiny_onnx_factory("probs", probabilities=True), max_batch=8)
    model.load()
    meta = model.metadata()
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", "FP32", [-1, 3]), ("probabilities", "FP32", [-1, 3]), ("embedding", "FP32", [-1, 8]),
        ("label", "BYTES", [-1])]
    pixels = np.random.default_rng(3).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    logits, _ = tiny_onnx_forward(pixels)
    ref = np.exp(logits - logits.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    server = make_server(model, "127.0.0.1", 0).start()
    try:
        with requests.Session() as s:
            s.trust_env = False
            url = f"{server.url}/v2/models/{model.name}/infer"
            # no outputs named: all of them, in graph order, then label
            out = s.post(url, json=infer_body(pixels)).json()["outputs"]
            assert [o["name"] for o in out] == ["logits", "probabilities", "embedding", "label"]
            # only some, in request order
            out = s.post(url, json=infer_body(pixels, outputs=[{"name": "label"}, {"name": "probabilities"}])
                         ).json()["outputs"]
            assert [o["name"] for o in out] == ["label", "probabilities"]
    finally:
        server.shutdown()
        server.server_close()
    probs = np.asarray(out[1]["data"], dtype=np.float32).reshape(out[1]["shape"])
    assert out[1]["shape"] == [5, 3] and out[1]["datatype"] == "FP32"
    np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)
    assert out[0]["data"] == [["zero", "one", "two"][i] for i in probs.argmax(1)]


def test_old_model_without_probabilities_still_serves_and_says_what_it_has(serving_server, http):
    assert "probabilities" not in serving_server.model.output_names
    pixels = np.zeros((1, 4, 4, 1), np.uint8)
    r = http.post(f"{serving_server.url}/v2/models/tiny/infer",
                  json=infer_body(pixels, outputs=[{"name": "probabilities"}]))
    assert r.status_code == 400
    assert "'probabilities' is not an output of this model" in r.json()["error"]
    assert "['logits', 'embedding', 'label']" in r.json()["error"]


def test_model_json_listing_outputs_the_graph_lacks_is_a_load_error(tiny_onnx_factory):
    d = tiny_onnx_factory("lying")
    meta = json.loads((d / "model.json").read_text())
    (d / "model.json").write_text(json.dumps({**meta, "outputs": ["logits", "probabilities", "embedding"]}))
    with pytest.raises(ModelLoadError, match=r"lists outputs \['probabilities'\] that the ONNX graph does not have"):
        Model(d).load()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_asks_for_probabilities(tiny_onnx_factory, tiny_onnx_forward, x, binary):
    import tritonclient.http as th

    srv = serve(tiny_onnx_factory("probs", probabilities=True))
    try:
        client = th.InferenceServerClient(srv.url.removeprefix("http://"))
        meta = client.get_model_metadata("tiny")
        assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities", "embedding", "label"]
        inp = th.InferInput("pixels", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x, binary_data=binary)
        r = client.infer("tiny", [inp], outputs=[th.InferRequestedOutput("probabilities", binary_data=binary)])
        assert [o["name"] for o in r.get_response()["outputs"]] == ["probabilities"]
        logits, _ = tiny_onnx_forward(x)
        ref = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(r.as_numpy("probabilities"), ref / ref.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
        r = client.infer("tiny", [inp])  # no outputs named: all four
        assert {o["name"] for o in r.get_response()["outputs"]} == {"logits", "probabilities", "embedding", "label"}
    finally:
        srv.shutdown()
        srv.server_close()


def test_classify_answers_with_the_models_probabilities(tiny_onnx_factory, tiny_onnx_forward, http):
    from nightshift.data.decode import decode_image, to_shape

    srv = serve(tiny_onnx_factory("probs", probabilities=True))
    try:
        img = np.random.default_rng(8).integers(0, 256, (4, 4, 1), dtype=np.uint8)
        data = png(img)
        logits, _ = tiny_onnx_forward(to_shape(decode_image(data), (4, 4, 1))[None])
        r = http.post(f"{srv.url}/v2/models/tiny/classify", data=data, headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        ans = r.json()
        ref = np.exp(logits[0] - logits[0].max())
        ref /= ref.sum()
        assert ans["class"] == ["zero", "one", "two"][int(logits[0].argmax())]
        assert list(ans["probabilities"].values()) == pytest.approx(ref.tolist(), rel=1e-5)
        assert ans["confidence"] == pytest.approx(float(ref.max()), rel=1e-5)
    finally:
        srv.shutdown()
        srv.server_close()

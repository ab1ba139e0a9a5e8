"""KServe peer: KServe's Python model server hosting the same ONNX file, for ``bench/serving.py --peers``.

Runs in its own virtualenv (``bench/peers/setup.py``), not the project's. A ``kserve.Model``
whose ``predict`` runs one ONNX Runtime session with Nightshift's session options (the
same intra-op threads, one inter-op thread, no spinning) on each request as it comes --
KServe's Python server has no dynamic batcher of its own. Requests use the Open Inference
Protocol v2 over REST with the binary tensor data extension (KServe 0.21 decodes
``Inference-Header-Content-Length`` bodies and answers binary outputs when asked).

KServe binds its REST server to 0.0.0.0 with no option to change it; this script makes
uvicorn bind 127.0.0.1 instead (the bench only serves loopback). gRPC is off, and so are
the per-request access and latency logs (Nightshift samples 1% of its access log), so the
peer is not charged for logging the bench does not ask of it.

    python server.py --model-dir DIR --name small_cnn --http-port P --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import uuid
from pathlib import Path

import uvicorn

_Config = uvicorn.Config


class LoopbackConfig(_Config):
    """``uvicorn.Config`` with the host forced to 127.0.0.1 (KServe passes 0.0.0.0)."""

    def __init__(self, *args, **kwargs):
        kwargs["host"] = "127.0.0.1"
        super().__init__(*args, **kwargs)


uvicorn.Config = LoopbackConfig  # before kserve builds its RESTServer

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer  # noqa: E402


class OnnxModel(Model):
    """The ONNX classifier: uint8 NHWC pixels in, ``logits`` out (v2 protocol)."""

    def __init__(self, name: str, model_dir: Path, threads: int):
        super().__init__(name)
        self.model_dir, self.threads = model_dir, threads
        self.input_name = json.loads((model_dir / "model.json").read_text()).get("input_name", "pixels")
        self.sess: ort.InferenceSession | None = None

    def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = ort.InferenceSession(str(self.model_dir / "model.onnx"), opts,
                                         providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.uint8, copy=False)
        logits = self.sess.run(["logits"], {self.input_name: x})[0]
        out = InferOutput(name="logits", shape=list(logits.shape), datatype="FP32")
        out.set_data_from_numpy(logits, binary_data=payload.use_binary_outputs)
        # the requested outputs (binary_data per output, as the client asked) shape the reply
        # KServe's JSON reply model requires an id; the bench's requests carry none
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=[out],
                             use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = ap.parse_args()
    model = OnnxModel(args.name, args.model_dir, args.threads)
    model.load()
    server = ModelServer(http_port=args.http_port, enable_grpc=False, enable_latency_logging=False,
                         enable_docs_url=False, workers=1)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    main()

"""PyTriton peer: Triton's dynamic batcher in front of ONNX Runtime, for ``bench/serving.py --peers``.

Runs in its own virtualenv (``bench/peers/setup.py``), not the project's. The model is the
same ``model.onnx`` Nightshift serves; each Triton model instance owns one ONNX Runtime
session with Nightshift's session options (``threads`` intra-op threads, one inter-op
thread, no spinning), so the two servers differ in what sits around ONNX Runtime, not in
ONNX Runtime. HTTP (Triton's KServe-v2 endpoint, binary tensor extension) on 127.0.0.1;
gRPC and metrics on 127.0.0.1 too (metrics: the batch sizes Triton formed).

    python server.py --model-dir DIR --name small_cnn --http-port P --grpc-port G --metrics-port M \
        --threads 1 --instances 2 --max-batch 32 --queue-delay-us 2000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def make_infer(model_path: Path, threads: int, input_name: str):
    """One instance's infer function: a batch of uint8 images in, logits out (one ORT call per batch)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": sess.run(["logits"], {input_name: inputs[input_name]})[0]}

    return infer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per instance")
    ap.add_argument("--instances", type=int, default=1, help="Triton model instances (batches run at once)")
    ap.add_argument("--max-batch", type=int, default=32, help="Triton's max_batch_size")
    ap.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batcher max_queue_delay_microseconds")
    args = ap.parse_args()

    meta = json.loads((args.model_dir / "model.json").read_text())
    input_name = meta.get("input_name", "pixels")
    infer_funcs = [make_infer(args.model_dir / "model.onnx", args.threads, input_name)
                   for _ in range(args.instances)]
    config = TritonConfig(http_address="127.0.0.1", http_port=args.http_port, grpc_address="127.0.0.1",
                          grpc_port=args.grpc_port, metrics_address="127.0.0.1", metrics_port=args.metrics_port,
                          allow_cpu_metrics=False, allow_gpu_metrics=False, log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer_funcs,
            inputs=[Tensor(name=input_name, dtype=np.uint8, shape=tuple(meta["input_shape"]))],
            outputs=[Tensor(name="logits", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(max_batch_size=args.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us)),
            strict=False,
        )
        triton.serve()  # blocks; SIGTERM/SIGINT stop Triton and the proxy processes it started


if __name__ == "__main__":
    main()

"""Nightshift benchmarks: each figure is a ratio against a baseline measured in
the same run, on the same machine; medians over repeats (these machines are noisy).

    make bench            # writes docs/benchmarks.md

1. DAG parse time: importing dags/nightly_retrain.py in a fresh interpreter vs
   importing airflow.sdk alone (the floor any Airflow 3 DAG pays).
2. Serving overhead: one image per request through the OIP HTTP server (in
   process, loopback) vs calling the same ONNX Runtime session directly.
3. Training step (issue 9): epoch time of ``train()``'s full step (on-device
   shuffle, augmentation, schedule, loss bookkeeping) vs a bare loop over
   preloaded tensors on the same model with no augmentation; target <= 1.10x.

The GPU training figures (``bench/gpu_train.py``, run on a GPU machine) are kept
in their own section of docs/benchmarks.md, which this script carries over.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))


def fresh_import_seconds(code: str, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        r = subprocess.run([sys.executable, "-c", f"import time; t=time.perf_counter(); {code}; "
                            "print(time.perf_counter()-t)"], capture_output=True, text=True, check=True,
                           env={"PYTHONPATH": str(ROOT / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                                "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
        out.append(float(r.stdout.strip().splitlines()[-1]))
    return out


def bench_parse(repeats: int = 7) -> dict:
    base = fresh_import_seconds("import airflow.sdk", repeats)
    dag = fresh_import_seconds(
        "import importlib.util as u; s=u.spec_from_file_location('d', %r); m=u.module_from_spec(s); "
        "s.loader.exec_module(m)" % str(ROOT / "dags" / "nightly_retrain.py"), repeats)
    return {"baseline_s": statistics.median(base), "dag_s": statistics.median(dag),
            "ratio": statistics.median(dag) / statistics.median(base), "repeats": repeats}


def bench_serving(snapshot, trained_ckpt, work: Path, n: int = 200, repeats: int = 3) -> dict:
    import onnxruntime as ort
    import requests

    from nightshift.export import export_and_verify
    from nightshift.serving.server import Model, make_server

    x, _ = snapshot.split("test")
    x = x[:n]
    exp = export_and_verify(trained_ckpt, work / "model", x, model_name="bench")
    sess = ort.InferenceSession(exp["onnx_path"], providers=["CPUExecutionProvider"])
    model = Model(exp["model_dir"])
    model.load()
    server = make_server(model, "127.0.0.1", 0).start()
    port = server.server_address[1]
    url = f"http://127.0.0.1:{port}/v2/models/bench/infer"
    http = requests.Session()
    direct_p50, served_p50 = [], []
    try:
        for _ in range(repeats):
            lat = []
            for i in range(len(x)):
                t = time.perf_counter()
                sess.run(None, {"pixels": x[i:i + 1]})
                lat.append(time.perf_counter() - t)
            direct_p50.append(statistics.median(lat))
            lat = []
            for i in range(len(x)):
                body = {"inputs": [{"name": "pixels", "shape": [1, *x.shape[1:]], "datatype": "UINT8",
                                    "data": x[i].ravel().tolist()}]}
                t = time.perf_counter()
                r = http.post(url, json=body, timeout=10)
                lat.append(time.perf_counter() - t)
                r.raise_for_status()
            served_p50.append(statistics.median(lat))
    finally:
        server.shutdown()
        server.server_close()
    d, s = statistics.median(direct_p50), statistics.median(served_p50)
    return {"direct_p50_ms": d * 1e3, "served_p50_ms": s * 1e3, "ratio": s / d, "requests": len(x), "repeats": repeats}


def bench_training_step(snapshot, work: Path, repeats: int = 5, epochs: int = 4) -> dict:
    """Median epoch time (epochs after the first) of ``train()`` with its default
    augmentation vs a bare loop over preloaded tensors: same model, optimizer,
    schedule and batch size; no shuffle, no augmentation. Interleaved repeats."""
    import torch

    from nightshift import training
    from nightshift.models import Classifier

    hp = training.resolve_hparams({"epochs": epochs}, snapshot.image_shape)
    x, y = snapshot.split("train")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype("int64"))
    steps, n = training.plan_steps(len(y), hp["batch_size"])
    bs = min(hp["batch_size"], len(y))

    def bare() -> float:
        torch.manual_seed(0)
        model = Classifier(hp["model"], len(snapshot.class_names), snapshot.image_shape,
                           *training.channel_stats(x), width=hp["width"])
        opt = training.make_optimizer(model, hp)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: training.lr_factor(k, steps * epochs, hp["warmup_fraction"]))
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=hp["label_smoothing"])
        model.train()
        times = []
        for _ in range(epochs):
            t = time.perf_counter()
            for k in range(steps):
                xb, yb = xt[k * bs:min((k + 1) * bs, n)], yt[k * bs:min((k + 1) * bs, n)]
                loss = loss_fn(model(xb)[0].float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    def full() -> float:
        r = training.train(snapshot, work / "step", {"epochs": epochs}, resume=False)  # same dir each repeat
        return statistics.median([h["epoch_seconds"] for h in r.history[1:]])

    bare_s, full_s = [], []
    for _ in range(repeats):
        bare_s.append(bare())
        full_s.append(full())
    b, f = statistics.median(bare_s), statistics.median(full_s)
    return {"bare_epoch_s": b, "full_epoch_s": f, "ratio": f / b, "repeats": repeats, "epochs": epochs,
            "model": hp["model"], "batch_size": hp["batch_size"], "crop_pad": hp["crop_pad"], "flip": hp["flip"],
            "images_per_epoch": n}


GPU_SECTION = "## GPU training"
DATA_SECTION = "## Data path at scale"
OPSET_SECTION = "## ONNX opset of the exported model"  # bench/onnx_opset.py


def kept_section(heading: str) -> str:
    """The section of the current docs/benchmarks.md that starts with ``heading``, up to the next
    ``## `` heading: figures another bench measured (GPU training on a GPU machine, the data path)."""
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.is_file() else ""
    if heading not in text:
        return ""
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end != -1 else len(text)].rstrip() + "\n"


def main() -> int:
    from nightshift.data.snapshot import write_snapshot
    from nightshift.data.sources import load_bundled
    from nightshift.training import load_checkpoint, train

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        snap = write_snapshot(load_bundled(), work / "snapshots")
        ckpt = load_checkpoint(train(snap, work / "train", {"epochs": 4}).checkpoint_path)
        results = {"parse": bench_parse(), "serving": bench_serving(snap, ckpt, work),
                   "training_step": bench_training_step(snap, work)}
    p, s, a = results["parse"], results["serving"], results["training_step"]
    md = f"""# Benchmarks

Measured by `make bench` (`bench/run_benchmarks.py`) on {platform.machine()}, {platform.python_version()},
{__import__('os').cpu_count()} cores, CPU only; {time.strftime('%Y-%m-%d')}. Medians; each figure is a ratio
against a baseline measured in the same run.

| what | baseline | measured | ratio |
|---|---|---|---|
| DAG parse: import `dags/nightly_retrain.py` vs `import airflow.sdk` (fresh interpreter, median of {p['repeats']}) | {p['baseline_s']:.2f} s | {p['dag_s']:.2f} s | {p['ratio']:.2f}× |
| Serving, 1 image/request: OIP HTTP server on loopback vs direct ONNX Runtime `session.run` (p50 of {s['requests']} requests, median of {s['repeats']}) | {s['direct_p50_ms']:.3f} ms | {s['served_p50_ms']:.3f} ms | {s['ratio']:.1f}× |

Reading them: a parse ratio near 1 means the DAG file adds little beyond the SDK
import; the serving ratio is the price of HTTP + JSON per image for a tiny model
(the server under load, binary protocol and batching: see "Serving under load").

Raw: `{json.dumps(results)}`

## Training step on CPU

Epoch time of `train()`'s full step on the digits with the default recipe for
8×8 images ({a['model']}, batch {a['batch_size']}, translate ±{a['crop_pad']} px,
flip {'on' if a['flip'] else 'off'}; on-device shuffle, one-gather augmentation, LR
schedule, loss bookkeeping) vs a bare loop over preloaded tensors on the same model
and optimizer with no shuffle and no augmentation. Median over epochs 2–{a['epochs']}
of each run, median of {a['repeats']} interleaved runs. Target: ≤ 1.10×.

| what | bare loop | full step | ratio |
|---|---|---|---|
| Epoch of {a['images_per_epoch']:,} images, CPU | {a['bare_epoch_s'] * 1e3:.1f} ms | {a['full_epoch_s'] * 1e3:.1f} ms | {a['ratio']:.2f}× |

{kept_section(GPU_SECTION)}
{kept_section(OPSET_SECTION)}"""
    serving_json = ROOT / "docs" / "benchmarks-serving.json"
    if serving_json.is_file():  # written by bench/serving.py (make bench runs it first)
        sys.path.insert(0, str(ROOT / "bench"))
        from serving import render_markdown

        md += "\n" + render_markdown(json.loads(serving_json.read_text()))
    else:
        md += "\n## Serving under load\n\nNot measured: run `python bench/serving.py` first.\n"
    data = kept_section(DATA_SECTION)
    md += "\n" + (data or f"{DATA_SECTION}\n\nNot measured: run `python bench/data_scale.py`.\n")

    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "benchmarks.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

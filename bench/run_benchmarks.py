"""Nightshift benchmarks: each figure is a ratio against a baseline measured in
the same run, on the same machine; medians over repeats (these machines are noisy).

    make bench            # writes docs/benchmarks.md

1. DAG parse time: importing dags/nightly_retrain.py in a fresh interpreter vs
   importing airflow.sdk alone (the floor any Airflow 3 DAG pays).
2. Serving overhead: one image per request through the OIP HTTP server (in
   process, loopback) vs calling the same ONNX Runtime session directly.
3. Batched on-device augmentation: training throughput with random crops vs
   without (the augmentation's cost).
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


def bench_augmentation(snapshot, work: Path, repeats: int = 3) -> dict:
    from nightshift.training import train

    def ips(crop_pad: int) -> float:
        r = train(snapshot, work / f"aug{crop_pad}", {"epochs": 3, "width": 16, "crop_pad": crop_pad})
        return r.metrics["train_images_per_second"]

    with_aug, without = [], []
    for _ in range(repeats):  # interleaved so drift in machine load hits both
        without.append(ips(0))
        with_aug.append(ips(1))
    a, b = statistics.median(with_aug), statistics.median(without)
    return {"with_crop_ips": a, "without_ips": b, "ratio": a / b, "repeats": repeats}


def main() -> int:
    from nightshift.data.snapshot import write_snapshot
    from nightshift.data.sources import load_bundled
    from nightshift.training import load_checkpoint, train

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        snap = write_snapshot(load_bundled(), work / "snapshots")
        ckpt = load_checkpoint(train(snap, work / "train", {"epochs": 4}).checkpoint_path)
        results = {"parse": bench_parse(), "serving": bench_serving(snap, ckpt, work),
                   "augmentation": bench_augmentation(snap, work)}
    p, s, a = results["parse"], results["serving"], results["augmentation"]
    md = f"""# Benchmarks

Measured by `make bench` (`bench/run_benchmarks.py`) on {platform.machine()}, {platform.python_version()},
{__import__('os').cpu_count()} cores, CPU only; {time.strftime('%Y-%m-%d')}. Medians; each figure is a ratio
against a baseline measured in the same run.

| what | baseline | measured | ratio |
|---|---|---|---|
| DAG parse: import `dags/nightly_retrain.py` vs `import airflow.sdk` (fresh interpreter, median of {p['repeats']}) | {p['baseline_s']:.2f} s | {p['dag_s']:.2f} s | {p['ratio']:.2f}× |
| Serving, 1 image/request: OIP HTTP server on loopback vs direct ONNX Runtime `session.run` (p50 of {s['requests']} requests, median of {s['repeats']}) | {s['direct_p50_ms']:.3f} ms | {s['served_p50_ms']:.3f} ms | {s['ratio']:.1f}× |
| Training throughput (small_cnn, digits, CPU): random-crop augmentation on the device vs none (median of {a['repeats']}) | {a['without_ips']:,.0f} img/s | {a['with_crop_ips']:,.0f} img/s | {a['ratio']:.2f}× |

Reading them: a parse ratio near 1 means the DAG file adds little beyond the SDK
import; the serving ratio is the price of HTTP + JSON per image for a tiny model
(the server under load, binary protocol and batching: next section); an
augmentation ratio near 1 means the on-device crops cost little next to a step.

Raw: `{json.dumps(results)}`
"""
    serving_json = ROOT / "docs" / "benchmarks-serving.json"
    if serving_json.is_file():  # written by bench/serving.py (make bench runs it first)
        sys.path.insert(0, str(ROOT / "bench"))
        from serving import render_markdown

        md += "\n" + render_markdown(json.loads(serving_json.read_text()))
    else:
        md += "\n## Serving under load\n\nNot measured: run `python bench/serving.py` first.\n"
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "benchmarks.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

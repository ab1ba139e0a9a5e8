"""Parse time of the generating Dag files with 20 models vs 1 model (issue 21 target: at most 2x).

    python bench/parse_models.py [--repeats 7] [--models 20]   # bench/results/parse_models.json

Each measurement is a fresh interpreter that loads one Dag file (``dags/nightly_retrain.py`` or
``dags/drift_monitor.py``) the way the Dag processor does (``importlib`` from the file) with
``NIGHTSHIFT_MODELS_FILE`` pointing at a generated models file of 1 or N models (the bundled
digits as the default, the others on their own ports and schedules). Two figures per run:

- ``fresh_s``: the whole load in the fresh interpreter, Airflow's and Nightshift's imports
  included (what a Dag processor's first parse of the file costs);
- ``file_s``: the Dag file's own execution after ``airflow.sdk`` and ``nightshift.operators``
  are imported (the cost that grows with the number of models).

1-model and N-model runs alternate; the figures are medians, and the ratio is N-model / 1-model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "parse_models.json"
FILES = ("nightly_retrain.py", "drift_monitor.py")

PROBE = """
import importlib.util, json, sys, time
t0 = time.perf_counter()
import airflow.sdk, nightshift.operators
t1 = time.perf_counter()
spec = importlib.util.spec_from_file_location("dagfile", sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
t2 = time.perf_counter()
n = sum(isinstance(v, airflow.sdk.DAG) for v in vars(m).values())
print(json.dumps({"fresh_s": t2 - t0, "file_s": t2 - t1, "dags": n}))
"""


def models_yaml(n: int) -> str:
    lines = ["models:", "  - {name: nightshift-digits, default: true, source: bundled}"]
    lines += [f"  - {{name: model-{i:02d}, source: bundled, schedule: '{i} 3 * * *', deadline: 2h, "
              f"recipe: {{model: small_cnn, epochs: 4}}, deploy: {{port: {8700 + 2 * i}}}}}" for i in range(1, n)]
    return "\n".join(lines) + "\n"


def measure(dag_file: Path, models_file: Path) -> dict:
    env = {**os.environ, "NIGHTSHIFT_MODELS_FILE": str(models_file),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for name in ("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "_AIRFLOW_PARSING_CONTEXT_TASK_ID"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", PROBE, str(dag_file)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--models", type=int, default=20)
    args = ap.parse_args()
    results: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "repeats": args.repeats,
                     "models": args.models, "python": platform.python_version(), "cpus": os.cpu_count(),
                     "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for n in (1, args.models):
            files[n] = Path(tmp) / f"models-{n}.yaml"
            files[n].write_text(models_yaml(n))
        for name in FILES:
            runs: dict[int, list[dict]] = {1: [], args.models: []}
            measure(ROOT / "dags" / name, files[1])  # warm the OS file cache: not counted
            for _ in range(args.repeats):
                for n in (1, args.models):  # alternate, so drift in machine load hits both
                    r = measure(ROOT / "dags" / name, files[n])
                    assert r["dags"] == n, f"{name} with {n} models defined {r['dags']} Dags"
                    runs[n].append(r)
            entry = {}
            for key in ("fresh_s", "file_s"):
                one = statistics.median(r[key] for r in runs[1])
                many = statistics.median(r[key] for r in runs[args.models])
                entry[key] = {"1": round(one, 4), str(args.models): round(many, 4), "ratio": round(many / one, 3),
                              "per_extra_model_ms": round((many - one) / (args.models - 1) * 1000, 2)}
            results["files"][name] = entry
            f, g = entry["fresh_s"], entry["file_s"]
            print(f"{name}: fresh interpreter {f['1']:.2f} s (1 model) vs {f[str(args.models)]:.2f} s "
                  f"({args.models} models) = {f['ratio']:.2f}x; the file itself {g['1'] * 1000:.0f} ms vs "
                  f"{g[str(args.models)] * 1000:.0f} ms ({g['per_extra_model_ms']:.1f} ms per extra model)")
    target = all(e["fresh_s"]["ratio"] <= 2.0 for e in results["files"].values())
    results["target"] = {"fresh_ratio_at_most": 2.0, "met": target}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"target (fresh ratio <= 2x): {'met' if target else 'NOT met'}; wrote {RESULTS}")
    return 0 if target else 1


if __name__ == "__main__":
    raise SystemExit(main())

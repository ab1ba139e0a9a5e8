"""A hyperparameter sweep of 8 trials vs one trial (issue 21, "Targets").

On the bundled digits, on CPU:

1. **One trial**: ``train()`` with the default recipe (what ``train_gpu`` trains without a
   sweep), wall time from call to return: ``--repeats`` runs before the sweep and one after
   (the load of a shared machine may change meanwhile), the median of all; its val accuracy.
2. **The sweep**: a DAG ``collect_data ─► sweep_trials ─► train_gpu[8] ─► select_trial`` built
   with :func:`nightshift.operators.sweep.sweep_train`, run with ``dag.test()`` (one process,
   trials one after another: the embedded profile's worst case), wall time of the whole run
   (collect, 8 trainings, MLflow parent and child runs, the winner's test score), once.

Targets: sweep wall ≤ 8 × one trial + 60 s; the winner's val accuracy ≥ the default recipe's.
Also reported: the trials' own task durations (metadata DB) and the sweep's orchestration
overhead (wall − their sum), and the time target with each trial's own task duration
(sweep wall ≤ their sum + 60 s: robust to a shared machine's load changing mid-run).
The grid (lr × batch size) contains the default recipe's point, so the comparison is fair: a
trial with the default values trains exactly what the default recipe trains (same seed).

    python bench/sweep.py [--repeats 3]

Writes bench/results/sweep.json. Needs the Airflow metadata DB (``make setup``); MLflow and the
artifacts go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
RESULTS = ROOT / "bench" / "results"
DAG_ID = "bench_sweep"
MODEL = "bench-sweep-digits"
#: 4 learning rates × 2 batch sizes = 8 trials; (3e-3, 128) is the default recipe for 8×8 images.
SWEEP = {"method": "grid", "max_failed": 2, "max_parallel": 2,
         "space": {"lr": [1e-3, 3e-3, 6e-3, 1e-2], "batch_size": [64, 128]}}

DAG_FILE = '''# an airflow DAG file for bench/sweep.py
from datetime import datetime

from airflow.sdk import dag

from nightshift.operators import CollectDataOperator
from nightshift.operators.sweep import sweep_train
from nightshift.placement import TrainPlacement


@dag(dag_id={dag_id!r}, schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
     default_args={{"retries": 0}}, render_template_as_native_obj=True)
def bench_sweep():
    collect = CollectDataOperator(task_id="collect_data", source="bundled")
    sweep_train(TrainPlacement(), sweep={sweep!r}, snapshot=collect.output, model_name={model!r},
                hparams={{}}, require_gpu=False)


bench_sweep()
'''


def one_trial(work: Path, repeats: int, tag: str) -> dict:
    """The default recipe's training on the digits, ``repeats`` times (fresh folders)."""
    from nightshift.data.snapshot import write_snapshot
    from nightshift.data.sources import load_bundled
    from nightshift.training import resolve_hparams, train

    snap = write_snapshot(load_bundled(), work / "snapshots")
    walls, vals, tests = [], [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        res = train(snap, work / f"default_{tag}_{i}", {})
        walls.append(time.perf_counter() - t0)
        vals.append(res.metrics["val_accuracy"])
        tests.append(res.metrics["test_accuracy"])
    hp = resolve_hparams({}, snap.image_shape)
    return {"wall_s": walls, "val_accuracy": vals, "test_accuracy": tests,
            "recipe": {k: hp[k] for k in ("model", "epochs", "batch_size", "optimizer", "lr")}}


def task_seconds(run_id: str) -> dict[str, float]:
    """Each task instance's duration in the sweep run (``train_gpu[i]`` for the trials)."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id).all()
        return {(f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id):
                (ti.end_date - ti.start_date).total_seconds() for ti in tis if ti.start_date and ti.end_date}


def sweep_run(work: Path) -> dict:
    """The 8-trial sweep DAG under dag.test(); its wall time, winner and trial table."""
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    folder = work / "dags"
    folder.mkdir()
    (folder / "bench_sweep.py").write_text(DAG_FILE.format(dag_id=DAG_ID, sweep=SWEEP, model=MODEL))
    bag = DagBag(dag_folder=str(folder))
    if bag.import_errors:
        raise SystemExit(f"the bench DAG does not load: {bag.import_errors}")
    sync_bag_to_db(bag, "dags-folder", None)
    dag = bag.dags[DAG_ID]
    t0 = time.perf_counter()
    dr = dag.test()
    wall = time.perf_counter() - t0
    if str(dr.state) != "success":
        raise SystemExit(f"the sweep run ended {dr.state}; see the log above")
    with create_session() as session:
        row = session.query(XComModel).filter(XComModel.dag_id == DAG_ID, XComModel.run_id == dr.run_id,
                                              XComModel.task_id == "select_trial",
                                              XComModel.key == "return_value").one()
        winner = XComModel.deserialize_value(row)
    table = json.loads((Path(winner["train_dir"]).parents[1] / "sweep" / "trials.json").read_text())
    return {"wall_s": wall, "task_seconds": task_seconds(dr.run_id), "winner": winner["sweep"], "winner_metrics": winner["metrics"],
            "trials": [{"trial": t["trial"], "hparams": {k: t["hparams"].get(k) for k in SWEEP["space"]},
                        "failed": t["failed"], "val_accuracy": (t["metrics"] or {}).get("val_accuracy"),
                        "train_seconds": (t["metrics"] or {}).get("train_seconds")} for t in table["trials"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of the one-trial baseline (median)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.update({"NIGHTSHIFT_ARTIFACT_ROOT": str(work / "artifacts"),
                           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
                           "MLFLOW_REGISTRY_URI": f"sqlite:///{work / 'mlflow.db'}"})
        before = one_trial(work, args.repeats, "before")
        sweep = sweep_run(work)
        after = one_trial(work, 1, "after")  # the machine's load may change while the sweep runs: bracket it
    # CPU training is not bit-identical run to run (thread scheduling of reductions): every run's
    # val accuracy is kept, and the default recipe's figure is their best (the winner must match it)
    vals = before["val_accuracy"] + after["val_accuracy"]
    base = {**before, "wall_s": before["wall_s"] + after["wall_s"], "val_accuracy_runs": vals,
            "val_accuracy": max(vals), "test_accuracy": before["test_accuracy"] + after["test_accuracy"],
            "median_s": statistics.median(before["wall_s"] + after["wall_s"]),
            "before_s": before["wall_s"], "after_s": after["wall_s"]}
    n = len(sweep["trials"])
    budget = n * base["median_s"] + 60
    trial_s = [v for k, v in sweep["task_seconds"].items() if k.startswith("train_gpu[")]
    overhead = sweep["wall_s"] - sum(trial_s)
    default_trial = next(t for t in sweep["trials"]
                         if t["hparams"] == {"lr": base["recipe"]["lr"], "batch_size": base["recipe"]["batch_size"]})
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_1m_at_end": os.getloadavg()[0]},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sweep_spec": SWEEP,
        "one_trial": base,
        "sweep": sweep,
        "targets": {
            "time": {"sweep_wall_s": sweep["wall_s"], "budget_s": budget,
                     "formula": f"{n} x one trial (median {base['median_s']:.1f} s) + 60 s",
                     "ratio_to_one_trial": sweep["wall_s"] / base["median_s"], "met": sweep["wall_s"] <= budget},
            # the same target with each trial's time measured inside the sweep (its task's duration in the
            # metadata DB): the 8 trainings as they ran + 60 s, i.e. orchestration overhead <= 60 s;
            # robust to the load of a shared machine changing between the baseline and the sweep
            "time_in_run": {"sum_trial_task_s": sum(trial_s), "median_trial_task_s": statistics.median(trial_s),
                            "overhead_s": overhead, "budget_s": sum(trial_s) + 60,
                            "met": sweep["wall_s"] <= sum(trial_s) + 60},
            "accuracy": {"winner_val_accuracy": sweep["winner_metrics"]["val_accuracy"],
                         "default_recipe_val_accuracy": base["val_accuracy"],
                         "default_point_trial_val_accuracy": default_trial["val_accuracy"],
                         "met": sweep["winner_metrics"]["val_accuracy"] >= base["val_accuracy"]},
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sweep.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    t, a, r = result["targets"]["time"], result["targets"]["accuracy"], result["targets"]["time_in_run"]
    print(f"one trial (default recipe): median {base['median_s']:.1f} s of {base['wall_s']}; "
          f"val {base['val_accuracy']:.4f}")
    print(f"sweep of {n}: {t['sweep_wall_s']:.1f} s (budget {t['budget_s']:.1f} s, {t['ratio_to_one_trial']:.2f}x one "
          f"trial) -> {'MET' if t['met'] else 'MISSED'}")
    print(f"inside the run: trials' tasks {r['sum_trial_task_s']:.1f} s in all (median {r['median_trial_task_s']:.1f} s), "
          f"orchestration overhead {r['overhead_s']:.1f} s; budget {r['budget_s']:.1f} s -> "
          f"{'MET' if r['met'] else 'MISSED'}")
    print(f"winner trial {sweep['winner']['trial']} {sweep['winner']['hparams']}: val {a['winner_val_accuracy']:.4f} "
          f"vs default {a['default_recipe_val_accuracy']:.4f} (the default point as a trial: "
          f"{a['default_point_trial_val_accuracy']:.4f}) -> {'MET' if a['met'] else 'MISSED'}")
    return 0 if (t["met"] or r["met"]) and a["met"] else 1


if __name__ == "__main__":
    sys.exit(main())

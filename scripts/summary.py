"""Print the outcome of the latest run of a Nightshift DAG: task states, the
promotion decision and its gates, champion version, image, key metrics and
where the reports are. Exit status 1 when the run did not succeed."""

from __future__ import annotations

import json
import sys


def main(dag_id: str) -> int:
    from airflow.models import DagRun, TaskInstance
    from airflow.utils.session import create_session

    from nightshift.artifacts import run_dir
    from nightshift.settings import Settings

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        if run is None:
            print(f"no run of {dag_id} found")
            return 1
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run.run_id).all()
        states = {ti.task_id: str(ti.state) for ti in tis}
        run_id, run_state = run.run_id, str(run.state)
    folder = run_dir(Settings.from_env().artifact_root, dag_id, run_id)
    print(f"\n=== {dag_id} {run_id}: {run_state.upper()}")
    for task, state in sorted(states.items()):
        print(f"  {task:<24} {state}")
    validation = folder / "validation" / "validation.json"
    if validation.exists():
        v = json.loads(validation.read_text())["summary"]
        if not v.get("success", True):
            print(f"\nDATA VALIDATION FAILED ({v.get('failed')} of {v.get('evaluated')} expectations); nothing was trained:")
            for f in v.get("failures", []):
                print(f"  - {f.get('expectation')}{' [' + f['column'] + ']' if f.get('column') else ''}: {f.get('summary')}")
    promo = folder / "promotion.json"
    if promo.exists():
        p = json.loads(promo.read_text())
        print(f"\n{'PROMOTED' if p['promoted'] else 'NOT PROMOTED'}: {p['model_name']} v{p['version']} — {p['reason']}")
        print(f"  champion: v{p['champion']} (before this run: {p['previous_champion'] or 'none'})")
        print(f"  image:    {p['image']}")
        print(f"  offline accuracy {p['offline_accuracy']:.4f}, served accuracy {p['served_accuracy']:.4f}, "
              f"p95 latency {p['p95_latency_ms']:.2f} ms")
        for g in p["gates"]:
            print(f"    {'PASS' if g['passed'] else 'FAIL'}  {g['name']:<18} {g['detail']}")
        d = p.get("drift") or {}
        print(f"  drift: {d.get('status')}, drifted share {d.get('drifted_share')}, report {d.get('report_html')}")
    for name in ("validation/validation.json", "system_eval/system_eval.json", "model/parity.json", "promotion.json"):
        if (folder / name).exists():
            print(f"  report: {folder / name}")
    print(f"  artifacts: {folder}")
    print("  Nightshift view: `make airflow-ui`, then Browse → Nightshift (http://127.0.0.1:8080/nightshift/)")
    return 0 if run_state == "success" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "nightly_retrain"))

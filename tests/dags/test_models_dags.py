"""The Dags generated from the models file: ids, order, Params, schedules, drift Assets, deadlines;
a malformed entry is an import error naming entry and field while the other models' Dags load;
parsing reads only that file and imports nothing heavy, with 20 models as with one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from tests.dags.conftest import DAGS, parse_dags

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "include" / "models.example.yaml"
CLEAR = ("NIGHTSHIFT_TRAIN_PLACEMENT", "NIGHTSHIFT_DOCKER_QUEUE", "_AIRFLOW_PARSING_CONTEXT_DAG_ID",
         "_AIRFLOW_PARSING_CONTEXT_TASK_ID")
HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "evidently", "great_expectations", "mlflow", "docker",
         "sklearn", "pandas")


def write_models(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "models.yaml"
    f.write_text(textwrap.dedent(text))
    return f


def many_models(n: int) -> str:
    lines = ["models:", "  - {name: nightshift-digits, default: true}"]
    lines += [f"  - {{name: m{i:02d}, source: bundled, deploy: {{port: {8700 + 2 * i}}}, schedule: '{i} 3 * * *'}}"
              for i in range(1, n)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def example_bag(monkeypatch):
    return parse_dags(monkeypatch, DAGS, CLEAR, NIGHTSHIFT_MODELS_FILE=str(EXAMPLE))


def test_every_model_gets_its_two_dags_and_the_default_keeps_todays_ids(example_bag):
    dags, errors = example_bag
    assert errors == {}
    assert {"nightly_retrain", "drift_monitor", "nightly_retrain__digits-small", "drift_monitor__digits-small",
            "rollback_model", "promote_model"} == set(dags)
    default, small = dags["nightly_retrain"], dags["nightly_retrain__digits-small"]
    assert {t.task_id for t in small.tasks} == {t.task_id for t in default.tasks}
    for t in small.tasks:  # the same pipeline, wired the same way
        assert t.upstream_task_ids == default.get_task(t.task_id).upstream_task_ids, t.task_id
    assert "model:digits-small" in small.tags and "example" in small.tags


def test_params_default_to_the_entry_so_schedule_assets_and_trigger_use_the_models_own_values(example_bag):
    dags, _ = example_bag
    p = dags["nightly_retrain__digits-small"].params
    assert (p["model_name"], p["deploy_port"], p["source"], p["model"], p["epochs"]) == \
        ("digits-small", 8610, "bundled", "small_cnn", 4)
    d = dags["nightly_retrain"].params
    assert (d["model_name"], d["deploy_port"], d["model"], d["epochs"]) == ("nightshift-digits", 8600, "auto", None)
    m = dags["drift_monitor__digits-small"].params
    assert (m["model_name"], m["min_rows"]) == ("digits-small", 50)
    assert dags["drift_monitor"].params["min_rows"] == 100


def test_each_model_has_its_own_drift_asset_schedule_and_deadline(example_bag):
    dags, _ = example_bag

    def emitted(dag_id):
        return [o.name for o in dags[dag_id].get_task("request_retrain").outlets]

    assert emitted("drift_monitor") == ["nightshift_drift_detected"]
    assert emitted("drift_monitor__digits-small") == ["nightshift_drift_detected__digits-small"]
    assert dags["nightly_retrain"].timetable.asset_condition.name == "nightshift_drift_detected"
    assert dags["nightly_retrain__digits-small"].timetable.asset_condition.name == \
        "nightshift_drift_detected__digits-small"  # one model's drift retrains only that model
    assert dags["nightly_retrain__digits-small"].timetable.timetable.expression == "30 3 * * *"
    (alert,) = dags["nightly_retrain__digits-small"].deadline
    assert alert.interval == timedelta(hours=2) and type(alert.reference).__name__ == "DagRunQueuedAtDeadline"
    assert alert.callback.path == "nightshift.operators.deadline.record_deadline_miss"
    assert alert.callback.kwargs == {"model_name": "digits-small", "interval_s": 7200.0}
    (default_alert,) = dags["nightly_retrain"].deadline
    assert default_alert.interval == timedelta(hours=4)


def test_a_null_schedule_makes_a_drift_only_retrain_and_a_triggered_only_monitor(tmp_path, monkeypatch):
    """``schedule: null``: the scheduler makes this model's nightly runs from its drift Asset only (no
    cron part a scheduler would start on unpause); ``drift.schedule: null``: the monitor never runs by itself."""
    from airflow.sdk import Asset

    f = write_models(tmp_path, """
        models:
          - {name: nightshift-digits, default: true}
          - {name: driftonly, schedule: null, drift: {schedule: null}, deploy: {port: 8610}}
    """)
    dags, errors = parse_dags(monkeypatch, DAGS, CLEAR, NIGHTSHIFT_MODELS_FILE=str(f))
    assert errors == {}
    retrain, monitor = dags["nightly_retrain__driftonly"], dags["drift_monitor__driftonly"]
    assert type(retrain.timetable).__name__ == "AssetTriggeredTimetable", retrain.timetable
    assert isinstance(retrain.timetable.asset_condition, Asset)
    assert retrain.timetable.asset_condition.name == "nightshift_drift_detected__driftonly"
    assert type(monitor.timetable).__name__ == "NullTimetable", monitor.timetable
    assert "schedule none (no timed runs): the `nightshift_drift_detected__driftonly` Asset" in retrain.doc_md
    # the default model keeps its cron or Asset schedule
    assert dags["nightly_retrain"].timetable.timetable.expression == "0 2 * * *"


def test_a_drift_triggered_run_records_the_events_it_was_made_of():
    """The cooldown task's ``triggered_by``: which drift_monitor run saw what (the event's extra);
    nothing for a timed or triggered run."""
    import importlib.util
    from datetime import datetime, timezone
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("nr_events", DAGS / "nightly_retrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from airflow.sdk import Asset

    asset = Asset("nightshift_drift_detected__m")
    event = SimpleNamespace(source_dag_id="drift_monitor__m", source_run_id="r1",
                            timestamp=datetime(2026, 12, 5, 12, tzinfo=timezone.utc),
                            extra={"model_name": "m", "champion_version": "3", "drifted_share": 0.75,
                                   "n_current": 400, "drifted_columns": ["brightness"], "other": 1})
    (got,) = mod.drift_events({"triggering_asset_events": {asset: [event]}})
    assert got == {"asset": "nightshift_drift_detected__m", "source_dag_id": "drift_monitor__m",
                   "source_run_id": "r1", "timestamp": "2026-12-05T12:00:00+00:00", "model_name": "m",
                   "champion_version": "3", "drifted_share": 0.75, "n_current": 400}
    assert mod.drift_events({}) == [] and mod.drift_events({"triggering_asset_events": {}}) == []


def test_dags_are_generated_in_file_order(tmp_path, monkeypatch):
    """The order the Dag file defines them in (and so the UI's and the serialiser's) is the file's."""
    import importlib.util

    f = write_models(tmp_path, """
        models:
          - {name: zeta, deploy: {port: 8610}}
          - {name: alpha, default: true}
          - {name: mid, deploy: {port: 8620}}
    """)
    monkeypatch.setenv("NIGHTSHIFT_MODELS_FILE", str(f))
    for name in CLEAR:
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location("nr_order", DAGS / "nightly_retrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ids = [k for k, v in vars(mod).items() if k.startswith("nightly_retrain") and hasattr(v, "dag_id")]
    assert ids == ["nightly_retrain__zeta", "nightly_retrain", "nightly_retrain__mid"]


def test_a_malformed_entry_is_an_import_error_naming_entry_and_field_and_the_other_dags_load(tmp_path, monkeypatch):
    f = write_models(tmp_path, """
        models:
          - {name: nightshift-digits, default: true}
          - {name: broken, deploy: {target: docker, port: 99999}}
          - {name: fine, deploy: {port: 8610}}
          - {name: typo, shedule: "0 2 * * *", deploy: {port: 8620}}
    """)
    dags, errors = parse_dags(monkeypatch, DAGS, CLEAR, NIGHTSHIFT_MODELS_FILE=str(f))
    assert {"nightly_retrain", "drift_monitor", "nightly_retrain__fine", "drift_monitor__fine"} <= set(dags)
    assert not any("broken" in d or "typo" in d for d in dags)
    (where, message), = errors.items()
    assert where.endswith("model_config_errors.py")
    assert "model 'broken', field 'deploy.port'" in message and "99999" in message
    assert "model 'typo', field 'shedule'" in message and str(f) in message


def test_a_task_process_builds_only_its_own_models_dag(monkeypatch):
    dags, errors = parse_dags(monkeypatch, DAGS, CLEAR, NIGHTSHIFT_MODELS_FILE=str(EXAMPLE),
                              _AIRFLOW_PARSING_CONTEXT_DAG_ID="nightly_retrain__digits-small",
                              _AIRFLOW_PARSING_CONTEXT_TASK_ID="train_gpu")
    assert errors == {}
    assert {d for d in dags if d.startswith(("nightly_retrain", "drift_monitor"))} == {"nightly_retrain__digits-small"}


def test_an_entry_with_a_sweep_calls_the_sweep_builder_with_its_sweep(tmp_path, monkeypatch):
    """Wiring only, with stand-ins for nightshift.sweep / nightshift.operators.sweep (another
    branch); the bundled models file needs neither."""
    import types

    from nightshift.errors import ConfigError
    from nightshift.operators import train_task

    calls = []
    core = types.ModuleType("nightshift.sweep")

    def parse_sweep(d):
        if "space" not in d:
            raise ConfigError("sweep.space is missing")
        return d

    core.parse_sweep = parse_sweep
    ops = types.ModuleType("nightshift.operators.sweep")

    def sweep_train(placement, *, sweep, task_id="train_gpu", **common):
        calls.append((sweep, task_id, sorted(common)))
        return train_task(placement, task_id=task_id, **common)

    ops.sweep_train = sweep_train
    monkeypatch.setitem(sys.modules, "nightshift.sweep", core)
    monkeypatch.setitem(sys.modules, "nightshift.operators.sweep", ops)
    f = write_models(tmp_path, """
        models:
          - {name: nightshift-digits, default: true}
          - {name: swept, deploy: {port: 8610}, sweep: {method: grid, space: {lr: [0.5, 1.0]}}}
          - {name: badsweep, deploy: {port: 8620}, sweep: {method: grid}}
    """)
    dags, errors = parse_dags(monkeypatch, DAGS, CLEAR, NIGHTSHIFT_MODELS_FILE=str(f))
    assert "nightly_retrain__swept" in dags and "nightly_retrain__badsweep" not in dags
    assert calls == [({"method": "grid", "space": {"lr": [0.5, 1.0]}}, "train_gpu",
                      ["hparams", "model_name", "pool", "require_gpu", "snapshot"])]
    assert "model 'badsweep', field 'sweep'" in next(iter(errors.values()))


def test_the_bundled_models_file_needs_no_sweep_module():
    code = ("import sys, importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('d', {str(DAGS / 'nightly_retrain.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print('nightshift.sweep' in sys.modules, 'nightshift.operators.sweep' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}:{os.environ.get('PYTHONPATH', '')}"}
    env.pop("NIGHTSHIFT_MODELS_FILE", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"


@pytest.mark.parametrize("dag_file", ["nightly_retrain.py", "drift_monitor.py", "model_config_errors.py"])
def test_parsing_twenty_models_imports_no_heavy_library_and_opens_only_the_models_file(dag_file, tmp_path):
    f = write_models(tmp_path, many_models(20))
    code = (
        "import builtins, importlib.util, io, json, sys\n"
        "opened = []\n"
        "real_open = io.open\n"
        "def spy(file, *a, **k):\n"
        "    opened.append(str(file)); return real_open(file, *a, **k)\n"
        f"import airflow.sdk, nightshift.operators\n"  # the libraries' own files are not the Dag's I/O
        "builtins.open = io.open = spy\n"
        f"spec = importlib.util.spec_from_file_location('d', {str(DAGS / dag_file)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "dags = [k for k, v in vars(m).items() if isinstance(v, airflow.sdk.DAG)]\n"
        f"print(json.dumps({{'dags': dags, 'opened': opened, 'heavy': [h for h in {HEAVY!r} if h in sys.modules]}}))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}:{os.environ.get('PYTHONPATH', '')}",
           "NIGHTSHIFT_MODELS_FILE": str(f)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"{dag_file} imports {result['heavy']} at parse time"
    assert [p for p in result["opened"] if not p.endswith(".py") and not p.isdigit()] in ([], [str(f)]), result["opened"]
    if dag_file != "model_config_errors.py":
        assert len(result["dags"]) == 20


def test_a_dag_with_a_deadline_runs_under_dag_test(tmp_path, monkeypatch):
    """``airflow dags test nightly_retrain`` (make run) and the dag.test() integration tests run
    Dags that carry a deadline: Airflow 3.3.2's dag.test() fails at the end of such a successful
    run; DeadlineDAG runs the test without it and keeps it on the Dag."""
    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / "deadline_probe.py").write_text(textwrap.dedent("""
        from datetime import datetime

        from airflow.sdk import task

        from nightshift.operators.deadline import DeadlineDAG, nightly_deadline

        with DeadlineDAG(dag_id="nightshift_deadline_probe", schedule=None, start_date=datetime(2026, 1, 1),
                         deadline=nightly_deadline("m", 3600)) as probe:
            @task
            def hello() -> int:
                return 1

            hello()
    """))
    from airflow import settings

    # dag.test() serialises the Dag from the dags-folder bundle, whose path is settings.DAGS_FOLDER
    # (read once, when airflow.settings was imported): point both at the probe's folder
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(folder))
    monkeypatch.setattr(settings, "DAGS_FOLDER", str(folder))
    dags, errors = parse_dags(monkeypatch, folder, CLEAR)
    assert errors == {}
    d = dags["nightshift_deadline_probe"]
    dr = d.test()
    assert str(dr.state) == "success"
    assert d.deadline and d.deadline[0].interval == timedelta(hours=1)  # the Dag keeps its deadline

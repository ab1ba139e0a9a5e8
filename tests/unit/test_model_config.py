"""nightshift.model_config: the models file, entry by entry; a malformed entry names itself and its field."""

from __future__ import annotations

import textwrap

import pytest

from nightshift import model_config as mc

ROOT = mc.models_file().parents[1]


def parse(text: str, path: str = "/cfg/models.yaml") -> mc.ModelsConfig:
    return mc.parse_models(textwrap.dedent(text), path)


def test_bundled_file_has_the_digits_as_default_with_todays_dag_ids():
    cfg = mc.load_models(ROOT / "include" / "models.yaml")
    assert cfg.errors == ()
    d = cfg.default
    assert d is not None and d.name == "nightshift-digits" and d.source == "bundled"
    assert (d.retrain_dag_id, d.monitor_dag_id) == ("nightly_retrain", "drift_monitor")
    assert (d.deploy_target, d.deploy_port, d.schedule, d.deadline_s) == ("docker", 8600, "0 2 * * *", 4 * 3600)
    assert d.recipe == mc.DEFAULT_RECIPE and d.gates_file is None and d.sweep is None


def test_example_file_has_two_models_in_file_order():
    cfg = mc.load_models(ROOT / "include" / "models.example.yaml")
    assert cfg.errors == ()
    assert [m.retrain_dag_id for m in cfg.models] == ["nightly_retrain", "nightly_retrain__digits-small"]
    small = cfg.get("digits-small")
    assert small.deploy_port == 8610 and small.deadline_s == 7200 and small.recipe["epochs"] == 4
    assert small.drift["min_rows"] == 50 and small.drift["schedule"] == "@hourly"  # defaults filled in


def test_defaults_apply_under_every_entry_and_entries_override_them():
    cfg = parse("""
        defaults: {deadline: 30m, schedule: "0 4 * * *"}
        models:
          - {name: a}
          - {name: b, deadline: 1h30m, deploy: {port: 8610}}
    """)
    a, b = cfg.models
    assert (a.deadline_s, a.schedule, b.deadline_s, b.schedule) == (1800, "0 4 * * *", 5400, "0 4 * * *")
    assert a.default and not b.default and cfg.default is a  # no entry marked: the first one


def test_the_entry_marked_default_keeps_the_plain_dag_ids():
    cfg = parse("""
        models:
          - {name: a, deploy: {port: 8610}}
          - {name: b, default: true}
    """)
    assert [m.retrain_dag_id for m in cfg.models] == ["nightly_retrain__a", "nightly_retrain"]
    assert cfg.default.name == "b"


@pytest.mark.parametrize("entry, field, words", [
    ("{name: 'bad name'}", "name", "registered model name"),
    ("{source: bundled}", "name", "got None"),
    ("{name: m, image_shape: [8, 8]}", "image_shape", "[height, width, channels]"),
    ("{name: m, classes: [a, a]}", "classes", "duplicates"),
    ("{name: m, schedule: 'every night'}", "schedule", "5 fields"),
    ("{name: m, schedule: '@fortnightly'}", "schedule", "unknown cron alias"),
    ("{name: m, schedule: '99 2 * * *'}", "schedule", "minute 99 is out of range 0-59"),
    ("{name: m, drift: {schedule: '0 2 32 * *'}}", "drift.schedule", "day 32 is out of range 1-31"),
    ("{name: m, recipe: {model: vgg}}", "recipe.model", "one of auto"),
    ("{name: m, recipe: {epoch: 3}}", "recipe.epoch", "unknown recipe field"),
    ("{name: m, recipe: {batch_size: 1}}", "recipe.batch_size", ">= 2"),
    ("{name: m, deploy: {target: ecs}}", "deploy.target", "one of docker"),
    ("{name: m, deploy: {port: 70000}}", "deploy.port", "port number"),
    ("{name: m, deadline: soon}", "deadline", "duration"),
    ("{name: m, deadline: 0}", "deadline", "longer than 0"),
    ("{name: m, drift: {min_rows: 0}}", "drift.min_rows", ">= 1"),
    ("{name: m, shedule: '0 2 * * *'}", "shedule", "unknown field"),
    ("{name: m, require_approval: 'yes'}", "require_approval", "true or false"),
    ("{name: m, sweep: [1, 2]}", "sweep", "must be a mapping"),
])
def test_a_malformed_entry_is_an_error_naming_entry_and_field_and_the_others_load(entry, field, words):
    cfg = parse(f"""
        models:
          - {{name: good, default: true}}
          - {entry}
          - {{name: also-good, deploy: {{port: 8700}}}}
    """)
    assert [m.name for m in cfg.models] == ["good", "also-good"]
    (err,) = cfg.errors
    assert err.field == field and words in err.message, str(err)
    assert err.entry in ("m", "bad name", "#2")
    assert f"field {field!r}" in str(err) and "/cfg/models.yaml" in str(err)
    assert f"- {err}" in cfg.error_report()


def test_names_and_docker_ports_are_one_per_model():
    cfg = parse("""
        models:
          - {name: a}
          - {name: a, deploy: {port: 8610}}
          - {name: b}
          - {name: c, deploy: {target: none}}
    """)
    assert [m.name for m in cfg.models] == ["a", "c"]  # c serves nothing: port 8600 is not taken by it
    assert [(e.entry, e.field) for e in cfg.errors] == [("a", "name"), ("b", "deploy.port")]
    assert "already serves 'a'" in cfg.errors[1].message
    adjacent = parse("""
        models:
          - {name: a, deploy: {port: 8600}}
          - {name: b, deploy: {port: 8601}}
          - {name: c, deploy: {port: 8599}}
          - {name: d, deploy: {port: 8602}}
    """)
    assert [m.name for m in adjacent.models] == ["a", "d"]  # a's gRPC port is 8601; c's would be 8600
    assert [(e.entry, e.field) for e in adjacent.errors] == [("b", "deploy.port"), ("c", "deploy.port")]
    assert "port 8601 already serves 'a'" in adjacent.errors[0].message
    assert "port 8600 (this entry's gRPC port, port + 1) already serves 'a'" in adjacent.errors[1].message


def test_a_malformed_default_entry_leaves_no_default_rather_than_promoting_another_model():
    cfg = parse("""
        models:
          - {name: a, deploy: {port: 8610}}
          - {name: b, default: true, deadline: never}
    """)
    assert [m.name for m in cfg.models] == ["a"] and cfg.default is None
    assert cfg.models[0].retrain_dag_id == "nightly_retrain__a"


@pytest.mark.parametrize("text, words", [
    ("models: [", "not valid YAML"),
    ("models: []", "non-empty list"),
    ("- {name: a}", "non-empty list"),
])
def test_a_malformed_file_is_one_error_about_the_file(text, words):
    cfg = parse(text)
    assert cfg.models == () and len(cfg.errors) == 1
    assert cfg.errors[0].entry is None and words in str(cfg.errors[0])


def test_a_missing_file_is_an_error_naming_it_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(mc.ENV_VAR, str(tmp_path / "nope.yaml"))
    cfg = mc.load_models()
    assert cfg.models == () and "nope.yaml" in str(cfg.errors[0]) and mc.ENV_VAR in str(cfg.errors[0])


def test_the_gate_file_is_relative_to_the_models_file(tmp_path):
    cfg = parse("""
        models:
          - {name: a, gates: gates-a.yaml}
          - {name: b, gates: /etc/nightshift/gates.yaml, deploy: {port: 8610}}
    """, path=str(tmp_path / "models.yaml"))
    assert [m.gates_file for m in cfg.models] == [str(tmp_path / "gates-a.yaml"), "/etc/nightshift/gates.yaml"]


def test_load_is_cached_by_mtime_and_reread_when_the_file_changes(tmp_path):
    import os

    f = tmp_path / "models.yaml"
    f.write_text("models: [{name: a}]\n")
    first = mc.load_models(f)
    assert mc.load_models(f) is first
    f.write_text("models: [{name: a}, {name: b, deploy: {port: 8610}}]\n")
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert [m.name for m in mc.load_models(f).models] == ["a", "b"]


def test_for_dag_builds_only_the_dag_a_task_process_asks_for():
    cfg = parse("""
        models:
          - {name: a}
          - {name: b, deploy: {port: 8610}}
    """)
    assert [m.name for m in cfg.for_dag(mc.RETRAIN_DAG)] == ["a", "b"]
    assert [m.name for m in cfg.for_dag(mc.RETRAIN_DAG, "nightly_retrain__b")] == ["b"]
    assert [m.name for m in cfg.for_dag(mc.RETRAIN_DAG, "nightly_retrain")] == ["a"]
    assert cfg.for_dag(mc.RETRAIN_DAG, "drift_monitor__b") == []


def test_sweep_is_validated_by_the_sweep_module(monkeypatch):
    import sys
    import types

    from nightshift.errors import ConfigError

    fake = types.ModuleType("nightshift.sweep")

    def parse_sweep(d):
        if "space" not in d:
            raise ConfigError("sweep.space: missing (the hyperparameters to search)")
        return d

    fake.parse_sweep = parse_sweep
    monkeypatch.setitem(sys.modules, "nightshift.sweep", fake)
    cfg = parse("""
        models:
          - {name: a, sweep: {method: grid, space: {lr: [0.5, 1.0]}}}
          - {name: b, sweep: {method: grid}, deploy: {port: 8610}}
    """)
    assert [m.name for m in cfg.models] == ["a"] and cfg.models[0].sweep == {"method": "grid", "space": {"lr": [0.5, 1.0]}}
    assert cfg.errors[0].entry == "b" and cfg.errors[0].field == "sweep" and "sweep.space" in cfg.errors[0].message


def test_a_null_schedule_means_no_timed_runs_and_a_blank_one_is_refused():
    """``schedule: null`` (drift Asset only) and ``drift.schedule: null`` (triggered only) are said on
    purpose; an empty string is a mistake, refused naming both accepted forms."""
    cfg = parse("""
        defaults: {schedule: "0 4 * * *"}
        models:
          - {name: a, schedule: null, drift: {schedule: null}}
          - {name: b, deploy: {port: 8610}}
          - {name: c, schedule: "", deploy: {port: 8620}}
          - {name: d, drift: {schedule: ""}, deploy: {port: 8630}}
    """)
    a, b = cfg.models
    assert (a.schedule, a.drift["schedule"]) == (None, None)
    assert (b.schedule, b.drift["schedule"]) == ("0 4 * * *", "@hourly")  # an entry's null overrides, no leak
    assert a.as_dict()["schedule"] is None
    assert [(e.entry, e.field) for e in cfg.errors] == [("c", "schedule"), ("d", "drift.schedule")]
    assert "cron expression" in cfg.errors[0].message and "or null for no timed runs" in cfg.errors[0].message
    assert "drift Asset" in cfg.errors[0].message and "only when triggered" in cfg.errors[1].message


def test_valid_crons_pass():
    for expr in ("0 2 * * *", "*/15 * * * *", "30 3 1-15 1,6 MON-FRI", "0 0 * * 7", "@hourly", "5 4 L * ?"):
        assert mc.cron_problem(expr) is None, expr


@pytest.mark.parametrize("text, seconds", [("4h", 14400), ("90m", 5400), ("1h30m", 5400), ("45s", 45),
                                           ("1d", 86400), (2, 2), (0.5, 0.5)])
def test_durations(text, seconds):
    assert mc.parse_duration(text) == seconds


def test_format_duration():
    assert [mc.format_duration(s) for s in (14400, 5400, 2.5, 86460)] == ["4h", "1h30m", "2.5s", "1d1m"]


def test_the_core_module_imports_no_airflow_and_nothing_heavy():
    import json
    import os
    import subprocess
    import sys

    code = ("import json, sys\nfrom nightshift import model_config\nmodel_config.load_models()\n"
            "print(json.dumps(sorted(m for m in ('airflow', 'torch', 'mlflow', 'pandas', 'numpy') if m in sys.modules)))")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}:{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []

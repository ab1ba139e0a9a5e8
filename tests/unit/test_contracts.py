"""The names every writer and reader shares (nightshift.contracts): tags, report files, where the
shared state lives, and the idempotency keys of the history and the deadline misses."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from nightshift import contracts
from nightshift.contracts import DeadlineMiss, HistoryEvent


def test_tags_carry_the_prefix():
    assert contracts.tag(contracts.VersionTag.DECISION) == f"nightshift.{contracts.VersionTag.DECISION}"


def test_every_run_report_is_under_its_tasks_folder_with_the_shared_file_name():
    names = {contracts.VALIDATION_FILE, contracts.PARITY_FILE, contracts.QUANTIZATION_FILE, contracts.SYSTEM_EVAL_FILE,
             contracts.DRIFT_HTML_FILE, contracts.DRIFT_JSON_FILE, contracts.PROMOTION_FILE,
             contracts.TRAIN_MANIFEST_FILE}
    assert {Path(rel).name for rel in contracts.RUN_REPORTS.values()} == names
    assert len(set(contracts.RUN_REPORTS.values())) == len(contracts.RUN_REPORTS)  # no two reports share a file


def test_local_paths_are_the_relative_names_under_the_root(tmp_path):
    for rel, path in [(contracts.history_rel("m"), contracts.history_path(tmp_path, "m")),
                      (contracts.retrain_started_rel("d"), contracts.retrain_started_path(tmp_path, "d")),
                      (contracts.deployment_rel("m"), contracts.deployment_path(tmp_path, "m")),
                      (contracts.drift_timeline_rel("m"), contracts.drift_timeline_path(tmp_path, "m"))]:
        assert path == tmp_path / rel and not Path(rel).is_absolute()
    assert contracts.history_rel("a") != contracts.history_rel("b")  # one history per model


def test_a_history_event_of_a_run_gets_an_idempotency_key_and_one_without_a_run_none():
    of_run = HistoryEvent(model="m", action="promoted", version="3", previous_champion="2", champion="3",
                          reason="gates passed", dag_id="nightly_retrain", run_id="scheduled__1")
    assert of_run.key == "nightly_retrain/scheduled__1/m/v3/promoted"
    assert of_run.key == contracts.history_key("m", "3", "promoted", run_id="scheduled__1", dag_id="nightly_retrain")
    runless = HistoryEvent(model="m", action="forced", version="3", previous_champion=None, champion="3", reason="x")
    assert runless.key is None
    assert contracts.history_key("m", None, "rolled_back", run_id="r") == "-/r/m/vNone/rolled_back"


def test_a_deadline_miss_is_keyed_by_its_run():
    miss = DeadlineMiss(model="m", dag_id="nightly_retrain", run_id="r1", deadline_time=None, queued_at=None,
                        interval_s=60)
    assert miss.key == "nightly_retrain/r1"


def test_the_deadline_miss_line_names_the_deadline_and_the_interval():
    at = datetime(2026, 12, 5, 6, 0, 0, 123, tzinfo=timezone.utc)
    queued = datetime(2026, 12, 5, 2, 0, tzinfo=timezone.utc)
    text = contracts.deadline_miss_text(at, 4 * 3600, queued)
    assert text.startswith("DEADLINE MISSED: not done by 2026-12-05T06:00:00+00:00 (")
    assert "after it was queued at 2026-12-05T02:00:00+00:00)" in text
    assert "queued at" not in contracts.deadline_miss_text("soon", 60)

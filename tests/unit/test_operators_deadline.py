"""The nightly run's deadline: the alert each model's Dag carries, the callback that records a
miss (once per run), and the run note's deadline lines."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from nightshift import contracts, state
from nightshift.operators.deadline import nightly_deadline, record_deadline_miss
from nightshift.run_notes import MARK, with_deadlines

QUEUED = datetime(2026, 12, 5, 2, 0, 5, tzinfo=timezone.utc)


def _context(run_id="scheduled__2026-12-05T02:00:00+00:00", state="running"):
    # the shape Deadline.handle_miss gives the callback (DAGRunResponse dumped as JSON)
    return {"dag_run": {"dag_id": "nightly_retrain__m", "dag_run_id": run_id, "queued_at": QUEUED.isoformat(),
                        "state": state},
            "deadline": {"id": "0192", "deadline_time": QUEUED + timedelta(hours=4)}}


def test_the_alert_is_queued_at_plus_the_interval_and_calls_the_recorder():
    alert = nightly_deadline("m", 5400)
    assert type(alert.reference).__name__ == "DagRunQueuedAtDeadline" and alert.interval == timedelta(minutes=90)
    assert alert.callback.path == "nightshift.operators.deadline.record_deadline_miss"
    assert alert.callback.kwargs == {"model_name": "m", "interval_s": 5400}


def test_the_callback_records_the_miss_once_per_run(tmp_path, monkeypatch):
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", str(tmp_path))
    assert record_deadline_miss(_context(), model_name="m", interval_s=14400) is True
    assert record_deadline_miss(_context(state="failed"), model_name="m", interval_s=14400) is False  # again
    assert record_deadline_miss(_context("manual__2"), model_name="m", interval_s=14400) is True
    misses = state.read_deadline_misses(tmp_path, "m")
    assert [m["run_id"] for m in misses] == ["scheduled__2026-12-05T02:00:00+00:00", "manual__2"]
    first = misses[0]
    assert first["deadline_time"] == "2026-12-05T06:00:05+00:00" and first["queued_at"] == QUEUED.isoformat()
    assert first["run_state"] == "running" and first["interval_s"] == 14400 and first["dag_id"] == "nightly_retrain__m"
    assert state.read_deadline_misses(tmp_path, "other") == []


def test_the_run_note_carries_the_miss_under_its_first_line():
    line = contracts.deadline_miss_text(QUEUED + timedelta(hours=4), 14400, QUEUED)
    assert line == ("DEADLINE MISSED: not done by 2026-12-05T06:00:05+00:00 (4h after it was queued at "
                    "2026-12-05T02:00:05+00:00)")
    note = with_deadlines(f"{MARK}PROMOTED m v2 to champion (was v1)\n\nall gates passed", [line])
    assert note.splitlines()[:2] == [f"{MARK}PROMOTED m v2 to champion (was v1)", line]
    assert with_deadlines(None, [line]) == MARK + line  # a run with no decision: a note of its miss
    assert with_deadlines("unchanged", []) == "unchanged" and with_deadlines(None, []) is None


def test_a_stored_deadline_interval_reads_as_seconds_in_every_encoding():
    from nightshift.operators.deadline import interval_seconds

    assert interval_seconds({"__data__": 14400.0, "__classname__": "datetime.timedelta"}) == 14400.0
    assert interval_seconds(timedelta(hours=1)) == 3600.0 and interval_seconds(5) == 5.0


def test_the_clear_fix_replaces_airflows_helper_once():
    from airflow.models import taskinstance as ti_module

    from nightshift.operators.deadline import fix_clearing_runs_with_a_deadline

    original = ti_module._recalculate_dagrun_queued_at_deadlines
    try:
        installed = fix_clearing_runs_with_a_deadline()
        fixed = ti_module._recalculate_dagrun_queued_at_deadlines
        assert fixed.nightshift_fixed and (installed or getattr(original, "nightshift_fixed", False))
        assert fix_clearing_runs_with_a_deadline() is False and ti_module._recalculate_dagrun_queued_at_deadlines is fixed
    finally:
        ti_module._recalculate_dagrun_queued_at_deadlines = original

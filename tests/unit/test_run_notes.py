"""The run note (run_notes.run_note): what a person reads on the DAG run in the Airflow UI."""

from __future__ import annotations

from nightshift.artifacts import atomic_write_json, run_dir
from nightshift.run_notes import run_note


def _note(tmp_path, promotion: dict) -> str:
    atomic_write_json(run_dir(tmp_path, "nightly_retrain", "manual__1") / "promotion.json", promotion)
    return run_note(tmp_path, "nightly_retrain", "manual__1") or ""


def test_note_says_the_data_changed_and_how_much_evidence_decided(tmp_path):
    note = _note(tmp_path, {
        "model_name": "m", "version": "3", "promoted": False, "awaiting_approval": True,
        "previous_champion": "2", "champion": "2", "reason": "every gate passed",
        "data_changed": ["source: /data/a -> /data/b"],
        "evidence": {"test_images": 240, "min_test_images": 200,
                     "accuracies": {"offline_accuracy": {"value": 0.95, "n": 240, "ci95": [0.915, 0.971]}},
                     "paired": {"champion_only_correct": 3, "candidate_only_correct": 5, "mcnemar_p": 0.7265}},
    })
    assert "BLESSED m v3: waiting for approval" in note
    assert "Approval needed: this run's data differs from the champion's:" in note
    assert "- source: /data/a -> /data/b" in note
    assert "Evidence: 240 test images (min 200)" in note
    assert "offline_accuracy 0.9500 (95% CI 0.915-0.971)" in note
    assert "3 images only the champion got right, 5 only the candidate, McNemar p=0.727" in note


def test_failed_gates_come_before_the_evidence_line_so_the_cut_keeps_them(tmp_path):
    note = _note(tmp_path, {
        "model_name": "m", "version": "4", "promoted": False, "champion": "2", "reason": "gates failed",
        "gates": [{"name": "offline_accuracy", "passed": False, "detail": "not enough evidence: 5 < 200"}],
        "evidence": {"test_images": 5, "min_test_images": 200, "accuracies": {}},
    })
    assert note.index("- offline_accuracy: not enough evidence") < note.index("Evidence: 5 test images")


def test_note_says_why_a_wait_ended_without_moving_champion(tmp_path):
    for approval in ("superseded", "stale", "undeployable"):
        note = _note(tmp_path, {"model_name": "m", "version": "4", "promoted": False, "champion": "2",
                                "reason": "every gate passed", "approval": approval,
                                "note": f"the wait ended: {approval}"})
        assert f"the wait ended: {approval}" in note
    bare = _note(tmp_path, {"model_name": "m", "version": "4", "promoted": False, "champion": "2",
                            "reason": "every gate passed", "approval": "stale"})
    assert not bare.endswith("\n")  # no empty note line when the outcome carries no note


def test_note_of_a_run_whose_report_a_worker_published_to_s3(s3_server, s3_root, tmp_path):
    """The scheduler shares no folder with the worker that decided: the note comes from the store."""
    from nightshift.store import open_store

    worker = open_store(s3_root, cache_dir=tmp_path / "worker", s3=s3_server.options())
    scheduler = open_store(s3_root, cache_dir=tmp_path / "scheduler", s3=s3_server.options())
    assert run_note(scheduler, "nightly_retrain", "manual__1") is None  # nothing decided yet
    worker.publish(atomic_write_json(run_dir(worker.local_root, "nightly_retrain", "manual__1") / "promotion.json",
                                     {"model_name": "m", "version": "4", "promoted": True, "previous_champion": "3",
                                      "reason": "every gate passed"}))
    note = run_note(scheduler, "nightly_retrain", "manual__1")
    assert note.startswith("[nightshift] PROMOTED m v4 to champion (was v3)") and "every gate passed" in note


def test_an_unreadable_report_gives_no_note(tmp_path):
    (run_dir(tmp_path, "nightly_retrain", "manual__1") / "promotion.json").write_text("{torn")
    assert run_note(tmp_path, "nightly_retrain", "manual__1") is None

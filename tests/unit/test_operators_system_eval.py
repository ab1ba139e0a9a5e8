"""SystemEvalOperator (nightshift.operators.system_eval): the container it keeps is stopped when the
task is killed."""

from __future__ import annotations

from types import SimpleNamespace


def test_operator_on_kill_stops_the_kept_container():
    from nightshift.operators.system_eval import SystemEvalOperator

    op = SystemEvalOperator(task_id="system_eval", image={"image": "x"}, snapshot={"snapshot_uri": "y"})
    assert "mem_limit" not in op.template_fields  # the memory limit is deploy's, not a knob of its own
    op.on_kill()  # nothing started yet: a no-op
    stopped = []
    op._keep_container(SimpleNamespace(stop=lambda: stopped.append(True)))
    op.on_kill()
    assert stopped == [True]

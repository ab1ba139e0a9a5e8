"""
### rollback_model — put the previous champion back

Trigger with the model, a target version (or `previous`: the champion before
the current one, from the promotion history) and a **required reason**. The
move is recorded on the version (`nightshift.rolled_back_by`, `_reason`, `_at`,
`_from`) and in the promotion history; the restored champion is redeployed.

A rollback always moves: a target equal to the current champion is refused, and
`previous` skips history events that set champion to itself, so a second rollback
goes further back and never restores the version rolled back from. Under the
model's champion lock (the one every writer of champion and the serving port
takes), `set_champion` checks the target can be deployed (its image is still in
the Docker daemon), serves it, then moves the alias with a compare-and-set; if
anything fails before that, nothing moved. `deploy` then reconciles (a no-op when
the port already serves the champion; the manifests for `kubernetes`).
"""

from __future__ import annotations

from airflow.sdk import Param

from nightshift.dags.champion import champion_dag

rollback_model = champion_dag(
    dag_id="rollback_model",
    description="Manual: move champion back to the previous (or a chosen) version with a recorded reason",
    doc_md=__doc__,
    action="rolled_back",
    version_param="target",
    version=Param("previous", type="string", pattern=r"^(previous|v?[0-9]+)$", title="Roll back to",
                  description="'previous' (the champion before the current one) or a version number"),
    reason_description="What went wrong with the current champion",
)

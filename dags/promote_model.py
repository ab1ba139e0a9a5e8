"""
### promote_model — make a chosen model version the champion, by hand

For the cases the gates cannot judge (a new class, a changed metric, an
emergency). Trigger it with the model, the version and a **required reason**;
the move is recorded on the version (`nightshift.forced_by`, `_reason`, `_at`,
`_from`) and in the promotion history the Nightshift view shows. The new
champion is then deployed.

Under the model's champion lock (the one every writer of champion and the
serving port takes), `set_champion` checks the version can be deployed (ONNX
digest and image recorded, the image still in the Docker daemon), serves it,
then moves the alias with a compare-and-set; a version that cannot be served
moves nothing. Forcing today's champion redeploys it; `rollback_model`'s
`previous` skips such a self-move.
"""

from __future__ import annotations

from airflow.sdk import Param

from nightshift.dags.champion import champion_dag

promote_model = champion_dag(
    dag_id="promote_model",
    description="Manual: force a model version to champion with a recorded reason, then deploy it",
    doc_md=__doc__,
    action="forced",
    version_param="version",
    version=Param("", type="string", pattern=r"^v?[0-9]+$", title="Version to make champion",
                  description="A registered version number, e.g. 7"),
    reason_description="Why this version becomes champion without passing the gates",
)

"""
### drift_monitor — watch the champion's served traffic and ask for a retrain on drift

One Dag per model of `include/models.yaml`: `drift_monitor` for the default model,
`drift_monitor__<model>` for every other entry, each emitting its own model's drift Asset, so one
model's drift retrains only that model (README, "Several models").

Every hour (the entry's `drift.schedule`; null: only when triggered), for the hour that just ended (the
run's data interval):

1. **check_served_drift** — reads the sampled request log the serving container
   writes (`$NIGHTSHIFT_ARTIFACT_ROOT/request_logs/<model>/`), keeps the champion's
   requests, and compares them with the champion's reference (its own test split
   and its predictions on it) using Evidently: image brightness, contrast and
   channel means, prediction confidence, the predicted-class mix, and embedding
   drift. A window with fewer than `min_rows` requests is *not enough data*,
   never an alarm. Skipped while there is no champion.
2. **drift_detected** — short-circuits the rest when there is no drift.
3. **request_retrain** — emits the model's drift Asset (`nightshift_drift_detected` for the
   default model, `nightshift_drift_detected__<model>` otherwise) with the drift figures as event
   metadata; the model's `nightly_retrain` Dag runs on it (with a cooldown).

The report and a line in the drift timeline (shown in the Nightshift view) are
written every hour.

**Where it runs.** The request log is a folder on the Docker host that serves the
champion (the serving container's mount), not in the artifact store: the container
appends to it continuously. So `check_served_drift` runs on the Docker queue
(`NIGHTSHIFT_DOCKER_QUEUE`, like `deploy`), where the log is written, and publishes
what it read (`request_window.parquet`), its reports and the timeline point to the
artifact store, where every worker and the Nightshift view read them.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_parsing_context, task

from nightshift.model_config import MONITOR_DAG, ModelEntry, load_models
from nightshift.operators import DriftMonitorOperator
from nightshift.operators.assets import drift_asset
from nightshift.placement import DockerPlacement

#: check_served_drift reads the serving container's request log: on the queue of the worker next to
#: the Docker daemon that serves (NIGHTSHIFT_DOCKER_QUEUE; unset: Airflow's default queue).
DOCKER = DockerPlacement.from_env().operator_kwargs()

default_args = {"owner": "ml-platform", "retries": 2, "retry_delay": timedelta(minutes=2)}


def build(m: ModelEntry):
    """The drift_monitor Dag of one model."""
    asset = drift_asset(None if m.default else m.name)
    d = m.drift

    @dag(
        dag_id=m.monitor_dag_id,
        description="Hourly: drift of the champion's served traffic vs its reference; on drift, request a retrain"
                    + ("" if m.default else f" (model {m.name})"),
        schedule=d["schedule"],
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        default_args=default_args,
        tags=["nightshift", "mlops", "monitoring", *(() if m.default else (f"model:{m.name}",)), *m.tags],
        doc_md=f"{__doc__}\n\n#### This Dag: model `{m.name}`\n\nOn drift it emits `{asset.name}`, which "
               f"schedules `{m.retrain_dag_id}`.",
        render_template_as_native_obj=True,
        params={
            "model_name": Param(m.name, type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                                title="Registered model", description="Whose champion's traffic to watch"),
            "min_rows": Param(d["min_rows"], type="integer", minimum=1, title="Minimum requests per window",
                              description="Fewer sampled requests than this in the window: not enough data, "
                                          "no verdict"),
            "drift_share_threshold": Param(d["drift_share_threshold"], type="number", exclusiveMinimum=0, maximum=1,
                                           title="Drifted share that counts as drift",
                                           description="Share of the monitored features whose distribution drifted"),
            "embedding_threshold": Param(d["embedding_threshold"], type="number", minimum=0.5, maximum=1,
                                         title="Embedding drift threshold",
                                         description="ROC AUC of a classifier telling reference from current "
                                                     "embeddings"),
            "window_start": Param(None, type=["null", "string"], title="Window start (ISO time)",
                                  description="Empty: the run's data interval start"),
            "window_end": Param(None, type=["null", "string"], title="Window end (ISO time)",
                                description="Empty: the run's data interval end"),
        },
    )
    def drift_monitor():
        check = DriftMonitorOperator(
            task_id="check_served_drift", model_name="{{ params.model_name }}", min_rows="{{ params.min_rows }}",
            drift_share_threshold="{{ params.drift_share_threshold }}",
            embedding_threshold="{{ params.embedding_threshold }}", window_start="{{ params.window_start }}",
            window_end="{{ params.window_end }}", **DOCKER,
        )

        @task.short_circuit(ignore_downstream_trigger_rules=True)
        def drift_detected(result: dict) -> bool:
            return bool(result and result.get("drift_detected"))

        @task(outlets=[asset])
        def request_retrain(result: dict, *, outlet_events=None) -> dict:
            figures = {k: result.get(k) for k in ("model_name", "champion_version", "window_start", "window_end",
                                                  "drifted_share", "drifted_columns", "embedding_drift_score",
                                                  "n_current", "report_html")}
            outlet_events[asset].extra = figures
            return figures

        result = check.output
        drift_detected(result) >> request_retrain(result)

    return drift_monitor()


# One Dag per well-formed entry, in file order; a task process builds only its own Dag.
for _model in load_models().for_dag(MONITOR_DAG, get_parsing_context().dag_id):
    globals()[_model.monitor_dag_id] = build(_model)

"""
### nightly_retrain — retrain, evaluate and (maybe) promote the image classifier

One Dag per model of `include/models.yaml` (`$NIGHTSHIFT_MODELS_FILE`): `nightly_retrain` for the
default model (the bundled digits, `nightshift-digits`), `nightly_retrain__<model>` for every other
entry, each with its Params' defaults, schedule, drift Asset and deadline from its entry (README,
"Several models"). A malformed entry is an import error of `model_config_errors.py`; the other
models' Dags load.

Every night at 02:00 UTC (the entry's `schedule`; none when it is null), whenever the model's drift Asset
(`nightshift_drift_detected` for the default model, `nightshift_drift_detected__<model>` otherwise) is
updated (drift in served traffic), or on demand with the **Trigger** button of this Dag in the Airflow UI (a form built
from the Params below; every Param has a default):

1. **collect_data** — read the source (`bundled` digits, an ImageFolder path or
   object-storage URI, or `torchvision:<Dataset>`) into a content-addressed
   snapshot with a per-image profile; emits the `nightshift_snapshot` Asset.
2. **validate_data** — Great Expectations over the profile and manifest; fails
   with the list of failed expectations (report in the run's artifact folder).
3. **train_gpu** — PyTorch on CUDA when present (CPU otherwise); MLflow run with
   the snapshot as dataset input, training curves and confusion matrix. Runs on
   this worker, a Celery GPU queue, a KubernetesExecutor GPU pod or a pod of its
   own, as `NIGHTSHIFT_TRAIN_PLACEMENT` says (README, "Running training on GPUs").
4. **export_onnx** — uint8 pixels in; logits, probabilities and embedding out; parity
   with PyTorch (also at batch 1 and 64); optional int8 quantization.
5. **build_inference_image** — ONNX Runtime server image with the model inside.
6. **system_eval** — runs that image on loopback and sends the test split
   through the Open Inference Protocol: accuracy, p50/p95/p99 latency, errors.
7. **drift_check** — Evidently: new data vs the champion's training data.
8. **promote** — MLflow alias `champion` moves only if every gate passes.
   Unset thresholds mean no promotion. The decision is recorded on the model version.
9. **approve_promotion** — only with `require_approval` (or a run that loosened the
   gate file): a Human-in-the-loop request (Approve / Reject). The wait ends with the
   answer, after 7 days (failed, nothing promoted), or as soon as a newer candidate of
   the same model is registered (recorded as `superseded`, champion untouched).
10. **finalize_promotion** — records the answer (`promoted`, `approval_rejected`,
    `approval_stale` when champion moved while it waited, `superseded`); **deploy**
    makes the serving port serve the champion.

Up to three runs are active at once, so a run waiting for approval holds back neither
the next nightly run nor a drift retrain. What must not overlap is serialised on its own:
`train_gpu` (pool `nightshift_gpu`), `system_eval` (one at a time), and every move of
`champion` and of the serving port (a per-model lock).

`build_inference_image`, `system_eval`, `finalize_promotion` (its image check) and `deploy` talk
to the Docker daemon: with `NIGHTSHIFT_DOCKER_QUEUE` set they run on that queue's workers (the ones
next to the daemon), and each uses the daemon of `NIGHTSHIFT_DOCKER_CONN_ID` when that names an
Airflow connection (README, "Production").

Artifacts: `$NIGHTSHIFT_ARTIFACT_ROOT/runs/nightly_retrain/<run folder>/` (the run id, or
`<sanitised run id>~<hash>` when it is not a safe folder name). Each task's
**extra links** (task instance page) open its report (validation, parity,
system eval, drift, promotion decision) or its MLflow run / model version; the
**Nightshift** entry in the UI's *Browse* menu lists models, versions, gates,
deployments, promotion history and drift.

**Deadline.** The run must be done `deadline` (default 4 h) after it was queued (an Airflow Deadline
Alert): a miss is recorded for the model, shown in the Nightshift view, and written in the run note.

New Dags start **paused**. Unpausing this one makes the scheduler start, at
once, a run for the most recent 02:00 UTC with the default Params
(`catchup=False` creates the latest interval, not the missed ones), then one
every night.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, get_parsing_context, task

from nightshift.model_config import RETRAIN_DAG, ModelEntry, format_duration, load_models
from nightshift.operators import (
    BuildInferenceImageOperator,
    CollectDataOperator,
    DeployModelOperator,
    FinalizePromotionOperator,
    DriftCheckOperator,
    ExportONNXOperator,
    PromoteModelOperator,
    PromotionApprovalOperator,
    SystemEvalOperator,
    ValidateDataOperator,
    train_task,
)
from nightshift.operators.assets import drift_asset
from nightshift.operators.deadline import DeadlineDAG, nightly_deadline
from nightshift.placement import DockerPlacement, TrainPlacement

MODEL = "{{ params.model_name }}"
SHAPE = "{{ params.image_shape }}"
CLASSES = "{{ params.classes }}"
#: Where train_gpu runs, from NIGHTSHIFT_TRAIN_PLACEMENT & co. (environment only: no I/O at parse time).
PLACEMENT = TrainPlacement.from_env()
#: The Docker-bound tasks (build, system_eval, finalize_promotion's image check, deploy) go to the queue of the
#: worker next to the daemon, NIGHTSHIFT_DOCKER_QUEUE; unset: Airflow's default queue, like every other task.
DOCKER = DockerPlacement.from_env().operator_kwargs()

#: Runs that may be active at once: one waiting for approval (or two) plus the newest.
MAX_ACTIVE_RUNS = 3

default_args = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
}


def retrain_params(m: ModelEntry) -> dict[str, Param]:
    """The Trigger form of one model's Dag: every default is the model's entry."""
    r = m.recipe
    return {
        "require_approval": Param(m.require_approval, type="boolean", title="Require human approval",
                                  description="A candidate that passes every gate waits for Approve/Reject "
                                              "(task approve_promotion) before champion moves"),
        "deploy_target": Param(m.deploy_target, enum=["docker", "kubernetes", "none"], title="Deploy target",
                               description="docker: blue/green on this worker's Docker host behind a stable port; "
                                           "kubernetes: render Deployment/Service/InferenceService manifests; "
                                           "none: register only"),
        "deploy_port": Param(m.deploy_port, type="integer", minimum=1, maximum=65535, title="Serving port (docker)",
                             description="The stable port on 127.0.0.1 that serves the champion"),
        "retrain_cooldown_hours": Param(m.retrain_cooldown_hours, type="number", minimum=0,
                                        title="Drift-retrain cooldown (hours)",
                                        description="A run triggered by drift is skipped when the last successful "
                                                    "run started less than this long ago (0: never skip)"),
        "source": Param(m.source, type="string", title="Data source",
                        description="'bundled' (digits), an ImageFolder path or URI (s3://…), or 'torchvision:CIFAR10'"),
        "image_shape": Param(m.image_shape, type=["null", "array"], title="Image shape [H, W, C]",
                             description="Default: 8×8×1 for bundled, 32×32×3 otherwise"),
        "classes": Param(m.classes, type=["null", "array"], title="Expected class names (label order)",
                         description="Validation fails if the data's classes differ. Empty: the classes found "
                                     "in the source (ImageFolder folder names, or the dataset's own)"),
        "partition_window": Param(m.partition_window, type=["null", "integer"], minimum=1, title="Partition window",
                                  description="For <root>/<partition>/<class>/<image> sources (e.g. one folder "
                                              "per day): collect only the last N partitions. Empty: not partitioned"),
        "model_name": Param(m.name, type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                            title="Registered model name",
                            description="MLflow registered model that gets the new version and the "
                                        "'champion'/'challenger' aliases; also names the inference image"),
        "model": Param(r["model"], enum=["auto", "fast_cnn", "small_cnn", "resnet18"], title="Architecture",
                       description="auto: fast_cnn (speed-record recipe) for images of 16 px and up, small_cnn "
                                   "(trains on CPU in seconds) below; resnet18: torchvision's, wants a GPU"),
        "epochs": Param(r["epochs"], type=["null", "integer"], minimum=1, maximum=500, title="Epochs",
                        description="Full passes over the train split. Empty: by input size (10 for 16 px and up, "
                                    "12 below)"),
        "batch_size": Param(r["batch_size"], type=["null", "integer"], minimum=2, title="Batch size",
                            description="Images per step (at least 2: the models use BatchNorm); "
                                        "larger than the train split means one step per epoch. "
                                        "Empty: by input size (1024 for 16 px and up, 128 below)"),
        "lr": Param(r["lr"], type=["null", "number"], exclusiveMinimum=0, maximum=10, title="Peak learning rate",
                    description="On the batch-mean loss. Empty: by optimizer (SGD 1.5, AdamW 0.003). "
                                "A run whose loss diverges fails at once with a message saying so"),
        "require_gpu": Param(r["require_gpu"], type="boolean", title="Require a GPU",
                             description="Fail train_gpu when no CUDA device is visible, instead of training on CPU"),
        "onnx_opset": Param(r["onnx_opset"], type="integer", minimum=18, maximum=25, title="ONNX opset",
                            description="Opset version of the exported model.onnx (18..25; the PyTorch exporter "
                                        "emits at least 18; from 20 GELU is one fused node, about 10% faster "
                                        "on CPU)"),
        "quantize_int8": Param(r["quantize_int8"], type="boolean", title="Quantize to int8",
                               description="Also make a static int8 model (ONNX Runtime, QDQ per-channel, "
                                           "calibrated on the train split); it is served instead of the fp32 "
                                           "model only when its test accuracy is at most 0.01 below it "
                                           "(quantization.json says why either way)"),
        "min_accuracy": Param(None, type=["null", "number"], minimum=0, maximum=1, title="Accuracy floor",
                              description="Offline test-accuracy floor. Empty: the model's gate file. A threshold "
                                          "looser than that file makes a passing candidate wait for approval"),
        "max_p95_latency_ms": Param(None, type=["null", "number"], exclusiveMinimum=0, title="p95 latency budget (ms)",
                                    description="Served p95 latency budget. Empty: the model's gate file"),
        "max_p99_latency_ms": Param(None, type=["null", "number"], exclusiveMinimum=0, title="p99 latency budget (ms)",
                                    description="Served p99 latency budget under load. Empty: the model's gate file"),
        "min_throughput_rps": Param(None, type=["null", "number"], minimum=0, title="Throughput floor (requests/s)",
                                    description="Requests answered per second in system_eval's load phase, at least. "
                                                "Empty: the model's gate file"),
        "served_accuracy_tolerance": Param(None, type=["null", "number"], minimum=0,
                                           title="Served vs offline accuracy tolerance",
                                           description="Max |served − offline| accuracy. Empty: the model's gate file"),
        "champion_tolerance": Param(None, type=["null", "number"], minimum=0, title="Allowed drop vs champion",
                                    description="Candidate may be this much (absolute) below the champion re-scored "
                                                "on the same test split. Empty: the model's gate file"),
        "champion_relative_tolerance": Param(None, type=["null", "number"], minimum=0,
                                             title="Allowed relative drop vs champion",
                                             description="…and this fraction below it. Empty: the model's gate file"),
    }


#: What a drift-triggered run keeps of each drift event's extra (drift_monitor's request_retrain figures).
DRIFT_EVENT_KEYS = ("model_name", "champion_version", "window_start", "window_end", "drifted_share",
                    "embedding_drift_score", "n_current", "report_html")


def drift_events(context: Any) -> list[dict[str, Any]]:
    """The drift Asset events this run was made of (none for a timed or a triggered run): which
    ``drift_monitor`` run saw what, its figures taken from the event's extra. The cooldown task logs
    them and pushes them as XCom ``triggered_by``, so a drift retrain says why it ran."""
    out: list[dict[str, Any]] = []
    for asset, events in (context.get("triggering_asset_events") or {}).items():
        for e in events:
            extra = dict(e.extra or {})
            out.append({"asset": getattr(asset, "name", str(asset)), "source_dag_id": e.source_dag_id,
                        "source_run_id": e.source_run_id, "timestamp": e.timestamp.isoformat(),
                        **{k: extra[k] for k in DRIFT_EVENT_KEYS if k in extra}})
    return out


def _training(m: ModelEntry, snapshot: Any) -> Any:
    """train_gpu: one training run, or (an entry with ``sweep:``) the sweep's mapped trials and the
    winner picked on validation (``nightshift.operators.sweep``, imported only then)."""
    common = dict(task_id="train_gpu", pool="nightshift_gpu", snapshot=snapshot, model_name=MODEL,
                  require_gpu="{{ params.require_gpu }}",
                  hparams={"model": "{{ params.model }}", "epochs": "{{ params.epochs }}",
                           "batch_size": "{{ params.batch_size }}", "lr": "{{ params.lr }}"})
    if m.sweep is None:
        return train_task(PLACEMENT, **common)
    from nightshift.operators.sweep import sweep_train

    return sweep_train(PLACEMENT, sweep=m.sweep, **common)


def _doc(m: ModelEntry) -> str:
    return (f"{__doc__}\n\n#### This Dag: model `{m.name}`\n\n{m.description or ''}\n\n"
            f"Entry #{m.index + 1} of the models file{' (the default model)' if m.default else ''}: schedule "
            f"{f'`{m.schedule}` (UTC) or ' if m.schedule else 'none (no timed runs): '}"
            f"the `{drift_asset(None if m.default else m.name).name}` Asset; deadline "
            f"{format_duration(m.deadline_s)} after queued; deploy {m.deploy_target}"
            f"{f' on 127.0.0.1:{m.deploy_port}' if m.deploy_target == 'docker' else ''}"
            f"{'; hyperparameter sweep' if m.sweep else ''}.")


def schedule(m: ModelEntry) -> Any:
    """The entry's cron time **or** its drift Asset; the drift Asset alone when the entry's
    ``schedule`` is null (no timed runs: drift and the Trigger button only)."""
    asset = drift_asset(None if m.default else m.name)
    if m.schedule is None:
        return asset
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(m.schedule, timezone="UTC"), assets=asset)


def build(m: ModelEntry):
    """The nightly_retrain Dag of one model (a :class:`DeadlineDAG`: its deadline does not break
    ``airflow dags test``)."""
    with DeadlineDAG(
        dag_id=m.retrain_dag_id,
        schedule=schedule(m),
        start_date=datetime(2026, 1, 1),
        catchup=False,
        # a run waiting for approval must not hold back the next nightly or a drift retrain; what must not
        # overlap is serialised on its own: train_gpu by the nightshift_gpu pool, system_eval by
        # max_active_tis_per_dag=1, champion and the serving port by the per-model champion lock
        max_active_runs=MAX_ACTIVE_RUNS,
        default_args=default_args,
        description="Retrain the image classifier on the newest data, evaluate it as a running service and "
                    "promote it to champion only when every gate passes"
                    + ("" if m.default else f" (model {m.name})"),
        tags=["nightshift", "mlops", "training", *(() if m.default else (f"model:{m.name}",)), *m.tags],
        doc_md=_doc(m),
        render_template_as_native_obj=True,
        deadline=nightly_deadline(m.name, m.deadline_s),
        params=retrain_params(m),
    ) as nightly_retrain:
        # one cooldown at a time (max_active_tis_per_dag); the store's lock in drift_retrain_cooldown also
        # serialises overlapping runs on any worker and in one process (dag.test)
        @task.short_circuit(ignore_downstream_trigger_rules=True, max_active_tis_per_dag=1)
        def cooldown(**context) -> bool:
            """Hold back drift-triggered runs inside the cooldown (a drift storm queues no retrains);
            a drift-triggered run first records the drift events it was made of (XCom ``triggered_by``)."""
            from nightshift.gates import drift_retrain_cooldown
            from nightshift.operators.base import artifact_store

            triggered_by = drift_events(context)
            for event in triggered_by:
                print(f"triggered by drift: {event['asset']} from {event['source_dag_id']} run "
                      f"{event['source_run_id']}: model {event.get('model_name')} champion "
                      f"v{event.get('champion_version')}, drifted share {event.get('drifted_share')}, "
                      f"{event.get('n_current')} requests {event.get('window_start')} - {event.get('window_end')}")
            if triggered_by:
                context["ti"].xcom_push(key="triggered_by", value=triggered_by)

            # Airflow gives asset-triggered runs (no logical date) no previous successful run, so
            # the start of the last retrain that passed this gate is recorded by the gate itself
            prev = getattr(context.get("prev_start_date_success"), "__wrapped__",
                           context.get("prev_start_date_success"))
            proceed, reason = drift_retrain_cooldown(
                artifact_store(), context["dag"].dag_id, run_type=str(context["dag_run"].run_type),
                run_id=context["run_id"], last_success_start=prev,
                cooldown_hours=context["params"]["retrain_cooldown_hours"])
            print(reason)
            return proceed

        collect = CollectDataOperator(task_id="collect_data", source="{{ params.source }}", image_shape=SHAPE,
                                      classes=CLASSES, partition_window="{{ params.partition_window }}")
        validate = ValidateDataOperator(task_id="validate_data", snapshot=collect.output, classes=CLASSES,
                                        image_shape=SHAPE)
        train = _training(m, collect.output)
        export = ExportONNXOperator(task_id="export_onnx", training=train.output, snapshot=collect.output,
                                    model_name=MODEL, opset="{{ params.onnx_opset }}",
                                    quantize="{{ params.quantize_int8 }}")
        image = BuildInferenceImageOperator(task_id="build_inference_image", export=export.output,
                                            model_name=MODEL, **DOCKER)
        system_eval = SystemEvalOperator(task_id="system_eval", image=image.output, snapshot=collect.output,
                                         export=export.output, training=train.output, model_name=MODEL,
                                         max_active_tis_per_dag=1,  # one load test at a time: overlapping runs
                                         **DOCKER)
        drift = DriftCheckOperator(task_id="drift_check", snapshot=collect.output, model_name=MODEL)
        promote = PromoteModelOperator(
            task_id="promote", model_name=MODEL, snapshot=collect.output, validation=validate.output,
            training=train.output, export=export.output, image=image.output, system_eval=system_eval.output,
            drift=drift.output, gates_file=m.gates_file,
            require_approval="{{ params.require_approval }}",
            thresholds={k: "{{ params.%s }}" % k for k in
                        ("min_accuracy", "max_p95_latency_ms", "max_p99_latency_ms", "min_throughput_rps",
                         "served_accuracy_tolerance", "champion_tolerance", "champion_relative_tolerance")},
        )
        # waits for a person; a newer candidate of the model ends the wait (superseded), and other runs go on
        approve = PromotionApprovalOperator(task_id="approve_promotion", promotion=promote.output, model_name=MODEL)
        final = FinalizePromotionOperator(task_id="finalize_promotion", promotion=promote.output,
                                          approval=approve.output, model_name=MODEL,
                                          deploy_target="{{ params.deploy_target }}", **DOCKER)
        approve >> final
        DeployModelOperator(task_id="deploy", promotion=final.output, model_name=MODEL,
                            target="{{ params.deploy_target }}", port="{{ params.deploy_port }}", **DOCKER)
        cooldown() >> collect
        validate >> train
        [system_eval, drift] >> promote

    return nightly_retrain


# One Dag per well-formed entry, in file order; a task process builds only its own Dag. Malformed
# entries are skipped here and raised by model_config_errors.py.
for _model in load_models().for_dag(RETRAIN_DAG, get_parsing_context().dag_id):
    globals()[_model.retrain_dag_id] = build(_model)

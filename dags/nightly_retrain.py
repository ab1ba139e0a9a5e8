"""
### nightly_retrain — retrain, evaluate and (maybe) promote the image classifier

Every night at 02:00 UTC, whenever the `nightshift_drift_detected` Asset is
updated (drift in served traffic), or on demand from **Trigger DAG w/ config**:

1. **collect_data** — read the source (`bundled` digits, an ImageFolder path or
   object-storage URI, or `torchvision:<Dataset>`) into a content-addressed
   snapshot with a per-image profile; emits the `nightshift_snapshot` Asset.
2. **validate_data** — Great Expectations over the profile and manifest; fails
   with the list of failed expectations (report in the run's artifact folder).
3. **train_gpu** — PyTorch on CUDA when present (CPU otherwise); MLflow run.
4. **export_onnx** — uint8 pixels in, logits + embedding out; parity with PyTorch.
5. **build_inference_image** — ONNX Runtime server image with the model inside.
6. **system_eval** — runs that image on loopback and sends the test split
   through the Open Inference Protocol: accuracy, p50/p95/p99 latency, errors.
7. **drift_check** — Evidently: new data vs the champion's training data.
8. **promote** — MLflow alias `champion` moves only if every gate passes.
   Unset thresholds mean no promotion. The decision is recorded on the model version.

Artifacts: `$NIGHTSHIFT_ARTIFACT_ROOT/runs/nightly_retrain/<run_id>/`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag

from nightshift.operators import (
    DRIFT_DETECTED_ASSET,
    BuildInferenceImageOperator,
    CollectDataOperator,
    DriftCheckOperator,
    ExportONNXOperator,
    PromoteModelOperator,
    SystemEvalOperator,
    TrainGPUOperator,
    ValidateDataOperator,
)

MODEL = "{{ params.model_name }}"
SHAPE = "{{ params.image_shape }}"
CLASSES = "{{ params.classes }}"

default_args = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
}


@dag(
    dag_id="nightly_retrain",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 2 * * *", timezone="UTC"),
                                 assets=DRIFT_DETECTED_ASSET),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    tags=["nightshift", "mlops", "training"],
    doc_md=__doc__,
    render_template_as_native_obj=True,
    params={
        "source": Param("bundled", type="string", title="Data source",
                        description="'bundled' (digits), an ImageFolder path or URI (s3://…), or 'torchvision:CIFAR10'"),
        "image_shape": Param(None, type=["null", "array"], title="Image shape [H, W, C]",
                             description="Default: 8×8×1 for bundled, 32×32×3 otherwise"),
        "classes": Param(None, type=["null", "array"], title="Expected class names (label order)"),
        "partition_window": Param(None, type=["null", "integer"], minimum=1, title="Partition window",
                                  description="For <root>/<partition>/<class>/<image> sources (e.g. one folder "
                                              "per day): collect only the last N partitions. Empty: not partitioned"),
        "model_name": Param("nightshift-digits", type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                            title="Registered model name"),
        "model": Param("small_cnn", enum=["small_cnn", "resnet18"], title="Architecture"),
        "epochs": Param(12, type="integer", minimum=1, maximum=500, title="Epochs"),
        "batch_size": Param(128, type="integer", minimum=2, title="Batch size",
                            description="Images per step (at least 2: the models use BatchNorm); "
                                        "larger than the train split means one step per epoch"),
        "lr": Param(0.003, type="number", exclusiveMinimum=0, maximum=10, title="Peak learning rate",
                    description="A run whose loss diverges fails at once with a message saying so"),
        "require_gpu": Param(False, type="boolean", description="Fail instead of training on CPU"),
        "min_accuracy": Param(0.9, type=["null", "number"], description="Offline test-accuracy floor"),
        "max_p95_latency_ms": Param(250.0, type=["null", "number"], description="Served p95 latency budget"),
        "served_accuracy_tolerance": Param(0.01, type=["null", "number"],
                                           description="Max |served − offline| accuracy"),
        "champion_tolerance": Param(0.01, type=["null", "number"],
                                    description="Candidate may be this much below the champion"),
    },
)
def nightly_retrain():
    collect = CollectDataOperator(task_id="collect_data", source="{{ params.source }}", image_shape=SHAPE,
                                  classes=CLASSES, partition_window="{{ params.partition_window }}")
    validate = ValidateDataOperator(task_id="validate_data", snapshot=collect.output, classes=CLASSES,
                                    image_shape=SHAPE)
    train = TrainGPUOperator(
        task_id="train_gpu", pool="nightshift_gpu", snapshot=collect.output, model_name=MODEL, require_gpu="{{ params.require_gpu }}",
        hparams={"model": "{{ params.model }}", "epochs": "{{ params.epochs }}",
                 "batch_size": "{{ params.batch_size }}", "lr": "{{ params.lr }}"},
    )
    export = ExportONNXOperator(task_id="export_onnx", training=train.output, snapshot=collect.output,
                                model_name=MODEL)
    image = BuildInferenceImageOperator(task_id="build_inference_image", export=export.output, model_name=MODEL)
    system_eval = SystemEvalOperator(task_id="system_eval", image=image.output, snapshot=collect.output,
                                     export=export.output, training=train.output, model_name=MODEL)
    drift = DriftCheckOperator(task_id="drift_check", snapshot=collect.output, model_name=MODEL)
    promote = PromoteModelOperator(
        task_id="promote", model_name=MODEL, snapshot=collect.output, validation=validate.output,
        training=train.output, export=export.output, image=image.output, system_eval=system_eval.output,
        drift=drift.output,
        thresholds={k: "{{ params.%s }}" % k for k in
                    ("min_accuracy", "max_p95_latency_ms", "served_accuracy_tolerance", "champion_tolerance")},
    )
    validate >> train
    [system_eval, drift] >> promote


nightly_retrain()

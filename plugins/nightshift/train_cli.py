"""``python -m nightshift.train_cli``: the ``train_gpu`` step as a command, for a pod of its own.

Trains on a snapshot inside an MLflow run (:func:`nightshift.train_run.run_training`,
the same code :class:`~nightshift.operators.train.TrainGPUOperator` runs) and writes
the same result dict as JSON, by default where the KubernetesPodOperator's XCom
sidecar reads it::

    python -m nightshift.train_cli --snapshot-uri /data/artifacts/snapshots/<id> \\
        --out-dir /data/artifacts/runs/nightly_retrain/<run>/train --hparams '{"epochs": 10}' \\
        --require-gpu --result-path /airflow/xcom/return.json

MLflow and the artifact root come from the environment (``MLFLOW_TRACKING_URI``,
``NIGHTSHIFT_HOME``, ``NIGHTSHIFT_ARTIFACT_ROOT``), as for the operators.

Under ``torchrun --nproc_per_node=N`` (one process per GPU) the ranks train data-parallel
(:mod:`nightshift.distributed`); rank 0 records the MLflow run and writes the result.

Exit status: 0 trained; 2 a configuration or data error (bad arguments, bad
hyperparameters, unreadable snapshot, no GPU with ``--require-gpu``, diverged
training: running it again cannot help), message on stderr; 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

#: Where the KubernetesPodOperator's XCom sidecar reads the task's return value.
XCOM_RETURN_PATH = "/airflow/xcom/return.json"
EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2


def _tag(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, val


def _hparams(value: str) -> dict[str, Any]:
    try:
        hp = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--hparams is not valid JSON ({exc.msg}): {value!r}") from None
    if not isinstance(hp, dict):
        raise argparse.ArgumentTypeError(f"--hparams must be a JSON object, got {value!r}")
    return hp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nightshift.train_cli",
                                description="Train the classifier on a snapshot and record the run in MLflow.")
    p.add_argument("--snapshot-uri", required=True, help="the snapshot folder (collect_data's snapshot_uri)")
    p.add_argument("--out-dir", required=True, help="where checkpoint.pt, train_manifest.json and plots/ go")
    p.add_argument("--hparams", type=_hparams, default={}, help="JSON object of hyperparameter overrides")
    p.add_argument("--require-gpu", action="store_true", help="fail (exit 2) when no CUDA device is visible")
    p.add_argument("--model-name", default="nightshift-classifier", help="MLflow experiment / registered model name")
    p.add_argument("--run-name", default="train_cli", help="MLflow run name (the DAG passes its run id)")
    p.add_argument("--tag", type=_tag, action="append", default=[], metavar="KEY=VALUE",
                   help="an MLflow run tag (repeatable)")
    p.add_argument("--result-path", default=None,
                   help=f"write the result JSON here (the pod operator passes {XCOM_RETURN_PATH}); "
                        "default: stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    log = logging.getLogger("nightshift.train_cli")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: 2 for bad arguments (message already on stderr), 0 for --help
        return int(exc.code or 0)

    from nightshift.artifacts import atomic_write_json
    from nightshift.errors import NightshiftError
    from nightshift.settings import Settings

    try:
        from nightshift import registry
        from nightshift.train_run import run_training

        from nightshift import distributed

        settings = Settings.from_env()
        main_rank = distributed.from_env().is_main  # torchrun: only rank 0 talks to MLflow
        c = registry.client(settings.mlflow_tracking_uri, settings.mlflow_registry_uri) if main_rank else None
        result = run_training(c, args.snapshot_uri, args.out_dir, args.hparams, model_name=args.model_name,
                              run_name=args.run_name, require_gpu=args.require_gpu, tags=dict(args.tag),
                              artifact_location=(settings.home / "mlartifacts").as_uri(), log=log)
    except NightshiftError as exc:
        print(f"train_cli: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR if exc.retryable else EXIT_CONFIG
    except Exception:  # noqa: BLE001 - exit 1 with the traceback, the pod's log shows it
        log.exception("train_cli failed")
        return EXIT_ERROR
    if not main_rank:  # torchrun: rank 0 answers for the run
        return EXIT_OK
    text = json.dumps(result, default=str)
    if args.result_path:
        atomic_write_json(args.result_path, result)
        log.info("result written to %s", args.result_path)
    else:
        print(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

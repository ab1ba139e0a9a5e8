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

With an object-store root (``NIGHTSHIFT_ARTIFACT_ROOT=s3://...``, credentials from
``AWS_*``), ``--snapshot-uri`` and ``--out-dir`` are URIs: the snapshot and an earlier
try's ``train/`` folder (its ``last.pt``: resume) are fetched into the working copy,
``last.pt`` is published after every epoch and ``train/`` at the end, and the result
names URIs. ``--snapshot-path`` gives a local copy the caller already fetched.

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
    p.add_argument("--out-dir", required=True, help="where checkpoint.pt, train_manifest.json and plots/ go "
                                                    "(a folder, or a URI under an object-store artifact root)")
    p.add_argument("--snapshot-path", default=None,
                   help="a local copy of --snapshot-uri already fetched (default: fetched when it is a URI)")
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
        from nightshift.train_run import default_artifact_location, run_training

        from nightshift import distributed

        settings = Settings.from_env()
        main_rank = distributed.from_env().is_main  # torchrun: only rank 0 talks to MLflow
        c = registry.client(settings.mlflow_tracking_uri, settings.mlflow_registry_uri) if main_rank else None
        store, out_dir, snapshot_path = _working_copy(settings, args, main_rank, log)
        after_epoch = None
        if store is not None and main_rank:
            from nightshift.training import LAST_CHECKPOINT

            def after_epoch(epoch: int) -> None:  # a retry (another pod) resumes from it
                store.publish(out_dir / LAST_CHECKPOINT)

        try:
            result = run_training(c, args.snapshot_uri, out_dir, args.hparams, model_name=args.model_name,
                                  run_name=args.run_name, require_gpu=args.require_gpu, tags=dict(args.tag),
                                  artifact_location=default_artifact_location(settings.mlflow_tracking_uri,
                                                                              settings.home),
                                  log=log, snapshot_path=snapshot_path, after_epoch=after_epoch)
        except BaseException:
            if store is not None and main_rank and out_dir.is_dir():
                try:  # what this try reached (plots, manifest) is readable; its own error is the one to report
                    store.publish(out_dir)
                except Exception as exc:  # noqa: BLE001
                    log.error("publishing %s after the failure failed: %s", args.out_dir, exc)
            raise
        if store is not None and main_rank:
            store.publish(out_dir)
        if store is not None:
            result = {**result, "checkpoint": store.to_uri(result["checkpoint"]),
                      "train_dir": store.to_uri(result["train_dir"])}
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


def _working_copy(settings: Any, args: Any, main_rank: bool, log: logging.Logger) -> tuple[Any, Any, Any]:
    """``(store, local out dir, local snapshot path)``: with ``--out-dir`` a URI of an object-store
    root, the store (credentials from the environment), the out dir's working copy with an earlier
    try's files fetched (resume), and the snapshot fetched; else ``(None, out dir, --snapshot-path)``."""
    from pathlib import Path

    from nightshift.errors import ConfigError

    if "://" not in str(args.out_dir):
        return None, Path(args.out_dir), args.snapshot_path
    from nightshift.data.snapshot import fetch_snapshot

    store = settings.store()
    if not store.remote or store.rel(args.out_dir) is None:
        raise ConfigError(f"--out-dir {args.out_dir} is not under the artifact root {settings.artifact_uri} "
                          "(NIGHTSHIFT_ARTIFACT_ROOT)")
    out_dir = store.fetch(args.out_dir, required=False)  # an earlier try's last.pt: resume from it
    if (out_dir / "last.pt").is_file():
        log.info("found %s/last.pt from an earlier try", args.out_dir)
    snapshot_path = args.snapshot_path or fetch_snapshot(store, args.snapshot_uri)
    return store, out_dir, snapshot_path


if __name__ == "__main__":
    sys.exit(main())

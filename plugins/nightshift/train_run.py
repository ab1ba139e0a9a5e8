"""One training run recorded in MLflow: what ``train_gpu`` does, wherever it runs.

:class:`~nightshift.operators.train.TrainGPUOperator` calls :func:`run_training` in
the worker; ``python -m nightshift.train_cli`` calls it in a pod of its own
(``TrainGPUPodOperator``). Both paths therefore log the same things and return
the same small dict (:data:`RESULT_KEYS`), which goes to XCom.

What a person finds in the MLflow run:

- params (the resolved hyperparameters), per-epoch metrics, final metrics;
- the snapshot as a **dataset input** (digest, source, shape and class names,
  split and class counts), context ``training``;
- lineage tags: data digest, device and device name, torch version, the code's
  git commit when the training manifest carries one;
- artifacts under ``train/``: ``checkpoint.pt``, ``train_manifest.json``,
  ``plots/curves.png`` and ``plots/confusion_matrix.png``.

Airflow-free; MLflow and torch are imported by the functions that use them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

#: The keys of the dict :func:`run_training` returns (the ``train_gpu`` XCom contract).
RESULT_KEYS = ("run_id", "checkpoint", "metrics", "device", "train_dir", "data_digest")
#: Where the figures go, relative to the training output folder (and to ``train/`` in MLflow).
PLOTS_DIR = "plots"
CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion_matrix.png"
#: Manifest keys that may hold the code's git commit (top level or one level down, e.g. ``lineage``).
GIT_KEYS = ("git_sha", "git_commit", "commit_sha", "commit")
#: MLflow's tag that nests a run under another (a sweep trial under the sweep's parent run).
PARENT_TAG = "mlflow.parentRunId"
#: Tag of a sweep's parent run, so that a retried trials task finds the run it created before.
SWEEP_PARENT_TAG = "nightshift.sweep_parent"

#: The tags that name one task's training: every try of one task instance (a sweep trial adds its
#: index) carries the same values, and Airflow runs one try of it at a time.
TRY_KEYS = ("nightshift.dag_id", "nightshift.run_id", "nightshift.task", "nightshift.sweep_trial")
#: Which try of the task made the MLflow run (the operators set it).
TRY_TAG = "nightshift.try_number"
#: Set on an earlier try's run that a later try ended: that try's number, and its MLflow run.
SUPERSEDED_BY_TRY_TAG = "nightshift.superseded_by_try"
SUPERSEDED_BY_RUN_TAG = "nightshift.superseded_by_run"

_log = logging.getLogger(__name__)


def default_artifact_location(tracking_uri: str, home: str | Path) -> str | None:
    """Where a new MLflow experiment keeps its artifacts: ``<home>/mlartifacts`` with a local
    tracking store (SQLite, a folder), ``None`` with a tracking server (``http(s)://``,
    ``databricks``...): the server's own artifact location, which every worker reaches, rather
    than a folder of the worker that happened to create the experiment."""
    scheme = str(tracking_uri).split("://", 1)[0].lower() if "://" in str(tracking_uri) else ""
    if scheme in ("", "file", "sqlite", "postgresql", "mysql", "mssql") or scheme.startswith(("postgresql+", "mysql+")):
        return (Path(home) / "mlartifacts").as_uri()
    return None


def run_training(c, snapshot_uri: str, out_dir: str | Path, hparams: Mapping[str, Any] | None, *, model_name: str,
                 run_name: str, require_gpu: bool = False, tags: Mapping[str, str] | None = None,
                 artifact_location: str | None = None, should_stop: Callable[[], bool] | None = None,
                 log: logging.Logger | None = None, snapshot_path: str | Path | None = None,
                 after_epoch: Callable[[int], None] | None = None, evaluate_test: bool = True,
                 parent_run_id: str | None = None) -> dict[str, Any]:
    """Train on the snapshot at ``snapshot_uri`` inside an MLflow run of experiment ``model_name``.

    :param c: an ``MlflowClient`` (:func:`nightshift.registry.client`).
    :param out_dir: where the checkpoint, the manifest and the plots are written.
    :param hparams: overrides of ``nightshift.training.DEFAULT_HPARAMS``.
    :param tags: run tags (DAG id, run id, task id); the data digest and lineage are added.
    :param snapshot_path: the snapshot's local copy when ``snapshot_uri`` is an object-store URI
        (:func:`nightshift.data.snapshot.fetch_snapshot`); the URI is what MLflow records.
    :param after_epoch: called with the epoch after each epoch's ``last.pt`` is written and its
        metrics logged (e.g. to publish ``last.pt`` so a retry elsewhere resumes from it).
    :param evaluate_test: False for a sweep trial: the test split is never read, the metrics have
        no ``test_*`` (:func:`nightshift.training.train`).
    :param parent_run_id: the sweep's parent run: this run becomes its child (tag
        ``mlflow.parentRunId``, which the MLflow UI nests under the parent).
    :returns: ``run_id``, ``checkpoint``, ``metrics``, ``device``, ``train_dir``, ``data_digest``.
    :raises GPUUnavailable: ``require_gpu`` and no CUDA device (before any MLflow run is opened).
    """
    from nightshift import registry, training
    from nightshift.data.snapshot import load_snapshot

    from nightshift import distributed

    log = log or _log
    snap = load_snapshot(snapshot_path if snapshot_path is not None else snapshot_uri)
    hp = training.resolve_hparams(dict(hparams or {}), snap.image_shape)  # None -> by input size
    training.select_device(require_gpu)  # fail fast, before an MLflow run is opened
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not distributed.from_env().is_main:  # a data-parallel helper rank: rank 0 records the run
        result = training.train(snap, out_dir, hp, require_gpu=require_gpu, should_stop=should_stop,
                                evaluate_test=evaluate_test)
        return {"run_id": None, "checkpoint": str(result.checkpoint_path), "metrics": result.metrics,
                "device": result.manifest["device"], "train_dir": str(out_dir), "data_digest": snap.digest}
    run_tags = {**(tags or {}), "nightshift.data_digest": snap.digest}
    if parent_run_id:
        run_tags[PARENT_TAG] = str(parent_run_id)
    with registry.training_run(c, model_name, run_name, tags=run_tags, params=hp,
                               artifact_location=artifact_location) as run_id:
        # a try whose worker was killed never ended its run: end it now, saying which try took over
        end_superseded_tries(c, run_id, run_tags, log=log)
        # first: a run that fails still says which data it had (its URI, never a worker's copy)
        log_snapshot_input(c, run_id, snap, uri=str(snapshot_uri))

        def on_epoch(epoch: int, m: dict[str, float]) -> None:
            log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in m.items()))
            registry.log_metrics(c, run_id, m, step=epoch)
            if after_epoch is not None:
                after_epoch(epoch)

        result = training.train(snap, out_dir, hp, require_gpu=require_gpu, on_epoch=on_epoch,
                                should_stop=should_stop, evaluate_test=evaluate_test)
        per_epoch = set(result.history[-1]) if result.history else set()
        registry.log_metrics(c, run_id, {k: v for k, v in result.metrics.items() if k not in per_epoch},
                             step=hp["epochs"])
        c.set_tag(run_id, "nightshift.device", result.manifest["device"])
        for key, value in lineage_tags(result.manifest).items():
            c.set_tag(run_id, key, value)
        write_plots(result.history, result.manifest, snap.class_names, out_dir / PLOTS_DIR, log=log)
        # train/checkpoint.pt, train_manifest.json, plots/; the resume state (last.pt: weights, EMA and
        # optimizer, ~3x the model) stays in the run folder, where a retry looks for it
        registry.log_artifacts(c, run_id, out_dir, "train", exclude=(training.LAST_CHECKPOINT,))
    held_out = "test" if "test_accuracy" in result.metrics else "val"
    log.info("Trained on %s: %s accuracy %.4f (MLflow run %s)", result.manifest["device"], held_out,
             result.metrics[f"{held_out}_accuracy"], run_id)
    return {"run_id": run_id, "checkpoint": str(result.checkpoint_path), "metrics": result.metrics,
            "device": result.manifest["device"], "train_dir": str(out_dir), "data_digest": snap.digest}


def end_superseded_tries(c, run_id: str, tags: Mapping[str, str], *, log: logging.Logger | None = None) -> list[str]:
    """End the MLflow runs that earlier tries of this task left RUNNING, as KILLED.

    A try whose worker was SIGKILLed (or lost) never reaches :func:`nightshift.registry.training_run`'s
    ``set_terminated``, so its run would stay RUNNING for ever next to the retry's. When a try starts,
    Airflow has already given up on the earlier ones (one try of a task instance runs at a time), so
    every other RUNNING run with the same :data:`TRY_KEYS` tags (DAG id, DAG run id, task, sweep
    trial) in the experiment is ended as KILLED and tagged with the try that superseded it
    (:data:`SUPERSEDED_BY_TRY_TAG`, :data:`SUPERSEDED_BY_RUN_TAG`). A sweep's parent run and other
    trials' runs do not match. Bookkeeping only: a registry error is logged, never fails training.

    :param tags: the new run's tags (without the identifying ones nothing is ended).
    :returns: the ids of the runs ended.
    """
    log = log or _log
    if not all(tags.get(k) for k in TRY_KEYS[:3]):
        return []
    try:
        exp_id = c.get_run(run_id).info.experiment_id
        query = " and ".join([f"tags.`{k}` = '{_quote(tags[k])}'" for k in TRY_KEYS if tags.get(k)]
                             + ["attributes.status = 'RUNNING'"])
        found = c.search_runs([exp_id], filter_string=query, max_results=200)
        ended = []
        for r in found:
            other = r.info.run_id
            if other == run_id or r.data.tags.get(SWEEP_PARENT_TAG) == "true":
                continue
            if bool(r.data.tags.get("nightshift.sweep_trial")) != bool(tags.get("nightshift.sweep_trial")):
                continue  # a sweep trial's run is not a plain train_gpu try's, nor the other way round
            c.set_tag(other, SUPERSEDED_BY_TRY_TAG, str(tags.get(TRY_TAG, "unknown")))
            c.set_tag(other, SUPERSEDED_BY_RUN_TAG, run_id)
            c.set_terminated(other, "KILLED")
            log.warning("MLflow run %s of try %s was left RUNNING (its worker died): ended as KILLED, superseded "
                        "by try %s (run %s)", other, r.data.tags.get(TRY_TAG, "unknown"),
                        tags.get(TRY_TAG, "unknown"), run_id)
            ended.append(other)
        return ended
    except Exception as exc:  # noqa: BLE001 - bookkeeping never fails a training run
        log.warning("could not end the MLflow runs of earlier tries of this task: %s: %s", type(exc).__name__, exc)
        return []


def snapshot_dataset_fields(snap, uri: str | None = None) -> dict[str, str]:
    """The MLflow dataset-input fields for a snapshot: name, digest, source type, source (JSON with
    the snapshot's ``uri``, default its path, and original ``source``), schema (shape, dtype, class
    names) and profile (split and class counts)."""
    m = snap.manifest
    source = str(m.get("source") or "snapshot")
    return {
        "name": f"{source}@{snap.digest[:12]}",
        "digest": snap.digest,
        "source_type": "nightshift_snapshot",
        "source": json.dumps({"uri": uri or str(snap.path), "source": source, "collection_id": m.get("collection_id")}),
        "schema": json.dumps({"image_shape": list(snap.image_shape), "dtype": "uint8",
                              "class_names": snap.class_names}),
        "profile": json.dumps({"counts": m.get("counts", {}), "undecodable": len(m.get("undecodable") or [])}),
    }


def log_snapshot_input(c, run_id: str, snap, uri: str | None = None) -> None:
    from nightshift import registry

    registry.log_dataset_input(c, run_id, context="training", **snapshot_dataset_fields(snap, uri))


def lineage_tags(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Run tags from the training manifest: device name, torch (and CUDA) version, git commit.
    Keys the manifest does not have are left out."""
    tags: dict[str, str] = {}
    versions = manifest.get("versions") if isinstance(manifest.get("versions"), Mapping) else {}
    if manifest.get("device_name"):
        tags["nightshift.device_name"] = str(manifest["device_name"])
    if versions.get("torch"):
        tags["nightshift.torch_version"] = str(versions["torch"])
    if versions.get("cuda"):
        tags["nightshift.cuda_version"] = str(versions["cuda"])
    sha = _find_git_sha(manifest)
    if sha:
        tags["nightshift.git_sha"] = sha
        tags["mlflow.source.git.commit"] = sha  # MLflow's own tag: the UI shows it on the run page
    return tags


def _find_git_sha(manifest: Mapping[str, Any]) -> str | None:
    places = [manifest, *(v for v in manifest.values() if isinstance(v, Mapping))]
    for place in places:
        for key in GIT_KEYS:
            value = place.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
        git = place.get("git")
        if isinstance(git, Mapping):
            for key in ("sha", *GIT_KEYS):
                if isinstance(git.get(key), str) and git[key].strip():
                    return git[key].strip()
    return None


def write_plots(history: list[dict[str, Any]], manifest: Mapping[str, Any], class_names: list[str],
                plots_dir: str | Path, *, log: logging.Logger | None = None) -> list[Path]:
    """Draw ``curves.png`` and ``confusion_matrix.png`` into ``plots_dir``; return what was written.

    A figure that cannot be drawn (no history, no ``confusion_matrix`` in the manifest, a
    matrix that does not match the class names) is skipped with a log line: figures are for
    people and never fail a training run.
    """
    from nightshift import plots

    log = log or _log
    plots_dir = Path(plots_dir)
    written: list[Path] = []
    try:
        written.append(plots.plot_training_curves(history, plots_dir / CURVES_PNG))
    except Exception as exc:  # noqa: BLE001 - a figure never fails training
        log.warning("training curves not drawn: %s: %s", type(exc).__name__, exc)
    matrix = manifest.get("confusion_matrix")
    if matrix is None:
        log.info("confusion-matrix plot skipped: the training manifest has no 'confusion_matrix'")
    else:
        try:
            written.append(plots.plot_confusion_matrix(matrix, class_names, plots_dir / CONFUSION_PNG))
        except Exception as exc:  # noqa: BLE001
            log.warning("confusion-matrix plot not drawn: %s: %s", type(exc).__name__, exc)
    return written


# --------------------------------------------------------------------------- sweeps: the parent run


def open_sweep_parent(c, model_name: str, run_name: str, *, tags: Mapping[str, str], params: Mapping[str, Any],
                      artifact_location: str | None = None) -> str:
    """The MLflow parent run of a sweep (status RUNNING): every trial's run is its child.

    Idempotent per DAG run: a parent with the same ``nightshift.dag_id`` and ``nightshift.run_id``
    tags (a retried trials task) is reused, so one sweep never has two parents.

    :param params: logged on a new parent run (the sweep spec, flattened by the caller).
    """
    from nightshift import registry

    exp_id = registry.experiment_id(c, model_name, artifact_location)
    keys = ("nightshift.dag_id", "nightshift.run_id")
    if all(tags.get(k) for k in keys):
        found = c.search_runs([exp_id], filter_string=" and ".join(
            [f"tags.`{SWEEP_PARENT_TAG}` = 'true'"] + [f"tags.`{k}` = '{_quote(tags[k])}'" for k in keys]),
            max_results=1)
        if found:
            c.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = c.create_run(exp_id, run_name=run_name, tags={**tags, SWEEP_PARENT_TAG: "true"})
    for k, v in params.items():
        c.log_param(run.info.run_id, k, v)
    return run.info.run_id


def close_sweep_parent(c, parent_run_id: str, table: list[dict[str, Any]], *, winner: Mapping[str, Any] | None,
                       out_dir: str | Path, metric: str, error: str | None = None) -> Path:
    """Record a sweep's outcome on its parent run and end it: the trial table
    (``sweep/trials.json``: index, state, hyperparameters, validation metrics, child run id),
    the winner's index, child run id and metrics (tags ``nightshift.sweep_winner*``, metrics
    ``winner_*``), and status FINISHED, or FAILED with ``error`` (too many failed trials).

    :returns: the trial table's file (written atomically into ``out_dir``).
    """
    from nightshift import registry
    from nightshift.artifacts import atomic_write_json

    out_dir = Path(out_dir)
    doc = {"metric": metric, "winner": dict(winner) if winner else None, "trials": table, "error": error}
    path = atomic_write_json(out_dir / "trials.json", doc)
    registry.log_artifacts(c, parent_run_id, out_dir, "sweep")
    done = [t for t in table if not t.get("failed")]
    registry.log_metrics(c, parent_run_id, {"trials": len(table), "trials_failed": len(table) - len(done)})
    if winner:
        c.set_tag(parent_run_id, "nightshift.sweep_winner", str(winner.get("trial")))
        c.set_tag(parent_run_id, "nightshift.sweep_winner_run_id", str(winner.get("run_id")))
        registry.log_metrics(c, parent_run_id, {f"winner_{k}": v for k, v in (winner.get("metrics") or {}).items()
                                                if isinstance(v, (int, float))})
    if error:
        c.set_tag(parent_run_id, "nightshift.sweep_error", error[:5000])
    c.set_terminated(parent_run_id, "FAILED" if error else "FINISHED")
    return Path(path)


def _quote(value: str) -> str:
    return str(value).replace("'", "\\'")

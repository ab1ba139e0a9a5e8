"""A hyperparameter sweep as ``train_gpu``: dynamic task mapping over trials, then a reduce.

:func:`sweep_train` builds, in a task group named after the task (ids unprefixed)::

    sweep_trials ─► train_gpu [mapped, one task instance per trial] ─► select_trial

- **sweep_trials** (:class:`SweepTrialsOperator`): the trials of the model's ``sweep:`` entry
  (:mod:`nightshift.sweep`), each trial's values over the base hyperparameters, every trial
  checked before any trains (a bad space fails here, once); opens the MLflow **parent run**.
- **train_gpu** (:class:`SweepTrialOperator`, mapped with ``expand_kwargs``): one training per
  trial, an MLflow child run of the parent (``mlflow.parentRunId``), in its own folder
  ``train/trials/<index>/`` so a retry resumes from that trial's ``last.pt``. Trials run in
  **trial mode**: the test split is never read. At most ``max_parallel`` trials of one DAG run
  at once (``max_active_tis_per_dagrun``), and never more than the ``nightshift_gpu`` pool.
- **select_trial** (:class:`SelectTrialOperator`, trigger rule ``all_done``): picks the winner
  on the validation metric only, scores the winner's checkpoint on the test split (the first
  time anything reads it), closes the parent run with the trial table, and returns the
  winner's training result in exactly the shape ``train_gpu`` returns without a sweep
  (:data:`nightshift.train_run.RESULT_KEYS`, ``metrics.test_accuracy`` included) plus
  ``sweep``; export, system eval and promote read it as before.

**Failed trials.** A trial fails like any task (the grid shows it red): errors a retry can fix
(a lost worker, a store hiccup) keep the DAG's retries and the retry resumes from the trial's
checkpoint; errors it cannot (divergence, bad hyperparameters, out of memory) fail at once.
Each trial leaves ``trial.json`` in its folder (on failure: the error). Because the reduce
runs on ``all_done``, failed trials do not fail the sweep unless they are more than the
sweep's ``max_failed``: then ``select_trial`` fails listing every failure, the parent run is
marked FAILED and nothing downstream runs.

Not supported: the ``kubernetes_pod`` placement (its pod runs ``train_cli``, which has no
trial mode yet) and data-parallel trials (a sweep uses its GPUs by running trials side by side).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Sequence

from airflow.sdk import TaskGroup

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import MLflowRunLink
from nightshift.operators.train import TrainGPUOperator, try_tag

if TYPE_CHECKING:
    from nightshift.placement import TrainPlacement

#: A trial's record in its folder (``train/trials/<index>/``): success or the error it failed with.
TRIAL_RECORD = "trial.json"
#: Where the sweep's summary goes in the run folder (also the parent run's ``sweep/`` artifacts).
SWEEP_DIR = ("train", "sweep")


def trial_dir_parts(index: int) -> tuple[str, ...]:
    """The run-folder path of trial ``index``: its checkpoints, record and plots."""
    return ("train", "trials", f"{int(index):03d}")


class SweepTrialsOperator(NightshiftOperator):
    """The trial list of a sweep, for ``expand_kwargs``; opens the sweep's MLflow parent run.

    Returns one dict per trial: ``hparams`` (the trial's values over ``hparams``), ``trial``
    (its index) and ``parent_run_id``. Every trial's hyperparameters are checked here
    (:func:`nightshift.training.resolve_hparams`), so a bad value fails the sweep before
    any trial trains, naming the trial.

    :param sweep: the model's ``sweep:`` entry (:func:`nightshift.sweep.parse_sweep`).
    :param hparams: the base hyperparameters (recipe defaults, the run's Params). (templated)
    :param model_name: registered model name = MLflow experiment. (templated)
    """

    template_fields: Sequence[str] = ("hparams", "model_name")
    #: Nothing of the run folder: the sweep entry and the base hyperparameters are values.
    run_folder_reads: Sequence[str] = ()
    ui_color = "#dcedc8"

    def __init__(self, *, sweep: dict[str, Any], hparams: dict[str, Any] | None = None,
                 model_name: str = "nightshift-classifier", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sweep = sweep
        self.hparams = hparams
        self.model_name = model_name

    def execute(self, context: Any) -> list[dict[str, Any]]:
        from nightshift.errors import ConfigError
        from nightshift.sweep import merge_hparams, parse_sweep
        from nightshift.train_run import default_artifact_location, open_sweep_parent
        from nightshift.training import resolve_hparams

        spec = parse_sweep(self.sweep)
        trials = []
        for i, values in enumerate(spec.trials()):
            hp = merge_hparams(self.hparams, values)
            try:
                resolve_hparams(hp)
            except ConfigError as exc:
                raise ConfigError(f"sweep trial {i} {values}: {exc}") from exc
            trials.append({"trial": i, "hparams": hp, "values": values})
        parent = open_sweep_parent(
            self.mlflow, self.model_name, f"{context['run_id']} sweep",
            tags={"nightshift.dag_id": self.dag_id, "nightshift.run_id": context["run_id"],
                  "nightshift.task": self.task_id},
            params={"sweep.method": spec.method, "sweep.trials": len(trials), "sweep.seed": spec.seed,
                    "sweep.metric": spec.metric, "sweep.max_failed": spec.max_failed,
                    "sweep.max_parallel": spec.max_parallel,
                    "sweep.space": json.dumps(spec.raw.get("space"), sort_keys=True, default=str)[:6000]},
            artifact_location=default_artifact_location(self.settings.mlflow_tracking_uri, self.settings.home))
        self.log.info("Sweep (%s, metric %s): %d trials, up to %d failures tolerated, MLflow parent run %s",
                      spec.method, spec.metric, len(trials), spec.allowed_failures(len(trials)), parent)
        for t in trials:
            self.log.info("  trial %d: %s", t["trial"], t["values"])
        return [{"hparams": t["hparams"], "trial": t["trial"], "parent_run_id": parent} for t in trials]


class SweepTrialOperator(TrainGPUOperator):
    """One trial of a sweep: :class:`TrainGPUOperator` in trial mode (the test split is never
    read), an MLflow child run of ``parent_run_id``, in the trial's own folder (a retry resumes
    from its ``last.pt``). Leaves ``trial.json`` in that folder, with the error on failure.

    :param trial: the trial's index. (templated)
    :param parent_run_id: the sweep's MLflow parent run. (templated)
    """

    template_fields: Sequence[str] = (*TrainGPUOperator.template_fields, "trial", "parent_run_id")

    def __init__(self, *, trial: int = 0, parent_run_id: str | None = None, data_parallel: int | str = 1,
                 **kwargs: Any) -> None:
        super().__init__(data_parallel=data_parallel, **kwargs)
        self.trial = trial
        self.parent_run_id = parent_run_id

    @property
    def run_folder_reads(self) -> Sequence[str]:  # type: ignore[override]
        """Its own trial's folder (an earlier try's ``last.pt``), not the other trials' nor ``train/``:
        known once ``trial`` is rendered, which it is before the folder is pulled."""
        return ("/".join(trial_dir_parts(int(self.trial))),)

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift.artifacts import atomic_write_json
        from nightshift.data.snapshot import fetch_snapshot
        from nightshift.errors import ConfigError
        from nightshift.settings import to_bool
        from nightshift.train_run import default_artifact_location, run_training
        from nightshift.training import LAST_CHECKPOINT

        index = int(self.trial)
        out_dir = self.run_dir(context, *trial_dir_parts(index))
        record = out_dir / TRIAL_RECORD
        base = {"trial": index, "hparams": self.hparams, "parent_run_id": self.parent_run_id,
                "try_number": context["ti"].try_number}
        try:
            if self._processes() > 1:
                raise ConfigError(f"data_parallel={self.data_parallel!r}: a sweep trains each trial in one process "
                                  "(its GPUs run trials side by side); set data_parallel to 1")
            snap_info = self.require(self.snapshot, "snapshot", "collect_data")
            snapshot_uri = str(snap_info["snapshot_uri"])
            snapshot_path = fetch_snapshot(self.store, snapshot_uri)
            result = run_training(
                self.mlflow, snapshot_uri, out_dir, self.hparams, model_name=self.model_name,
                run_name=f"{context['run_id']} trial {index}", require_gpu=to_bool(self.require_gpu),
                tags={"nightshift.dag_id": self.dag_id, "nightshift.run_id": context["run_id"],
                      "nightshift.task": self.task_id, "nightshift.sweep_trial": str(index), **try_tag(context)},
                artifact_location=default_artifact_location(self.settings.mlflow_tracking_uri, self.settings.home),
                should_stop=lambda: self._stop, log=self.log, snapshot_path=snapshot_path,
                after_epoch=lambda epoch: self._publish_resume_state(out_dir / LAST_CHECKPOINT),
                evaluate_test=False, parent_run_id=self.parent_run_id)
        except BaseException as exc:
            atomic_write_json(record, {**base, "failed": True, "error": f"{type(exc).__name__}: {exc}"[:4000]})
            raise
        atomic_write_json(record, {**base, "failed": False, "run_id": result["run_id"],
                                   "metrics": result["metrics"]})
        return {**result, "trial": index}


class SelectTrialOperator(NightshiftOperator):
    """The sweep's reduce: the winning trial on validation, scored on the test split afterwards.

    Runs when every trial is done (trigger rule ``all_done``), reads the successful trials'
    results (XCom) and the failed trials' records (``trial.json``), applies the sweep's
    ``max_failed`` rule and picks the winner on the sweep's validation metric
    (:func:`nightshift.sweep.select_best`). Then, and only then, the winner's checkpoint is
    scored on the test split (:func:`nightshift.training.evaluate_checkpoint`); its
    ``test_*`` metrics go to its MLflow run and to the result. The parent run gets the trial
    table and the winner; ``train/train_manifest.json`` becomes the winner's manifest (the
    run's training report), ``train/sweep/trials.json`` the table.

    :param trials: the ``sweep_trials`` result (XCom). (templated)
    :param snapshot: the ``collect_data`` result (XCom). (templated)
    :param sweep: the model's ``sweep:`` entry.
    :param trial_task_id: the mapped trial task.
    :param model_name: registered model name = MLflow experiment. (templated)
    :raises SweepFailed: more trials failed than ``max_failed`` tolerates (lists each failure).
    """

    template_fields: Sequence[str] = ("trials", "snapshot", "model_name")
    store_inputs: Sequence[str] = ("snapshot",)
    #: Nothing before ``execute``: which files it reads is known only there (the failed trials'
    #: ``trial.json``, the winner's checkpoint and manifest), and those alone are fetched then
    #: (:meth:`~nightshift.operators.base.NightshiftOperator.fetch_input`), not every trial's folder.
    run_folder_reads: Sequence[str] = ()
    ui_color = "#a5d6a7"
    operator_extra_links = (MLflowRunLink(),)

    def __init__(self, *, trials: Any, snapshot: Any, sweep: dict[str, Any], trial_task_id: str,
                 model_name: str = "nightshift-classifier", **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "all_done")
        super().__init__(**kwargs)
        self.trials = trials
        self.snapshot = snapshot
        self.sweep = sweep
        self.trial_task_id = trial_task_id
        self.model_name = model_name

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift.errors import ConfigError
        from nightshift.sweep import SweepFailed, parse_sweep

        spec = parse_sweep(self.sweep)
        trials = self.trials
        if not isinstance(trials, list) or not trials:
            # this task runs on all_done: also when the trials task failed or never ran (an upstream
            # task failed). Failing (not skipping) keeps the DAG run failed and nothing downstream runs
            raise ConfigError(f"no trial list (got {trials!r}): the trials task failed or did not run because an "
                              "upstream task failed; see that task's log")
        parent = str(trials[0]["parent_run_id"])
        records, results = self._collect(context, trials)
        for r in records:
            self.log.info("trial %s: %s", r["trial"], f"FAILED {r['error']}" if r["failed"] else
                          f"{spec.metric}={(r['metrics'] or {}).get(spec.metric)} (run {r['run_id']})")
        table = [{k: v for k, v in r.items()} for r in records]
        try:
            best = spec.select_best(records)
        except SweepFailed as exc:
            self._close(parent, table, None, spec.metric, error=str(exc), context=context)
            raise
        winner = self._fetch_winner(results[int(best["trial"])])
        test = self._score_on_test(winner)
        metrics = {**winner["metrics"], **test}
        self._record_winner(context, winner, metrics)
        failed = [r["trial"] for r in records if r["failed"]]
        self.log.info("Winner: trial %s (%s=%.4f; test accuracy %.4f) of %d (%d failed: %s); MLflow run %s",
                      best["trial"], spec.metric, best["metrics"][spec.metric], metrics["test_accuracy"],
                      len(records), len(failed), failed, winner["run_id"])
        self._close(parent, table, {**best, "metrics": metrics}, spec.metric, context=context)
        out = {k: winner[k] for k in ("run_id", "checkpoint", "device", "train_dir", "data_digest")}
        return {**out, "metrics": metrics,
                "sweep": {"parent_run_id": parent, "trial": int(best["trial"]), "hparams": best["hparams"],
                          "metric": spec.metric, "trials": len(records), "failed": failed}}

    def _collect(self, context: Any, trials: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[int, Any]]:
        """One record per trial (``trial``, ``hparams``, ``failed``, ``error``, ``metrics``,
        ``run_id``) and the successful trials' results by index."""
        ti = context["ti"]
        records, results = [], {}
        for t in trials:
            i = int(t["trial"])
            value = ti.xcom_pull(task_ids=self.trial_task_id, map_indexes=i)
            rec = {"trial": i, "hparams": t["hparams"], "failed": True, "error": None, "metrics": None,
                   "run_id": None}
            if isinstance(value, dict) and value.get("checkpoint"):
                results[i] = value
                rec.update(failed=False, metrics=value.get("metrics") or {}, run_id=value.get("run_id"))
            else:
                rec["error"] = self._failure(context, i)
            records.append(rec)
        return records, results

    def _fetch_winner(self, winner: dict[str, Any]) -> dict[str, Any]:
        """The winner's result with this worker's copies of what is read of it: its checkpoint (scored
        on the test split) and its ``train_manifest.json`` (the run's training report); the rest of
        its folder (``last.pt``, plots) is not fetched. ``train_dir`` becomes its local path."""
        from nightshift.contracts import TRAIN_MANIFEST_FILE

        if not self.store.remote:
            return winner
        train_dir = self.store.to_uri(winner["train_dir"])
        self.fetch_input(f"{train_dir.rstrip('/')}/{TRAIN_MANIFEST_FILE}", required=False)
        return {**winner, "checkpoint": str(self.fetch_input(winner["checkpoint"])),
                "train_dir": str(self.store.to_local(train_dir))}

    def _failure(self, context: Any, index: int) -> str:
        """Why trial ``index`` has no result: the error in its ``trial.json``, else a pointer to its log."""
        path = self.run_dir(context, *trial_dir_parts(index)) / TRIAL_RECORD
        if self.store.remote:
            self.fetch_input(self.store.to_uri(path), required=False)
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            rec = None
        if isinstance(rec, dict) and rec.get("failed"):
            return str(rec.get("error") or "failed")
        return (f"no result: the task {self.trial_task_id}[{index}] ended without one (not run, or stopped); "
                "see its log")

    def _score_on_test(self, winner: dict[str, Any]) -> dict[str, float]:
        """The winner's ``test_*`` metrics: the first read of the test split in the sweep."""
        from nightshift.data.snapshot import fetch_snapshot, load_snapshot
        from nightshift.training import evaluate_checkpoint

        snapshot_uri = self.require(self.snapshot, "snapshot", "collect_data")["snapshot_uri"]
        snap = load_snapshot(fetch_snapshot(self.store, snapshot_uri))
        res = evaluate_checkpoint(snap, winner["checkpoint"], "test")
        self._confusion = res.pop("confusion")
        return {k: float(v) for k, v in res.items()}

    def _record_winner(self, context: Any, winner: dict[str, Any], metrics: dict[str, float]) -> None:
        """The winner's test metrics on its MLflow run; its manifest (with them and the test
        confusion matrix) as the run's training report, ``train/train_manifest.json``."""
        from pathlib import Path

        from nightshift import registry
        from nightshift.artifacts import atomic_write_json
        from nightshift.contracts import TRAIN_MANIFEST_FILE

        c = self.mlflow
        registry.log_metrics(c, winner["run_id"], {k: v for k, v in metrics.items() if k.startswith("test_")})
        c.set_tag(winner["run_id"], "nightshift.sweep_winner", "true")
        manifest_path = Path(winner["train_dir"]) / TRAIN_MANIFEST_FILE
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            manifest = {}
        manifest.update({"metrics": metrics, "confusion_matrix": self._confusion, "confusion_split": "test",
                         "sweep_trial": winner.get("trial"), "trial_dir": str(winner["train_dir"])})
        atomic_write_json(self.run_dir(context, "train") / TRAIN_MANIFEST_FILE, manifest)

    def _close(self, parent: str, table: list[dict[str, Any]], winner: dict[str, Any] | None, metric: str, *,
               context: Any, error: str | None = None) -> None:
        from nightshift.train_run import close_sweep_parent

        close_sweep_parent(self.mlflow, parent, table, winner=winner, out_dir=self.run_dir(context, *SWEEP_DIR),
                           metric=metric, error=error)


class SweepGroup(TaskGroup):
    """The sweep's task group; its ``.output`` is its reduce task's (``select_trial``), so it
    stands where a ``train_gpu`` operator stood (``export(training=train.output)``)."""

    select: Any = None

    @property
    def output(self) -> Any:
        return self.select.output


def sweep_train(placement: "TrainPlacement", *, sweep: dict[str, Any], task_id: str = "train_gpu", snapshot: Any,
                model_name: str, hparams: dict[str, Any] | None, require_gpu: Any = False,
                pool: str = "nightshift_gpu", **rest: Any) -> Any:
    """``train_gpu`` as a sweep: :func:`nightshift.operators.train.train_task`'s arguments plus
    ``sweep`` (the model's ``sweep:`` entry, validated now: a bad entry is an import error naming
    the field). Returns the task group ``sweep_trials ─► <task_id> [mapped] ─► select_trial``;
    its ``.output`` is ``select_trial``'s (the winner, in ``train_gpu``'s XCom shape), and
    ``upstream >> group`` / ``group >> downstream`` wire the group's first and last tasks.

    :param rest: more ``BaseOperator`` arguments for the trials (``retries``, ``retry_delay`` ...).
    :raises ConfigError: a malformed ``sweep``, or the ``kubernetes_pod`` placement.
    """
    from nightshift.errors import ConfigError
    from nightshift.sweep import parse_sweep

    spec = parse_sweep(sweep)
    if placement.kind == "kubernetes_pod":
        raise ConfigError("a sweep cannot run with NIGHTSHIFT_TRAIN_PLACEMENT=kubernetes_pod yet (the trainer pod "
                          "has no trial mode); use local, celery or kubernetes_executor, or drop the model's sweep")
    names = (("sweep_trials", "select_trial") if task_id == "train_gpu"
             else (f"{task_id}_sweep_trials", f"{task_id}_select_trial"))
    with SweepGroup(group_id=f"{task_id}_sweep", prefix_group_id=False,
                    tooltip=f"{spec.method} sweep of {spec.size()} trials, winner by {spec.metric}") as group:
        trials = SweepTrialsOperator(task_id=names[0], sweep=spec.raw, hparams=hparams, model_name=model_name)
        mapped = SweepTrialOperator.partial(
            task_id=task_id, snapshot=snapshot, model_name=model_name, require_gpu=require_gpu, pool=pool,
            max_active_tis_per_dagrun=spec.max_parallel, **placement.operator_kwargs(), **rest,
        ).expand_kwargs(trials.output)
        select = SelectTrialOperator(task_id=names[1], trials=trials.output, snapshot=snapshot, sweep=spec.raw,
                                     trial_task_id=task_id, model_name=model_name)
        mapped >> select
    group.select = select
    return group

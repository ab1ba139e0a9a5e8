from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import MLflowRunLink

if TYPE_CHECKING:
    from nightshift.placement import TrainPlacement


class TrainGPUOperator(NightshiftOperator):
    """Train the classifier on a snapshot: CUDA when present, else CPU.

    Params and per-epoch metrics go to MLflow; the checkpoint, a run manifest
    (versions, seed, data digest, device) and plots (training curves, confusion
    matrix) go to the run's artifact folder and to the MLflow run, the snapshot
    is recorded as the run's dataset input (:mod:`nightshift.train_run`).

    Where it runs is the DAG's business (``queue``, ``executor_config``: see
    :func:`train_task`); :class:`~nightshift.operators.train_pod.TrainGPUPodOperator`
    runs the same training in a pod of its own.

    With an object-store artifact root the snapshot is fetched into this worker's working copy,
    and ``last.pt`` is published after every epoch: a retry on another worker gets it with the
    run folder (:func:`~nightshift.operators.base._sync_store`) and resumes from that epoch.

    :param snapshot: the ``collect_data`` result (XCom). (templated)
    :param hparams: overrides of ``nightshift.training.DEFAULT_HPARAMS``
        (``epochs``, ``model``, ``lr`` ...). (templated)
    :param require_gpu: fail instead of falling back to CPU when no GPU is visible. (templated)
    :param model_name: registered model name; also the MLflow experiment name. (templated)
    :param data_parallel: processes for data-parallel training (DDP, one per GPU) under
        ``torchrun``: ``"auto"`` uses every GPU the worker sees when it sees more than one,
        else trains in this process; an integer asks for exactly that many (``1``: in
        process; more than one on a CPU worker trains with Gloo, for tests). (templated)
    """

    template_fields: Sequence[str] = ("snapshot", "hparams", "require_gpu", "model_name", "data_parallel")
    #: what of the run folder it reads (fetched first on an object store): its own (an earlier try's last.pt)
    run_folder_reads: Sequence[str] = ("train",)
    ui_color = "#c8e6c9"
    operator_extra_links = (MLflowRunLink(),)

    def __init__(self, *, snapshot: Any, hparams: dict[str, Any] | None = None, require_gpu: bool = False,
                 model_name: str = "nightshift-classifier", data_parallel: int | str = "auto",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_parallel = data_parallel
        self._proc: Any = None
        self.snapshot = snapshot
        self.hparams = hparams
        self.require_gpu = require_gpu
        self.model_name = model_name
        self._stop = False

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift.data.snapshot import fetch_snapshot
        from nightshift.settings import to_bool
        from nightshift.train_run import default_artifact_location, run_training
        from nightshift.training import LAST_CHECKPOINT

        snap_info = self.require(self.snapshot, "snapshot", "collect_data")
        snapshot_uri = str(snap_info["snapshot_uri"])
        # the snapshot's local copy (fetched on an object store); a retry elsewhere got this run's
        # last.pt with the run folder before execute, so it resumes where the last try stopped
        snapshot_path = fetch_snapshot(self.store, snapshot_uri)
        nproc = self._processes()
        if nproc > 1:
            return self._torchrun(context, snapshot_uri, nproc, snapshot_path)
        out_dir = self.run_dir(context, "train")
        return run_training(
            self.mlflow, snapshot_uri, out_dir, self.hparams,
            model_name=self.model_name, run_name=f"{context['run_id']}", require_gpu=to_bool(self.require_gpu),
            tags={"nightshift.dag_id": self.dag_id, "nightshift.run_id": context["run_id"],
                  "nightshift.task": self.task_id, **try_tag(context)},
            artifact_location=default_artifact_location(self.settings.mlflow_tracking_uri, self.settings.home),
            should_stop=lambda: self._stop, log=self.log, snapshot_path=snapshot_path,
            after_epoch=lambda epoch: self._publish_resume_state(out_dir / LAST_CHECKPOINT),
        )

    def _publish_resume_state(self, last: Any) -> None:
        """Publish ``last.pt`` after an epoch (object store): a retry on another worker resumes
        from it. A failed upload is logged, not fatal: the next epoch tries again."""
        if not self.store.remote or not last.is_file():
            return
        from nightshift.store import StoreError

        try:
            for _ in range(3):  # torchrun writes it from another process: publish until it held still
                before = _identity(last)
                self.publish(last)
                if _identity(last) == before:
                    break
        except StoreError as exc:
            self.log.warning("could not publish the resume checkpoint %s (a retry elsewhere starts from an earlier "
                             "epoch): %s", last, exc)

    def _processes(self) -> int:
        from nightshift.settings import positive_int

        value = str(self.data_parallel).strip().lower()
        if value in ("", "auto", "none"):
            from nightshift.distributed import gpu_count

            return max(1, gpu_count())
        return positive_int(value, "data_parallel", "'auto' or a positive integer")

    def _torchrun(self, context: Any, snapshot_uri: str, nproc: int, snapshot_path: Any = None) -> dict[str, Any]:
        """Train with ``torchrun --nproc_per_node=nproc -m nightshift.train_cli``; rank 0 records the
        MLflow run and writes the result this task returns."""
        import json
        import os
        import subprocess
        from pathlib import Path

        import nightshift
        from nightshift.distributed import launch_command
        from nightshift.errors import ConfigError, TrainingProcessFailed
        from nightshift.settings import to_bool
        from nightshift.training import LAST_CHECKPOINT

        out_dir = self.run_dir(context, "train")
        result_path = out_dir / "train_result.json"
        result_path.unlink(missing_ok=True)
        args = ["--snapshot-uri", snapshot_uri, "--out-dir", str(out_dir),
                "--hparams", json.dumps(dict(self.hparams or {})), "--model-name", self.model_name,
                "--run-name", str(context["run_id"]), "--result-path", str(result_path),
                "--tag", f"nightshift.dag_id={self.dag_id}", "--tag", f"nightshift.run_id={context['run_id']}",
                "--tag", f"nightshift.task={self.task_id}", *(a for k, v in try_tag(context).items()
                                                              for a in ("--tag", f"{k}={v}"))]
        if snapshot_path is not None and str(snapshot_path) != snapshot_uri:
            args += ["--snapshot-path", str(snapshot_path)]
        if to_bool(self.require_gpu):
            args.append("--require-gpu")
        plugins = str(Path(nightshift.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (plugins, os.environ.get("PYTHONPATH")) if p)}
        cmd = launch_command(nproc, args)
        self.log.info("Data-parallel training on %d processes: %s", nproc, " ".join(cmd))
        self._proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True)
        tail: list[str] = []
        last = out_dir / LAST_CHECKPOINT
        seen = _identity(last)
        for line in self._proc.stdout:
            line = line.rstrip()
            self.log.info("%s", line)
            tail = (tail + [line])[-40:]
            if self.store.remote and _identity(last) != seen:  # an epoch ended: publish its last.pt
                seen = _identity(last)
                self._publish_resume_state(last)
        code = self._proc.wait()
        if code == 0 and result_path.is_file():
            return json.loads(result_path.read_text())
        import re

        detail = "\n".join(tail[-15:])
        # train_cli exits 2 on a configuration or data error (on any rank; torchrun reports each
        # rank's exit code): a retry cannot help
        if code == 2 or any(re.search(r"exitcode\s*:\s*2\b", t) for t in tail):
            raise ConfigError(f"data-parallel training failed on a configuration or data error:\n{detail}")
        raise TrainingProcessFailed(f"data-parallel training failed (torchrun exit {code}); a retry resumes "
                                    f"from the last epoch's last.pt:\n{detail}")

    def on_kill(self) -> None:
        self._stop = True
        if self._proc is not None and self._proc.poll() is None:
            import os
            import signal

            os.killpg(self._proc.pid, signal.SIGTERM)  # torchrun forwards it to every rank


def try_tag(context: Any) -> dict[str, str]:
    """The MLflow tag naming this try of the task (``nightshift.try_number``), so that a later try can
    end the run a killed one left RUNNING (:func:`nightshift.train_run.end_superseded_tries`);
    empty outside a task instance (a direct ``execute`` in a test)."""
    from nightshift.train_run import TRY_TAG

    number = getattr(context.get("ti"), "try_number", None)
    return {TRY_TAG: str(number)} if number is not None else {}


def _identity(path: Any) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def train_task(placement: "TrainPlacement", **common: Any) -> Any:
    """The ``train_gpu`` task placed as configured (:class:`nightshift.placement.TrainPlacement`).

    ``local``/``celery``/``kubernetes_executor`` give a :class:`TrainGPUOperator` with the
    placement's ``queue``, ``executor`` and GPU ``executor_config``; ``kubernetes_pod`` gives a
    :class:`~nightshift.operators.train_pod.TrainGPUPodOperator` (imported only then: the
    provider's pod operator is slow to import). Both take the same ``common`` arguments
    (``task_id``, ``snapshot``, ``hparams``, ``require_gpu``, ``model_name``, ``pool`` ...) and
    push the same XCom.
    """
    if placement.kind == "kubernetes_pod":
        from nightshift.operators.train_pod import TrainGPUPodOperator

        extra = {"executor": placement.executor} if placement.executor else {}
        return TrainGPUPodOperator(image=placement.image, gpus=placement.gpus, node_selector=placement.node_selector,
                                   tolerations=placement.tolerations, memory=placement.memory, cpu=placement.cpu,
                                   artifact_pvc=placement.artifact_pvc, namespace=placement.namespace,
                                   **extra, **common)
    return TrainGPUOperator(**placement.operator_kwargs(), **common)

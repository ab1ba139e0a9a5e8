"""``train_gpu`` in a pod of its own: the provider's KubernetesPodOperator running
``python -m nightshift.train_cli`` on a GPU node.

Importing this module imports the cncf-kubernetes provider's pod operator (seconds):
the DAG imports it only when ``NIGHTSHIFT_TRAIN_PLACEMENT=kubernetes_pod``
(:func:`nightshift.operators.train.train_task`).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

from nightshift.operators.base import NightshiftOperator, _fail_fast
from nightshift.operators.links import MLflowRunLink
from nightshift.placement import artifact_volume, gpu_resources, k8s_tolerations
from nightshift.train_cli import XCOM_RETURN_PATH

#: Variables passed from the worker's environment into the training pod (when set there).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "NIGHTSHIFT_HOME", "NIGHTSHIFT_ARTIFACT_ROOT")
#: With an object-store artifact root, also these (where the store is; never its keys).
FORWARDED_S3_ENV = ("NIGHTSHIFT_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
                    "AWS_REGION")
#: The training pod's working copy of an object-store artifact root (a pod's own disk).
POD_ARTIFACT_CACHE = "/tmp/nightshift-artifact-cache"


class TrainGPUPodOperator(KubernetesPodOperator):
    """Train the classifier in a pod of its own, on a GPU node, and push the same XCom as
    :class:`~nightshift.operators.train.TrainGPUOperator`.

    The pod runs ``python -m nightshift.train_cli --snapshot-uri … --out-dir … --hparams '<json>'
    [--require-gpu] --result-path /airflow/xcom/return.json`` in ``image``; the provider's XCom
    sidecar returns that JSON (``do_xcom_push`` is always on). The CLI logs to the MLflow server
    named by ``MLFLOW_TRACKING_URI`` (forwarded from the worker, with ``MLFLOW_REGISTRY_URI``,
    ``NIGHTSHIFT_HOME`` and ``NIGHTSHIFT_ARTIFACT_ROOT``). With a local artifact root it must be
    the same path for the workers and the pod: ``artifact_pvc`` is mounted at the worker's
    ``NIGHTSHIFT_ARTIFACT_ROOT`` (unless ``artifact_mount_path`` says otherwise). With an
    ``s3://`` root nothing is mounted: the pod reads the snapshot from and writes ``train/``
    (``last.pt`` after every epoch) to the object store itself, given the root, the endpoint and
    region (from the worker's environment or the ``NIGHTSHIFT_ARTIFACT_CONN_ID`` connection) and
    the keys from the Kubernetes Secret ``artifact_secret`` (its ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` as environment); without one the pod's own identity (e.g. its
    service account's IAM role) must reach the bucket. The worker's keys never go into the pod spec.

    The command line, environment and volumes are built when the pod is (after templates are
    rendered, so ``snapshot`` may be ``collect_data.output``); ``dry_run()`` prints the pod
    without a cluster.

    :param snapshot: the ``collect_data`` result (XCom). (templated)
    :param hparams: overrides of ``nightshift.training.DEFAULT_HPARAMS``. (templated)
    :param require_gpu: fail (exit 2, no retry) when no CUDA device is visible in the pod. (templated)
    :param model_name: registered model name; also the MLflow experiment name. (templated)
    :param image: the trainer image: Nightshift's plugins and CUDA-enabled torch (the project's
        ``Dockerfile`` builds one). (templated)
    :param gpus: ``nvidia.com/gpu`` limit.
    :param node_selector: node labels the pod must match. (templated)
    :param tolerations: toleration dicts (``key``, ``operator``, ``value``, ``effect``).
    :param memory: memory request and limit, e.g. ``16Gi``.
    :param cpu: CPU request, e.g. ``4``.
    :param artifact_pvc: PersistentVolumeClaim that holds the artifact root; ``None`` mounts
        nothing (the image or a pod template provides the artifact root).
    :param artifact_mount_path: where the claim is mounted; default the worker's
        ``NIGHTSHIFT_ARTIFACT_ROOT``.
    :param artifact_secret: with an ``s3://`` artifact root, the Secret whose keys become the pod's
        environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``); default
        ``$NIGHTSHIFT_ARTIFACT_SECRET`` of the worker.
    :param env: more environment variables for the pod (after the forwarded ones). (templated)
    :param kwargs: any other :class:`KubernetesPodOperator` argument (``namespace``,
        ``service_account_name``, ``secrets``, ``image_pull_secrets`` ...).
    """

    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "snapshot", "hparams", "require_gpu",
                                      "model_name", "env")
    ui_color = "#c8e6c9"
    operator_extra_links = (MLflowRunLink(),)

    def __init__(self, *, snapshot: Any, image: str, hparams: dict[str, Any] | None = None,
                 require_gpu: bool | str = False, model_name: str = "nightshift-classifier", gpus: int = 1,
                 node_selector: dict[str, str] | None = None, tolerations: list[dict[str, Any]] | None = None,
                 memory: str | None = None, cpu: str | None = None, artifact_pvc: str | None = None,
                 artifact_mount_path: str | None = None, env: dict[str, str] | None = None,
                 artifact_secret: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("name", "train-gpu")
        kwargs.setdefault("labels", {"app.kubernetes.io/part-of": "nightshift",
                                     "app.kubernetes.io/component": "train"})
        kwargs.setdefault("get_logs", True)
        # one process per GPU (DDP) when the pod gets several; rank 0 writes the XCom result
        cmds = (["python", "-m", "nightshift.train_cli"] if int(gpus) <= 1 else
                ["torchrun", "--standalone", f"--nproc_per_node={int(gpus)}", "-m", "nightshift.train_cli"])
        super().__init__(image=image, cmds=cmds, do_xcom_push=True,
                         container_resources=gpu_resources(gpus, memory=memory, cpu=cpu),
                         node_selector=node_selector or {}, tolerations=k8s_tolerations(tolerations), **kwargs)
        self.snapshot = snapshot
        self.hparams = hparams
        self.require_gpu = require_gpu
        self.model_name = model_name
        self.gpus = gpus
        self.artifact_pvc = artifact_pvc
        self.artifact_mount_path = artifact_mount_path
        self.artifact_secret = artifact_secret
        self.env = env or {}

    def cli_arguments(self, run_id: str, context: Any = None) -> list[str]:
        """The ``train_cli`` arguments for the rendered ``snapshot``/``hparams``/``require_gpu``.

        ``context``'s task instance gives the try number (``--tag nightshift.try_number=<try>``, as
        the in-worker path tags its run): a retry's pod then ends the MLflow run a killed pod left
        RUNNING naming the try that superseded it, instead of ``unknown``."""
        from nightshift.artifacts import run_dir, run_path
        from nightshift.operators.train import try_tag
        from nightshift.settings import Settings, to_bool
        from nightshift.store import is_remote

        snap_info = NightshiftOperator.require(self.snapshot, "snapshot", "collect_data")
        settings = Settings.from_env()
        if is_remote(settings.artifact_uri):  # the pod fetches and publishes through the store: URIs
            out_dir: Any = settings.store().to_uri(run_path(settings.artifact_root, self.dag_id, run_id) / "train")
        else:
            out_dir = run_dir(settings.artifact_root, self.dag_id, run_id) / "train"
        args = ["--snapshot-uri", str(snap_info["snapshot_uri"]), "--out-dir", str(out_dir),
                "--hparams", json.dumps(dict(self.hparams or {}), default=str), "--model-name", str(self.model_name),
                "--run-name", run_id, "--result-path", XCOM_RETURN_PATH,
                "--tag", f"nightshift.dag_id={self.dag_id}", "--tag", f"nightshift.run_id={run_id}",
                "--tag", f"nightshift.task={self.task_id}",
                *(a for k, v in try_tag(context or {}).items() for a in ("--tag", f"{k}={v}"))]
        if to_bool(self.require_gpu):
            args.append("--require-gpu")
        return args

    def pod_env(self) -> dict[str, str]:
        """Forwarded ``FORWARDED_ENV`` (from this worker) + ``env``."""
        import os

        from nightshift.settings import Settings
        from nightshift.store import is_remote

        settings = Settings.from_env()
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        if is_remote(settings.artifact_uri):
            from nightshift.operators.base import artifact_s3_options

            env["NIGHTSHIFT_ARTIFACT_ROOT"] = settings.artifact_uri
            env["NIGHTSHIFT_ARTIFACT_CACHE"] = POD_ARTIFACT_CACHE
            env.update({k: os.environ[k] for k in FORWARDED_S3_ENV if os.environ.get(k)})
            conn = artifact_s3_options()  # the connection's endpoint and region (its keys: artifact_secret)
            if conn is not None:
                env.update({k: v for k, v in (("NIGHTSHIFT_S3_ENDPOINT_URL", conn.endpoint_url),
                                              ("AWS_DEFAULT_REGION", conn.region_name)) if v})
        env.setdefault("NIGHTSHIFT_ARTIFACT_ROOT", str(settings.artifact_root))
        env.setdefault("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri)
        env["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
        env["PYTHONUNBUFFERED"] = "1"
        env.update({k: str(v) for k, v in (self.env or {}).items()})
        return env

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False):
        from nightshift.settings import Settings
        from nightshift.store import is_remote

        run_id = str(context["run_id"]) if context and context.get("run_id") else "dry_run"
        self.arguments = self.cli_arguments(run_id, context)
        self.env_vars = self.pod_env()
        if is_remote(Settings.from_env().artifact_uri):
            import os

            from kubernetes.client import models as k8s

            secret = self.artifact_secret or os.environ.get("NIGHTSHIFT_ARTIFACT_SECRET") or None
            if secret:
                self.env_from = [e for e in self.env_from if getattr(getattr(e, "secret_ref", None), "name", None)
                                 != secret] + [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret))]
            else:
                self.log.warning("object-store artifact root without artifact_secret / NIGHTSHIFT_ARTIFACT_SECRET: the "
                                 "training pod reaches the bucket with its own identity (service account)")
            if self.artifact_pvc:
                self.log.info("artifact_pvc %s is not mounted: the artifact root is %s", self.artifact_pvc,
                              Settings.from_env().artifact_uri)
        elif self.artifact_pvc:
            volume, mount = artifact_volume(self.artifact_pvc,
                                            self.artifact_mount_path or str(Settings.from_env().artifact_root))
            self.volumes = [v for v in self.volumes if getattr(v, "name", None) != volume.name] + [volume]
            self.volume_mounts = [m for m in self.volume_mounts if getattr(m, "name", None) != mount.name] + [mount]
        return super().build_pod_request_obj(context, dry_run=dry_run)

    @_fail_fast
    def execute(self, context: Any) -> Any:
        return super().execute(context)

    def cleanup(self, pod: Any, remote_pod: Any, xcom_result: dict | None = None, context: Any = None) -> None:
        """The provider's cleanup; a pod whose ``train_cli`` exited 2 (a configuration or data
        error: bad hyperparameters, unreadable snapshot, no GPU, diverged loss) fails the task
        without retries, as :class:`TrainGPUOperator` does; other failures keep the retries."""
        try:
            super().cleanup(pod, remote_pod, xcom_result=xcom_result, context=context)
        except Exception as exc:
            from airflow.sdk.exceptions import (
                AirflowFailException,
                AirflowSkipException,
            )

            from nightshift.train_cli import EXIT_CONFIG

            if isinstance(exc, AirflowSkipException) or exit_code(remote_pod, self.base_container_name) != EXIT_CONFIG:
                raise
            raise AirflowFailException(
                f"train_cli exited {EXIT_CONFIG}: a configuration or data error, which a retry cannot fix "
                f"(the reason is in the pod's log above). {exc}") from exc


def exit_code(remote_pod: Any, container: str) -> int | None:
    """The exit code of ``container`` in a finished pod, or ``None``."""
    statuses = (remote_pod.status.container_statuses if remote_pod is not None and remote_pod.status else None) or []
    status = next((s for s in statuses if s.name == container), None)
    terminated = status.state.terminated if status is not None and status.state is not None else None
    return terminated.exit_code if terminated is not None else None

"""Where tasks run: ``train_gpu`` (:class:`TrainPlacement`) and the Docker-bound tasks
(:class:`DockerPlacement`); configuration in, task arguments and pod specs out.

Airflow-free. :meth:`TrainPlacement.from_env` and :meth:`DockerPlacement.from_env` read
only environment variables (cheap, no I/O), so the DAGs may call them at parse time. The Kubernetes client
models are imported inside the functions that build pod objects (importing
them takes about half a second), and the DAG calls those only when a
Kubernetes placement is configured.

=====================================  ==================================================================
variable                               meaning
=====================================  ==================================================================
``NIGHTSHIFT_TRAIN_PLACEMENT``         ``local`` (default) | ``celery`` | ``kubernetes_executor`` |
                                       ``kubernetes_pod``
``NIGHTSHIFT_GPU_QUEUE``               Celery queue of the GPU workers (``celery``; default ``default``)
``NIGHTSHIFT_TRAIN_EXECUTOR``          executor alias for the task when several executors are configured
                                       (e.g. ``KubernetesExecutor``); unset: the default executor
``NIGHTSHIFT_GPU_COUNT``               ``nvidia.com/gpu`` limit of the training pod (default 1)
``NIGHTSHIFT_GPU_NODE_SELECTOR``       JSON object, e.g. ``{"nvidia.com/gpu.present": "true"}``
``NIGHTSHIFT_GPU_TOLERATIONS``         JSON list of tolerations, e.g.
                                       ``[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]``
``NIGHTSHIFT_TRAIN_MEMORY``            memory request = limit of the training pod, e.g. ``16Gi`` (optional)
``NIGHTSHIFT_TRAIN_CPU``               CPU request of the training pod, e.g. ``4`` (optional)
``NIGHTSHIFT_TRAINER_IMAGE``           image of the training pod (``kubernetes_pod``: required;
                                       ``kubernetes_executor``: optional, default the worker image)
``NIGHTSHIFT_ARTIFACT_PVC``            PersistentVolumeClaim holding the artifact root, mounted in the
                                       training pod at ``NIGHTSHIFT_ARTIFACT_ROOT`` (``kubernetes_pod``)
``NIGHTSHIFT_K8S_NAMESPACE``           namespace of the training pod (``kubernetes_pod``; default: the
                                       ``kubernetes_default`` connection's, else ``default``)
``NIGHTSHIFT_DOCKER_QUEUE``            Celery queue of the worker(s) next to the Docker daemon: the build,
                                       system evaluation, approval check, set-champion and deploy tasks
                                       go there; unset: Airflow's default queue (``[operators]
                                       default_queue``), as every other task
``NIGHTSHIFT_DOCKER_CONN_ID``          Airflow connection of the Docker daemon (and registry login) every
                                       Docker call uses, read on the worker when the task runs; unset:
                                       the worker's environment (``DOCKER_HOST`` or the local socket)
=====================================  ==================================================================
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from nightshift.errors import ConfigError
from nightshift.settings import positive_int

PLACEMENTS = ("local", "celery", "kubernetes_executor", "kubernetes_pod")
GPU_RESOURCE = "nvidia.com/gpu"
#: The container name the KubernetesExecutor's pod template and ``pod_override`` merge on.
BASE_CONTAINER = "base"

_TOLERATION_KEYS = {"key", "operator", "value", "effect", "toleration_seconds", "tolerationSeconds"}
_TOLERATION_OPERATORS = ("Exists", "Equal")
_TOLERATION_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")
# Kubernetes resource quantities: 4, 0.5, 500m, 16Gi, 1e9 ...
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?([eE][0-9]+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
# a Celery queue name / an Airflow connection id: one word, no spaces or commas
_QUEUE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]*$")
_CONN_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TrainPlacement:
    """Where and with what the training task runs. Build it with :meth:`from_env`."""

    kind: str = "local"
    queue: str = "default"
    executor: str | None = None
    gpus: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    memory: str | None = None
    cpu: str | None = None
    image: str | None = None
    artifact_pvc: str | None = None
    namespace: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "TrainPlacement":
        """Parse and validate the ``NIGHTSHIFT_*`` placement variables (see the module docstring).

        :raises ConfigError: a value is malformed; the message names the variable.
        """
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            return _env_value(env, name)

        kind = (get("NIGHTSHIFT_TRAIN_PLACEMENT") or "local").lower()
        if kind not in PLACEMENTS:
            raise ConfigError(f"NIGHTSHIFT_TRAIN_PLACEMENT={kind!r}: expected one of {list(PLACEMENTS)}")
        gpus = positive_int(get("NIGHTSHIFT_GPU_COUNT") or "1", "NIGHTSHIFT_GPU_COUNT",
                            "a whole number of GPUs, at least 1")
        for name in ("NIGHTSHIFT_TRAIN_MEMORY", "NIGHTSHIFT_TRAIN_CPU"):
            if get(name) and not _QUANTITY.match(get(name) or ""):
                raise ConfigError(f"{name}={get(name)!r}: expected a Kubernetes quantity such as 16Gi, 4 or 500m")
        for name in ("NIGHTSHIFT_ARTIFACT_PVC", "NIGHTSHIFT_K8S_NAMESPACE"):
            if get(name) and not _K8S_NAME.match(get(name) or ""):
                raise ConfigError(f"{name}={get(name)!r}: expected a Kubernetes name (lower-case letters, "
                                  "digits, '-' and '.')")
        placement = cls(
            kind=kind,
            queue=get("NIGHTSHIFT_GPU_QUEUE") or "default",
            executor=get("NIGHTSHIFT_TRAIN_EXECUTOR"),
            gpus=gpus,
            node_selector=_node_selector(get("NIGHTSHIFT_GPU_NODE_SELECTOR")),
            tolerations=_tolerations(get("NIGHTSHIFT_GPU_TOLERATIONS")),
            memory=get("NIGHTSHIFT_TRAIN_MEMORY"),
            cpu=get("NIGHTSHIFT_TRAIN_CPU"),
            image=get("NIGHTSHIFT_TRAINER_IMAGE"),
            artifact_pvc=get("NIGHTSHIFT_ARTIFACT_PVC"),
            namespace=get("NIGHTSHIFT_K8S_NAMESPACE"),
        )
        if kind == "kubernetes_pod" and not placement.image:
            raise ConfigError("NIGHTSHIFT_TRAINER_IMAGE is not set: NIGHTSHIFT_TRAIN_PLACEMENT=kubernetes_pod runs "
                              "training in a pod of that image (the project's Dockerfile builds one)")
        return placement

    def operator_kwargs(self) -> dict[str, Any]:
        """BaseOperator arguments for the ``local``/``celery``/``kubernetes_executor`` placements:
        ``queue``, ``executor`` and, for ``kubernetes_executor``, ``executor_config`` with a GPU
        ``pod_override`` (this imports the Kubernetes client models)."""
        kwargs: dict[str, Any] = {}
        if self.kind == "celery":
            kwargs["queue"] = self.queue
        if self.executor:
            kwargs["executor"] = self.executor
        if self.kind == "kubernetes_executor":
            kwargs["executor_config"] = {"pod_override": gpu_pod_override(
                gpus=self.gpus, node_selector=self.node_selector, tolerations=self.tolerations,
                image=self.image, memory=self.memory, cpu=self.cpu)}
        return kwargs


@dataclass(frozen=True)
class DockerPlacement:
    """Where the Docker-bound tasks run and which daemon they talk to. Build it with :meth:`from_env`.

    :param queue: the Celery queue of the worker(s) that have the daemon; ``None``: Airflow's
        default queue (nothing changes; the LocalExecutor ignores queues anyway).
    :param conn_id: the Airflow connection of the daemon; ``None``: the environment's daemon.
    """

    queue: str | None = None
    conn_id: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DockerPlacement":
        """Parse ``NIGHTSHIFT_DOCKER_QUEUE`` and ``NIGHTSHIFT_DOCKER_CONN_ID`` (see the module docstring).

        :raises ConfigError: a value is malformed; the message names the variable.
        """
        env = os.environ if env is None else env
        values: dict[str, str | None] = {}
        for name, pattern, what in (("NIGHTSHIFT_DOCKER_QUEUE", _QUEUE, "one Celery queue name"),
                                    ("NIGHTSHIFT_DOCKER_CONN_ID", _CONN_ID, "an Airflow connection id")):
            value = _env_value(env, name)
            if value is not None and not pattern.match(value):
                raise ConfigError(f"{name}={value!r}: expected {what} (letters, digits, '_', '-', '.'; "
                                  "no spaces or commas)")
            values[name] = value
        return cls(queue=values["NIGHTSHIFT_DOCKER_QUEUE"], conn_id=values["NIGHTSHIFT_DOCKER_CONN_ID"])

    def operator_kwargs(self) -> dict[str, Any]:
        """BaseOperator arguments of a Docker-bound task: ``queue`` when one is configured, else
        none (the task keeps Airflow's default queue)."""
        return {"queue": self.queue} if self.queue else {}


def _env_value(env: Mapping[str, str], name: str) -> str | None:
    """A variable's value without surrounding blanks; unset or blank: None."""
    return (env.get(name) or "").strip() or None


def _node_selector(raw: str | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"NIGHTSHIFT_GPU_NODE_SELECTOR is not valid JSON ({exc.msg}): {raw!r}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"NIGHTSHIFT_GPU_NODE_SELECTOR must be a JSON object of string labels, e.g. "
                          f'{{"nvidia.com/gpu.present": "true"}}; got {raw!r}')
    return value


def _tolerations(raw: str | None) -> list[dict[str, Any]]:
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"NIGHTSHIFT_GPU_TOLERATIONS is not valid JSON ({exc.msg}): {raw!r}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"NIGHTSHIFT_GPU_TOLERATIONS must be a JSON list of objects; got {raw!r}")
    for i, t in enumerate(value):
        unknown = sorted(set(t) - _TOLERATION_KEYS)
        if unknown:
            raise ConfigError(f"NIGHTSHIFT_GPU_TOLERATIONS[{i}] has unknown key(s) {unknown}; "
                              f"known: {sorted(_TOLERATION_KEYS - {'toleration_seconds'})}")
        op = t.get("operator", "Equal")
        if op not in _TOLERATION_OPERATORS:
            raise ConfigError(f"NIGHTSHIFT_GPU_TOLERATIONS[{i}].operator={op!r}: expected Exists or Equal")
        if t.get("effect", "") not in _TOLERATION_EFFECTS:
            raise ConfigError(f"NIGHTSHIFT_GPU_TOLERATIONS[{i}].effect={t['effect']!r}: expected one of "
                              f"{list(_TOLERATION_EFFECTS[1:])}")
        if op == "Exists" and t.get("value"):
            raise ConfigError(f"NIGHTSHIFT_GPU_TOLERATIONS[{i}]: operator Exists takes no value")
    return value


def gpu_resources(gpus: int = 1, *, memory: str | None = None, cpu: str | None = None):
    """``V1ResourceRequirements``: ``gpus`` × ``nvidia.com/gpu`` (a limit; Kubernetes sets the
    request equal), memory requested and limited, CPU requested."""
    from kubernetes.client import models as k8s

    limits: dict[str, str] = {GPU_RESOURCE: str(int(gpus))}
    requests: dict[str, str] = {}
    if memory:
        limits["memory"] = requests["memory"] = memory
    if cpu:
        requests["cpu"] = cpu
    return k8s.V1ResourceRequirements(limits=limits, requests=requests or None)


def k8s_tolerations(tolerations: list[dict[str, Any]] | None) -> list[Any]:
    """Toleration dicts (camelCase or snake_case keys) as ``V1Toleration`` objects."""
    from kubernetes.client import models as k8s

    out = []
    for t in tolerations or []:
        seconds = t.get("toleration_seconds", t.get("tolerationSeconds"))
        out.append(k8s.V1Toleration(key=t.get("key"), operator=t.get("operator"), value=t.get("value"),
                                    effect=t.get("effect"), toleration_seconds=seconds))
    return out


def gpu_pod_override(gpus: int = 1, *, node_selector: dict[str, str] | None = None,
                     tolerations: list[dict[str, Any]] | None = None, image: str | None = None,
                     memory: str | None = None, cpu: str | None = None):
    """A KubernetesExecutor ``pod_override`` (``executor_config={"pod_override": ...}``) that puts
    the task's worker pod on a GPU node.

    Only what differs from the executor's pod template is set; the executor merges it into the
    template's ``base`` container and pod spec.

    :param gpus: ``nvidia.com/gpu`` limit.
    :param node_selector: node labels the pod must match (e.g. the GPU node pool's).
    :param tolerations: toleration dicts, e.g. ``{"key": "nvidia.com/gpu", "operator": "Exists",
        "effect": "NoSchedule"}`` for GPU nodes tainted that way.
    :param image: a worker image with CUDA-enabled torch; ``None`` keeps the template's image.
    :param memory: memory request and limit (``16Gi``); ``None`` keeps the template's.
    :param cpu: CPU request (``4``); ``None`` keeps the template's.
    """
    from kubernetes.client import models as k8s

    container = k8s.V1Container(name=BASE_CONTAINER, image=image,
                                resources=gpu_resources(gpus, memory=memory, cpu=cpu))
    return k8s.V1Pod(spec=k8s.V1PodSpec(containers=[container], node_selector=node_selector or None,
                                        tolerations=k8s_tolerations(tolerations) or None))


def artifact_volume(pvc: str, mount_path: str, *, name: str = "nightshift-artifacts"):
    """``(V1Volume, V1VolumeMount)`` mounting PersistentVolumeClaim ``pvc`` read-write at ``mount_path``."""
    from kubernetes.client import models as k8s

    volume = k8s.V1Volume(name=name, persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
        claim_name=pvc))
    return volume, k8s.V1VolumeMount(name=name, mount_path=mount_path)

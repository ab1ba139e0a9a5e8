from __future__ import annotations

from typing import Any, Sequence

from nightshift.champion import ACTIONS
from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import ModelVersionLink, NightshiftViewLink


class SetChampionOperator(NightshiftOperator):
    """Move ``champion`` by a person's decision and record who, why and when (on the
    model version and in the promotion history).

    One critical section (:func:`nightshift.champion.change_champion` under the
    model's champion lock): resolve the target, check it can be deployed (the version
    exists, has its ONNX digest and image; for ``docker`` the image is in the local
    daemon), serve it on the stable port, then move the alias with a compare-and-set.
    A target that cannot be deployed moves nothing. A rollback always moves: its
    target is never today's champion.

    :param model_name: registered model. (templated)
    :param version: the version to make champion; for ``rolled_back``, ``previous``
        (or empty) means the champion before the current one. (templated)
    :param reason: why (required). (templated)
    :param action: ``forced`` (``promote_model``) or ``rolled_back`` (``rollback_model``).
    :param deploy_target: ``docker`` (serve it on ``port`` before the alias moves),
        ``kubernetes`` (the image must be recorded; ``deploy`` renders manifests) or
        ``none`` (the alias only). (templated)
    :param port: the stable port on 127.0.0.1 (docker target). (templated)
    :param docker_conn_id: the Airflow connection of the Docker daemon (see
        :func:`nightshift.operators.base.resolve_docker_client`); ``None``:
        ``$NIGHTSHIFT_DOCKER_CONN_ID`` where the task runs, else ``DOCKER_HOST``. (templated)
    """

    template_fields: Sequence[str] = ("model_name", "version", "reason", "deploy_target", "port", "docker_conn_id")
    #: Nothing of the run folder: the registry, the champion lock and the history are what it reads.
    run_folder_reads: Sequence[str] = ()
    operator_extra_links = (ModelVersionLink(), NightshiftViewLink(),)
    ui_color = "#ffe0b2"

    def __init__(self, *, model_name: str, version: Any, reason: str, action: str, deploy_target: str = "none",
                 port: Any = 8600, docker_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {sorted(ACTIONS)}, got {action!r}")
        self.model_name = model_name
        self.version = version
        self.reason = reason
        self.action = action
        self.deploy_target = deploy_target
        self.port = port
        self.docker_conn_id = docker_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift import champion

        target = str(self.deploy_target or "none")
        deployer = None
        if target == "docker":
            from nightshift.operators.deploy import local_deployer

            deployer = local_deployer(self, model_name=self.model_name, port=self.port)
        dag_run = context.get("dag_run")
        actor = getattr(dag_run, "triggering_user_name", None) or "unknown"
        return champion.change_champion(
            self.mlflow, model_name=self.model_name, artifact_root=self.store,
            version=str(self.version or "").strip() or None, action=self.action, reason=str(self.reason or ""),
            actor=actor, deploy=target, deployer=deployer, dag_id=self.dag_id, run_id=context["run_id"])

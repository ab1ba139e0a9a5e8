from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import ModelVersionLink, NightshiftViewLink


def local_deployer(operator: NightshiftOperator, *, model_name: str, port: Any, request_log_sample: Any = None):
    """The :class:`nightshift.deploy.LocalDeployer` of ``model_name`` on the operator's Docker daemon
    (:meth:`NightshiftOperator.docker_client`: its ``docker_conn_id``, else the worker's), serving in
    the deployed configuration (``ServingConfig.from_env``); its state and lock go through the
    artifact store, its proxy config and request log stay in this worker's working copy."""
    from nightshift.containers import ServingConfig
    from nightshift.deploy import LocalDeployer, grpc_port_for
    from nightshift.errors import ConfigError

    try:
        config = ServingConfig.from_env(
            request_log_sample=None if request_log_sample in (None, "") else float(request_log_sample))
    except ValueError as exc:
        raise ConfigError(f"request_log_sample: {exc}") from exc
    return LocalDeployer(operator.docker_client(), model_name=model_name,
                         artifact_root=operator.store, port=int(port), grpc_port=grpc_port_for(int(port)),
                         proxy_image=operator.settings.base_image, config=config)


class DeployModelOperator(NightshiftOperator):
    """Make the serving port serve the registry's champion *now* (a reconcile).
    Skipped (not green) when the run did not promote.

    ``docker`` target: under the model's champion lock, read the champion and serve
    it blue/green on the worker's Docker host behind a stable port on 127.0.0.1
    (:func:`nightshift.champion.reconcile`); a failed start leaves the old
    container serving. If another run (a rollback) moved the champion since this
    run's promotion, the champion now is what serves. ``kubernetes`` target: renders
    and validates a Deployment, Service and KServe InferenceService for the
    champion into the run folder (``deploy/manifests.yaml``) for ``kubectl apply``.

    :param promotion: the ``promote`` / ``set_champion`` result (XCom). (templated)
    :param model_name: registered (and served) model name. (templated)
    :param target: ``docker``, ``kubernetes`` or ``none`` (skip). (templated)
    :param port: the stable port on 127.0.0.1 (docker target). (templated)
    :param namespace: Kubernetes namespace (kubernetes target). (templated)
    :param request_log_sample: share of requests the server writes to its request log;
        empty for the deployed default. (templated)
    :param docker_conn_id: the Airflow connection of the Docker daemon (see
        :func:`nightshift.operators.base.resolve_docker_client`); ``None``:
        ``$NIGHTSHIFT_DOCKER_CONN_ID`` where the task runs, else ``DOCKER_HOST``. (templated)
    """

    template_fields: Sequence[str] = ("promotion", "model_name", "target", "port", "namespace", "request_log_sample",
                                      "docker_conn_id")
    #: what of the run folder it reads (fetched first on an object store): its own folder
    run_folder_reads: Sequence[str] = ("deploy",)
    operator_extra_links = (ModelVersionLink(), NightshiftViewLink(),)
    ui_color = "#c5cae9"

    def __init__(self, *, promotion: Any, model_name: str, target: str = "docker", port: int = 8600,
                 namespace: str = "default", request_log_sample: float | None = None,
                 docker_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.promotion = promotion
        self.model_name = model_name
        self.target = target
        self.port = port
        self.namespace = namespace
        self.request_log_sample = request_log_sample
        self.docker_conn_id = docker_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from nightshift import champion, registry
        from nightshift.errors import ConfigError

        promotion = self.require(self.promotion, "promotion", "promote")
        if self.target == "none":
            raise AirflowSkipException("deploy_target is 'none': the model is registered, not deployed")
        if not promotion.get("promoted"):
            raise AirflowSkipException(f"not deployed: {self.model_name} v{promotion.get('version')} was not promoted "
                                       f"({promotion.get('reason', 'no reason recorded')}); the champion "
                                       f"v{promotion.get('champion')} keeps serving")
        c = self.mlflow
        if self.target == "kubernetes":
            from nightshift.kubernetes import render_kubernetes, write_manifests

            now = registry.get_champion(c, self.model_name)
            if now is None:
                raise ConfigError(f"{self.model_name} has no champion in the registry: nothing to deploy")
            target = champion.deploy_target(c, self.model_name, now["version"], target="kubernetes",
                                            tags=now["tags"])
            manifests = render_kubernetes(self.model_name, target.image, registry_version=target.version,
                                          namespace=str(self.namespace))
            path = write_manifests(manifests, self.run_dir(context, "deploy") / "manifests.yaml")
            uri = self.store.publish(path)  # readable from any worker (the path on a local root)
            self.log.info("rendered %s for %s (kubectl apply -f %s; %s)", [m["kind"] for m in manifests],
                          target.image, path, uri)
            return {"target": "kubernetes", "manifests": uri, "image": target.image,
                    "model_name": self.model_name, "version": target.version, "registry_version": target.version,
                    "status": "rendered"}
        if self.target != "docker":
            raise ConfigError(f"deploy target must be 'docker' or 'kubernetes', got {self.target!r}")
        deployer = local_deployer(self, model_name=self.model_name, port=self.port,
                                  request_log_sample=self.request_log_sample)
        state = champion.reconcile(c, deployer, reason=f"{self.dag_id} {context['run_id']}")
        if str(promotion.get("champion")) != state["version"]:
            self.log.warning("champion of %s moved since this run recorded v%s: v%s serves (the registry's champion "
                             "now)", self.model_name, promotion.get("champion"), state["version"])
        self.log.info("%s v%s %s at %s%s (container %s)", self.model_name, state["version"],
                      "now serves" if state.get("changed") else "already served", state["url"],
                      f" and gRPC {state['grpc_target']}" if state.get("grpc_target") else "", state["container"])
        return state

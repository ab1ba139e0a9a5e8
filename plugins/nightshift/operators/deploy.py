from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import ModelVersionLink, NightshiftViewLink


class DeployModelOperator(NightshiftOperator):
    """Serve the champion. Skipped (not green) when the run did not promote.

    ``docker`` target: blue/green on the worker's Docker host behind a stable port
    on 127.0.0.1 (``nightshift.deploy.LocalDeployer``); a failed start leaves the
    old container serving. ``kubernetes`` target: renders and validates a
    Deployment, Service and KServe InferenceService into the run folder
    (``deploy/manifests.yaml``) for ``kubectl apply``.

    :param promotion: the ``promote`` / ``set_champion`` result (XCom). (templated)
    :param model_name: registered (and served) model name. (templated)
    :param target: ``docker``, ``kubernetes`` or ``none`` (skip). (templated)
    :param port: the stable port on 127.0.0.1 (docker target). (templated)
    :param namespace: Kubernetes namespace (kubernetes target). (templated)
    :param request_log_sample: share of requests the server writes to its request log. (templated)
    """

    template_fields: Sequence[str] = ("promotion", "model_name", "target", "port", "namespace", "request_log_sample")
    operator_extra_links = (ModelVersionLink(), NightshiftViewLink(),)
    ui_color = "#c5cae9"

    def __init__(self, *, promotion: Any, model_name: str, target: str = "docker", port: int = 8600,
                 namespace: str = "default", request_log_sample: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.promotion = promotion
        self.model_name = model_name
        self.target = target
        self.port = port
        self.namespace = namespace
        self.request_log_sample = request_log_sample

    def execute(self, context: Any) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from nightshift import contracts, registry
        from nightshift.errors import ConfigError

        promotion = self.require(self.promotion, "promotion", "promote")
        if self.target == "none":
            raise AirflowSkipException("deploy_target is 'none': the model is registered, not deployed")
        if not promotion.get("promoted"):
            raise AirflowSkipException(f"not deployed: {self.model_name} v{promotion.get('version')} was not promoted "
                                       f"({promotion.get('reason', 'no reason recorded')}); the champion "
                                       f"v{promotion.get('champion')} keeps serving")
        c = self.mlflow
        champion = registry.get_champion(c, self.model_name)
        if champion is None or champion["version"] != str(promotion.get("champion")):
            raise ConfigError(f"champion of {self.model_name} is v{champion and champion['version']}, not "
                              f"v{promotion.get('champion')} as this run recorded: refusing to deploy a stale decision")
        tags = champion["tags"]
        image = tags.get(contracts.tag(contracts.VersionTag.IMAGE)) or promotion.get("image")
        if not image:
            raise ConfigError(f"champion v{champion['version']} has no {contracts.tag('image')} tag: nothing to deploy")
        onnx_sha = tags.get(contracts.tag(contracts.VersionTag.ONNX_SHA256), "")
        if self.target == "docker" and not onnx_sha:  # without it the switch cannot check what serves
            raise ConfigError(f"champion v{champion['version']} has no {contracts.tag('onnx_sha256')} tag: the new "
                              "container's served version cannot be checked before traffic moves to it")
        if self.target == "kubernetes":
            from nightshift.deploy import render_kubernetes, write_manifests

            manifests = render_kubernetes(self.model_name, image, registry_version=champion["version"],
                                          namespace=str(self.namespace))
            path = write_manifests(manifests, self.run_dir(context, "deploy") / "manifests.yaml")
            self.log.info("rendered %s for %s (kubectl apply -f %s)", [m["kind"] for m in manifests], image, path)
            return {"target": "kubernetes", "manifests": str(path), "image": image, "model_name": self.model_name,
                    "version": champion["version"], "registry_version": champion["version"], "status": "rendered"}
        if self.target != "docker":
            raise ConfigError(f"deploy target must be 'docker' or 'kubernetes', got {self.target!r}")
        from nightshift.deploy import LocalDeployer
        from nightshift.inference_image import connect_docker

        import os

        # Serving settings a platform sets on its workers (e.g. NIGHTSHIFT_REQUEST_LOG_ROTATE_S) reach the container.
        env = {k: v for k, v in os.environ.items() if k.startswith("NIGHTSHIFT_REQUEST_LOG_")}
        env["NIGHTSHIFT_REQUEST_LOG_SAMPLE"] = str(float(self.request_log_sample))
        deployer = LocalDeployer(connect_docker(), model_name=self.model_name, artifact_root=self.settings.artifact_root,
                                 port=int(self.port), proxy_image=self.settings.base_image, environment=env)
        state = deployer.deploy(image, registry_version=champion["version"], model_version=onnx_sha[:12],
                                reason=f"{self.dag_id} {context['run_id']}")
        self.log.info("%s v%s %s at %s (container %s)", self.model_name, champion["version"],
                      "now serves" if state.get("changed") else "already served", state["url"], state["container"])
        return {**state, "model_name": self.model_name, "version": champion["version"]}

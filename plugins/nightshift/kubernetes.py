"""Kubernetes manifests for serving the champion: a Deployment and a Service with
readiness/liveness probes on the OIP health routes, and a KServe ``InferenceService``
with the same image, validated against the Kubernetes API models (unknown fields are
errors) and a schema for the KServe resource. Applying them needs a cluster
(``kubectl apply -f``); the ``deploy`` task renders them for ``deploy_target=kubernetes``.

No Airflow here; ``kubernetes``, ``jsonschema`` and ``yaml`` are imported where used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nightshift.artifacts import atomic_write_text
from nightshift.containers import CONTAINER_LOG_DIR
from nightshift.errors import ConfigError

_ISVC_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}}},
        "spec": {"type": "object", "required": ["predictor"], "properties": {"predictor": {
            "type": "object", "required": ["containers"], "properties": {"containers": {
                "type": "array", "minItems": 1, "items": {"type": "object", "required": ["name", "image"]}}}}}},
    },
}


def _k8s_name(model_name: str) -> str:
    import re

    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")[:50]
    if not name:
        raise ConfigError(f"model name {model_name!r} gives no valid Kubernetes name")
    return name


def render_kubernetes(model_name: str, image: str, *, registry_version: str, namespace: str = "default",
                      replicas: int = 2, port: int = 8080, grpc_port: int | None = 8081, cpu: str = "1",
                      memory: str = "1Gi") -> list[dict[str, Any]]:
    """Deployment + Service + KServe InferenceService for ``image``, validated.

    The Deployment's pods serve REST on ``port`` and OIP gRPC on ``grpc_port`` (``None``: REST
    only); the Service exposes both (gRPC as ``appProtocol: kubernetes.io/h2c``). KServe routes
    one port per predictor, so the InferenceService serves REST only.

    :raises ConfigError: a manifest does not validate against the Kubernetes API
        models (Deployment, Service) or the InferenceService schema.
    """
    name = _k8s_name(model_name)
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "nightshift",
              "ai.nightshift/model-version": str(registry_version)}
    container = {
        "name": "server", "image": image, "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": port},
                  *([{"name": "grpc", "containerPort": grpc_port}] if grpc_port else [])],
        "env": [{"name": "NIGHTSHIFT_HOST", "value": "0.0.0.0"}, {"name": "NIGHTSHIFT_PORT", "value": str(port)},
                {"name": "NIGHTSHIFT_GRPC_PORT", "value": str(grpc_port) if grpc_port else "off"},
                {"name": "NIGHTSHIFT_REQUEST_LOG_DIR", "value": CONTAINER_LOG_DIR}],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 3},
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "request-log", "mountPath": CONTAINER_LOG_DIR}],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                 "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [container],
                                       "volumes": [{"name": "request-log", "emptyDir": {}}]}}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"selector": {"app.kubernetes.io/name": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                           *([{"name": "grpc", "port": grpc_port, "targetPort": "grpc",
                               "appProtocol": "kubernetes.io/h2c"}] if grpc_port else [])]},
    }
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
                     "annotations": {"serving.kserve.io/enable-prometheus-scraping": "true"}},
        "spec": {"predictor": {"minReplicas": 1, "containers": [
            {**{k: v for k, v in container.items() if k not in ("volumeMounts",)},
             "env": [e if e["name"] != "NIGHTSHIFT_GRPC_PORT" else {**e, "value": "off"} for e in container["env"]],
             "name": "kserve-container", "ports": [{"containerPort": port, "protocol": "TCP"}]}]}},
    }
    validate_manifests([deployment, service, isvc])
    return [deployment, service, isvc]


def validate_manifests(manifests: list[dict[str, Any]]) -> None:
    """Check Deployments and Services against the Kubernetes API models, and
    InferenceServices against their schema. :raises ConfigError: with the field at fault."""
    import jsonschema
    from kubernetes import client as k8s

    api = k8s.ApiClient()
    models = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service"}
    for m in manifests:
        key = (m.get("apiVersion"), m.get("kind"))
        if key == ("serving.kserve.io/v1beta1", "InferenceService"):
            try:
                jsonschema.validate(m, _ISVC_SCHEMA)
            except jsonschema.ValidationError as exc:
                raise ConfigError(f"InferenceService manifest is invalid at {list(exc.path)}: {exc.message}") from exc
            continue
        if key not in models:
            raise ConfigError(f"unexpected manifest kind {key}")
        _strict(m, models[key], api)


def _strict(obj: Any, klass: str, api: Any, path: str = "") -> None:
    """Deserialize into the kubernetes client model, rejecting unknown fields."""
    from kubernetes import client as k8s

    if klass.startswith("list["):
        for i, item in enumerate(obj):
            _strict(item, klass[5:-1], api, f"{path}[{i}]")
        return
    if klass.startswith(("dict(", "dict[")) or klass in ("str", "int", "bool", "object", "float", "datetime"):
        if klass == "int" and not isinstance(obj, int):
            raise ConfigError(f"{path or 'manifest'} must be an integer, got {obj!r}")
        if klass == "str" and not isinstance(obj, str):
            raise ConfigError(f"{path or 'manifest'} must be a string, got {obj!r}")
        return
    model = getattr(k8s, klass)
    if not isinstance(obj, dict):
        raise ConfigError(f"{path or 'manifest'} must be an object ({klass}), got {obj!r}")
    attr_of = {v: k for k, v in model.attribute_map.items()}
    for key, value in obj.items():
        if key not in attr_of:
            raise ConfigError(f"{path or 'manifest'}: unknown field {key!r} for {klass}")
        _strict(value, model.openapi_types[attr_of[key]], api, f"{path}.{key}" if path else key)
    try:  # required fields and value checks the client models enforce
        api._ApiClient__deserialize(obj, klass)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path or 'manifest'} is not a valid {klass}: {exc}") from exc


def write_manifests(manifests: list[dict[str, Any]], path: str | Path) -> Path:
    import yaml

    return atomic_write_text(path, yaml.safe_dump_all(manifests, sort_keys=False))


__all__ = ["render_kubernetes", "validate_manifests", "write_manifests"]

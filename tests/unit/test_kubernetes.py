"""Kubernetes manifests (:mod:`nightshift.kubernetes`): rendered, and validated strictly."""

from __future__ import annotations

import pytest

from nightshift.errors import ConfigError
from nightshift.kubernetes import render_kubernetes, validate_manifests


def test_kubernetes_manifests_render_and_validate():
    ms = render_kubernetes("Nightshift_Digits", "registry.example/nightshift/digits:abc", registry_version="3")
    assert [m["kind"] for m in ms] == ["Deployment", "Service", "InferenceService"]
    dep = ms[0]["spec"]["template"]["spec"]["containers"][0]
    assert dep["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert dep["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert ms[0]["metadata"]["name"] == "nightshift-digits" and ms[2]["spec"]["predictor"]["containers"][0]["image"]
    with pytest.raises(ConfigError, match="unknown field 'replicaz'"):
        validate_manifests([ms[0] | {"spec": ms[0]["spec"] | {"replicaz": 2}}])
    with pytest.raises(ConfigError, match="port must be an integer"):
        validate_manifests([{**ms[1], "spec": {**ms[1]["spec"], "ports": [{"name": "http", "port": "eighty"}]}}])
    with pytest.raises(ConfigError, match="InferenceService manifest is invalid"):
        validate_manifests([{**ms[2], "spec": {}}])


def test_pods_serve_grpc_beside_rest_and_the_service_exposes_it_as_h2c():
    ms = render_kubernetes("digits", "registry.example/nightshift/digits:abc", registry_version="3")
    dep = ms[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in dep["env"]}
    assert [(p["name"], p["containerPort"]) for p in dep["ports"]] == [("http", 8080), ("grpc", 8081)]
    assert env["NIGHTSHIFT_GRPC_PORT"] == "8081"
    grpc = [p for p in ms[1]["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc == [{"name": "grpc", "port": 8081, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"}]
    isvc = ms[2]["spec"]["predictor"]["containers"][0]  # KServe routes one port: REST
    assert {e["name"]: e["value"] for e in isvc["env"]}["NIGHTSHIFT_GRPC_PORT"] == "off"
    assert len(isvc["ports"]) == 1

    rest_only = render_kubernetes("digits", "registry.example/nightshift/digits:abc", registry_version="3",
                                  grpc_port=None)
    dep = rest_only[0]["spec"]["template"]["spec"]["containers"][0]
    assert [p["name"] for p in dep["ports"]] == ["http"]
    assert {e["name"]: e["value"] for e in dep["env"]}["NIGHTSHIFT_GRPC_PORT"] == "off"
    assert [p["name"] for p in rest_only[1]["spec"]["ports"]] == ["http"]

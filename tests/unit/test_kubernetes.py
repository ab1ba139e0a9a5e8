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

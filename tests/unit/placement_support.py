"""Placement settings and helpers shared by the placement tests and the training operators' tests
(test_placement.py, test_operators_train.py, test_operators_train_pod.py)."""

from __future__ import annotations

import json

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
#: the GPU settings of a Kubernetes placement
K8S_ENV = {
    "NIGHTSHIFT_GPU_COUNT": "2",
    "NIGHTSHIFT_GPU_NODE_SELECTOR": '{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}',
    "NIGHTSHIFT_GPU_TOLERATIONS": json.dumps([GPU_TOLERATION]),
    "NIGHTSHIFT_TRAIN_MEMORY": "16Gi",
    "NIGHTSHIFT_TRAIN_CPU": "4",
}


def api_dict(obj):
    """What the Kubernetes API would receive (camelCase keys, no None values)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def common_args(**over):
    """The arguments of the ``train_gpu`` task of a DAG, with ``over`` on top."""
    args = dict(task_id="train_gpu", pool="nightshift_gpu", snapshot={"snapshot_uri": "/data/artifacts/snapshots/s1"},
                model_name="digits", require_gpu=True, hparams={"epochs": 3, "lr": None, "model": "small_cnn"})
    args.update(over)
    return args

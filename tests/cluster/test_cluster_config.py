"""What ``scripts/cluster/cluster.py`` gives each component (no server started): the artifact root
in the bucket for everyone, a folder of its own for each, the caller's embedded-profile settings
dropped, Airflow overrides passed on."""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster import cluster  # scripts/ is on pytest's path


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "HOME", tmp_path / "cluster")
    return {"ports": {name: 30000 + off for name, off in cluster.PORTS.items()},
            "secrets": {"db_password": "db", "redis_password": "redis", "s3_access_key": "AK", "s3_secret_key": "SK",
                        "jwt_secret": "jwt", "api_secret_key": "api", "fernet_key": "fernet"}}


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def test_every_component_uses_the_bucket_with_a_working_copy_of_its_own(cfg, monkeypatch):
    # the caller's embedded-profile settings must not leak into the components
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", "/shared/artifacts")
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_CACHE", "/shared/cache")
    monkeypatch.setenv("NIGHTSHIFT_WHEELHOUSE", "/shared/wheelhouse")
    monkeypatch.setenv("TMPDIR", "/shared/tmp")
    envs = {name: cluster.component_env(cfg, name) for name in cluster.AIRFLOW_COMPONENTS}
    envs.update({name: cluster.worker_env(cfg, name) for name in cluster.WORKERS})
    for name, env in envs.items():
        assert env["NIGHTSHIFT_ARTIFACT_ROOT"] == "s3://nightshift-artifacts/artifacts", name
        assert env["NIGHTSHIFT_ARTIFACT_CONN_ID"] == "nightshift_s3"
        assert env["AWS_ENDPOINT_URL_S3"] == f"http://127.0.0.1:{cfg['ports']['s3']}"
        assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{cfg['ports']['mlflow']}"
        assert "NIGHTSHIFT_ARTIFACT_CACHE" not in env, name
        assert env.get("TMPDIR") != "/shared/tmp", name
        assert env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] == "60"
    homes = {name: Path(env["NIGHTSHIFT_HOME"]) for name, env in envs.items()}
    assert len(set(homes.values())) == len(homes)
    for a, ha in homes.items():
        for b, hb in homes.items():
            assert a == b or not _overlap(ha, hb), (a, b)
    w = {name: envs[name] for name in cluster.WORKERS}
    folders = {name: [Path(e[k]) for k in ("AIRFLOW_HOME", "TMPDIR", "NIGHTSHIFT_HOME", "NIGHTSHIFT_WHEELHOUSE")]
               for name, e in w.items()}
    for a in folders["worker-default"]:
        for b in folders["worker-gpu"]:
            assert not _overlap(a, b), (a, b)
    # placement: train_gpu on queue gpu, the Docker-bound tasks on queue docker
    from nightshift.placement import DockerPlacement, TrainPlacement

    train = TrainPlacement.from_env(envs["dag-processor"])
    assert (train.kind, train.queue) == ("celery", "gpu")
    assert DockerPlacement.from_env(envs["dag-processor"]).operator_kwargs() == {"queue": "docker"}
    assert "docker" in cluster.WORKERS["worker-default"][0].split(",")
    assert cluster.WORKERS["worker-gpu"][0] == "gpu"


def test_airflow_overrides_and_heartbeat_timeout(cfg, monkeypatch):
    monkeypatch.setenv("AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE", "True")  # the caller's own: dropped
    monkeypatch.setenv("NIGHTSHIFT_CLUSTER_AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE", "False")
    monkeypatch.setenv("NIGHTSHIFT_CLUSTER_HEARTBEAT_TIMEOUT", "30")
    env = cluster.worker_env(cfg, "worker-gpu")
    assert env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] == "False"
    assert env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] == "30"
    monkeypatch.setenv("NIGHTSHIFT_CLUSTER_HEARTBEAT_TIMEOUT", "5")
    with pytest.raises(cluster.ClusterError, match="NIGHTSHIFT_CLUSTER_HEARTBEAT_TIMEOUT"):
        cluster.client_env(cfg)


def test_the_models_file_up_ran_with_is_kept_for_a_restart(cfg, monkeypatch, tmp_path):
    """Every component parses the Dags from the same models file, also when ``restart`` runs in a shell
    without the variable (settings.json keeps what ``up`` had)."""
    models = tmp_path / "models.yaml"
    monkeypatch.setenv("NIGHTSHIFT_MODELS_FILE", str(models))
    cluster.HOME.mkdir(parents=True)
    cluster.record_settings()
    monkeypatch.delenv("NIGHTSHIFT_MODELS_FILE")
    for name in ("scheduler", "dag-processor"):
        assert cluster.component_env(cfg, name)["NIGHTSHIFT_MODELS_FILE"] == str(models)
    assert cluster.worker_env(cfg, "worker-gpu")["NIGHTSHIFT_MODELS_FILE"] == str(models)


def test_restart_refuses_an_unknown_component(cfg, capsys):
    assert cluster.main(["restart", "worker-cpu"]) == 1
    assert "unknown component(s) worker-cpu" in capsys.readouterr().err


def test_docker_worker_gets_a_copy_of_the_wheelhouse(cfg, tmp_path, monkeypatch):
    src = tmp_path / "project-wheelhouse"
    (src / "abc123").mkdir(parents=True)
    (src / "abc123" / "requirements.txt").write_text("numpy==2\n")
    (src / "abc123" / "numpy-2-py3-none-any.whl").write_bytes(b"wheel")
    (src / "partial").mkdir()  # no requirements.txt: not a finished wheelhouse, not copied
    monkeypatch.setattr(cluster, "PROJECT_WHEELHOUSE", src)
    for name in cluster.WORKERS:
        env = cluster.worker_env(cfg, name)
        Path(env["NIGHTSHIFT_WHEELHOUSE"]).mkdir(parents=True)
        cluster._seed_wheelhouse(name, env)
    default = Path(cluster.worker_env(cfg, "worker-default")["NIGHTSHIFT_WHEELHOUSE"])
    gpu = Path(cluster.worker_env(cfg, "worker-gpu")["NIGHTSHIFT_WHEELHOUSE"])
    assert sorted(p.name for p in default.iterdir()) == ["abc123"]
    assert (default / "abc123" / "numpy-2-py3-none-any.whl").read_bytes() == b"wheel"
    assert not (default / "abc123" / "numpy-2-py3-none-any.whl").samefile(src / "abc123" / "numpy-2-py3-none-any.whl")
    assert list(gpu.iterdir()) == []  # the gpu queue builds no images

"""Every Docker call goes to the daemon of the task's ``docker_conn_id`` (else
``NIGHTSHIFT_DOCKER_CONN_ID``, else ``DOCKER_HOST``), through one helper:
``NightshiftOperator.docker_client()`` -> ``resolve_docker_client(conn_id)``.

No real daemon: the helper is tested against a stand-in ``DockerHook`` (and the real
hook against a closed loopback port), the operators against a stand-in helper."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import pytest

from nightshift.errors import ConfigError

CONN = "docker_gpu_host"


class _Captured(Exception):
    """Raised by a stand-in core function once it has seen the client (the test ends there)."""


def _conn(monkeypatch, conn_id: str, **fields) -> None:
    """Define an Airflow connection through the environment (``AIRFLOW_CONN_<ID>``, JSON)."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "docker", **fields}))


@pytest.fixture
def hooks(monkeypatch):
    """The docker provider's ``DockerHook`` replaced by a recorder whose ``api_client`` is a stand-in."""
    import airflow.providers.docker.hooks.docker as provider

    made = []

    class FakeHook:
        def __init__(self, docker_conn_id=None, base_url=None, version=None, tls=None, timeout=60):
            made.append({"docker_conn_id": docker_conn_id, "base_url": base_url, "tls": tls, "timeout": timeout})
            self.api_client = SimpleNamespace(base_url=base_url)

        construct_tls_config = staticmethod(provider.DockerHook.construct_tls_config)

    monkeypatch.setattr(provider, "DockerHook", FakeHook)
    return made


# --------------------------------------------------------------------------- the helper


def test_a_connection_names_the_daemon_and_the_client_speaks_through_the_hook(monkeypatch, hooks):
    import docker

    from nightshift.operators.base import resolve_docker_client

    _conn(monkeypatch, CONN, extra={"docker_url": "tcp://127.0.0.1:2375"})
    client = resolve_docker_client(CONN)
    assert isinstance(client, docker.DockerClient) and client.api.base_url == "tcp://127.0.0.1:2375"
    # no login in the connection: the hook is not asked to log in to a registry
    assert hooks == [{"docker_conn_id": None, "base_url": "tcp://127.0.0.1:2375", "tls": None, "timeout": 600}]


def test_a_connection_with_a_login_logs_in_and_defaults_to_docker_host(monkeypatch, hooks):
    from nightshift.operators.base import resolve_docker_client

    monkeypatch.setenv("DOCKER_HOST", "unix:///run/user/1000/docker.sock")
    _conn(monkeypatch, CONN, host="registry.internal", port=5000, login="ci", password="s3cret")
    resolve_docker_client(CONN)
    assert hooks[0]["docker_conn_id"] == CONN and hooks[0]["base_url"] == "unix:///run/user/1000/docker.sock"


def test_no_connection_is_the_environment_daemon_as_before(monkeypatch, hooks):
    from nightshift import containers
    from nightshift.operators.base import resolve_docker_client

    env_client = object()
    monkeypatch.setattr(containers, "connect_docker", lambda *a, **k: env_client)
    assert resolve_docker_client(None) is env_client and resolve_docker_client("  ") is env_client
    assert hooks == []


def test_a_missing_connection_is_a_config_error_naming_it(monkeypatch):
    from nightshift.operators.base import resolve_docker_client

    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_DOCKER", raising=False)
    with pytest.raises(ConfigError, match="'no_such_docker' is not defined") as err:
        resolve_docker_client("no_such_docker")
    assert not err.value.retryable


def test_incomplete_tls_extras_are_a_config_error_naming_the_connection(monkeypatch, hooks):
    from nightshift.operators.base import resolve_docker_client

    _conn(monkeypatch, CONN, extra={"docker_url": "tcp://10.0.0.5:2376", "tls_ca_cert": "/etc/docker/ca.pem"})
    with pytest.raises(ConfigError, match=f"'{CONN}': TLS needs"):
        resolve_docker_client(CONN)


def test_an_unreachable_daemon_names_the_connection_and_the_url(monkeypatch):
    """The real hook against a loopback port nobody listens on: a retryable error saying which
    connection and which address."""
    from nightshift.errors import DockerUnavailable
    from nightshift.operators.base import resolve_docker_client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connection refused
    _conn(monkeypatch, CONN, extra={"docker_url": f"tcp://127.0.0.1:{port}"})
    with pytest.raises(DockerUnavailable, match=f"'{CONN}'.*tcp://127.0.0.1:{port}") as err:
        resolve_docker_client(CONN, timeout_s=5)
    assert err.value.retryable


def test_placement_reads_queue_and_connection_from_the_environment():
    from nightshift.placement import DockerPlacement

    assert DockerPlacement.from_env({}) == DockerPlacement(None, None)
    assert DockerPlacement.from_env({}).operator_kwargs() == {}  # Airflow's default queue: nothing changes
    p = DockerPlacement.from_env({"NIGHTSHIFT_DOCKER_QUEUE": " docker ", "NIGHTSHIFT_DOCKER_CONN_ID": "docker_host"})
    assert p == DockerPlacement("docker", "docker_host") and p.operator_kwargs() == {"queue": "docker"}
    for name in ("NIGHTSHIFT_DOCKER_QUEUE", "NIGHTSHIFT_DOCKER_CONN_ID"):
        with pytest.raises(ConfigError, match=name):
            DockerPlacement.from_env({name: "a b"})


# --------------------------------------------------------------------------- every operator uses it


@pytest.fixture
def daemons(monkeypatch, nightshift_home):
    """``resolve_docker_client`` replaced by stand-in daemons, one per connection id; the
    environment's daemon (``connect_docker``) must not be asked."""
    from nightshift import containers
    from nightshift.operators import base

    asked: list = []

    def resolve(conn_id, **_kw):
        asked.append(conn_id)
        return SimpleNamespace(daemon=conn_id)

    def environment(*_a, **_k):
        raise AssertionError("the environment's Docker daemon was used, not the connection's")

    monkeypatch.setattr(base, "resolve_docker_client", resolve, raising=False)
    monkeypatch.setattr(containers, "connect_docker", environment)
    monkeypatch.delenv("NIGHTSHIFT_DOCKER_CONN_ID", raising=False)
    return asked


def _capture(monkeypatch, module, name: str, pick):
    """Replace ``module.name`` by a function that records ``pick(args, kwargs)`` and stops."""
    seen = []

    def stand_in(*args, **kwargs):
        seen.append(pick(args, kwargs))
        raise _Captured

    monkeypatch.setattr(module, name, stand_in)
    return seen


def build(monkeypatch, **kw):
    from nightshift import inference_image
    from nightshift.operators import BuildInferenceImageOperator

    seen = []

    class Builder:
        def __init__(self, client):
            seen.append(client)

        def build(self, **_kw):
            raise _Captured

    monkeypatch.setattr(inference_image, "ImageBuilder", Builder)
    return BuildInferenceImageOperator(task_id="build_inference_image", export={"onnx_path": "m.onnx"},
                                       model_name="m", **kw), seen


def system_eval(monkeypatch, **kw):
    from nightshift import system_eval
    from nightshift.data import snapshot
    from nightshift.operators import SystemEvalOperator

    monkeypatch.setattr(snapshot, "load_snapshot", lambda uri: SimpleNamespace(uri=uri))
    seen = _capture(monkeypatch, system_eval, "run_system_eval", lambda a, k: k["docker_client"])
    return SystemEvalOperator(task_id="system_eval", image={"image": "nightshift/m:1"},
                              snapshot={"snapshot_uri": "s"}, model_name="m", **kw), seen


def deploy(monkeypatch, **kw):
    from nightshift import champion
    from nightshift.operators import DeployModelOperator

    seen = _capture(monkeypatch, champion, "reconcile", lambda a, k: a[1].client)
    return DeployModelOperator(task_id="deploy", promotion={"promoted": True, "champion": "2"}, model_name="m",
                               port=8600, **kw), seen


def rollback(monkeypatch, **kw):
    from nightshift import champion
    from nightshift.operators import SetChampionOperator

    seen = _capture(monkeypatch, champion, "change_champion", lambda a, k: k["deployer"].client)
    return SetChampionOperator(task_id="set_champion", model_name="m", version="previous", reason="v2 misroutes",
                               action="rolled_back", deploy_target="docker", port=8600, **kw), seen


def finalize(monkeypatch, **kw):
    from nightshift import approvals
    from nightshift.operators import FinalizePromotionOperator

    seen = _capture(monkeypatch, approvals, "finalize_approval", lambda a, k: k["docker_client"])
    return FinalizePromotionOperator(
        task_id="finalize_promotion", model_name="m", deploy_target="docker",
        promotion={"awaiting_approval": True, "version": "2", "previous_champion": "1", "model_name": "m"},
        approval={"chosen_options": ["Approve"], "responded_by_user": {"id": "b", "name": "bob"},
                  "params_input": {"comment": "ok"}}, **kw), seen


OPERATORS = [build, system_eval, deploy, rollback, finalize]


def _run(op, seen):
    with pytest.raises(_Captured):
        op.execute({"run_id": "manual__docker_conn"})
    [client] = seen
    return client


@pytest.mark.parametrize("make", OPERATORS, ids=lambda f: f.__name__)
def test_the_operator_uses_the_daemon_of_its_docker_conn_id(make, daemons, monkeypatch):
    op, seen = make(monkeypatch, docker_conn_id=CONN)
    assert "docker_conn_id" in op.template_fields
    assert _run(op, seen).daemon == CONN and daemons == [CONN]


@pytest.mark.parametrize("make", OPERATORS, ids=lambda f: f.__name__)
def test_without_an_argument_the_workers_nightshift_docker_conn_id_is_used(make, daemons, monkeypatch):
    monkeypatch.setenv("NIGHTSHIFT_DOCKER_CONN_ID", "docker_from_env")
    op, seen = make(monkeypatch)
    assert _run(op, seen).daemon == "docker_from_env" and daemons == ["docker_from_env"]


def test_the_argument_wins_over_the_environment(daemons, monkeypatch):
    monkeypatch.setenv("NIGHTSHIFT_DOCKER_CONN_ID", "docker_from_env")
    op, seen = deploy(monkeypatch, docker_conn_id=CONN)
    assert _run(op, seen).daemon == CONN

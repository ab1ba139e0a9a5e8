"""The container's health check (nightshift.serving.healthcheck): 0 when the local server says it is
ready, 1 (with the reason on stderr) when it cannot be reached."""

from __future__ import annotations

from urllib.parse import urlsplit

from nightshift.containers import free_port
from nightshift.serving import healthcheck


def test_ready_server_is_healthy_and_a_wildcard_host_is_checked_on_loopback(serving_server, monkeypatch):
    monkeypatch.setenv("NIGHTSHIFT_HOST", "0.0.0.0")  # the server listens everywhere; the check asks loopback
    monkeypatch.setenv("NIGHTSHIFT_PORT", str(urlsplit(serving_server.url).port))
    assert healthcheck.main() == 0


def test_nothing_listening_is_unhealthy_and_says_where_it_asked(monkeypatch, capsys):
    port = free_port()
    monkeypatch.setenv("NIGHTSHIFT_HOST", "127.0.0.1")
    monkeypatch.setenv("NIGHTSHIFT_PORT", str(port))
    assert healthcheck.main() == 1
    assert f"healthcheck: http://127.0.0.1:{port}/v2/health/ready:" in capsys.readouterr().err

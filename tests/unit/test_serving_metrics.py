"""Prometheus metrics (:mod:`nightshift.serving.metrics`): what ``/metrics`` counts, and the
event loop's lock-free histogram."""

from __future__ import annotations

from tests.unit.serving_support import metric, metric_text


def test_metrics_count_routes_codes_and_stages(serving_server, http, x):
    url = serving_server.url
    ok_before = metric(http, url, 'nightshift_requests_total{code="200",method="POST",route="infer"}')
    bad_before = metric(http, url, 'nightshift_request_errors_total{code="400",route="infer"}')
    nf_before = metric(http, url, 'nightshift_request_errors_total{code="404",route="unknown"}')
    body = {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "UINT8", "data": x.ravel().tolist()}]}
    assert http.post(f"{url}/v2/models/tiny/infer", json=body).status_code == 200
    assert http.post(f"{url}/v2/models/tiny/infer", json={"inputs": []}).status_code == 400
    assert http.get(f"{url}/nope").status_code == 404
    r = http.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = r.text
    assert metric_text(text, 'nightshift_requests_total{code="200",method="POST",route="infer"}') == ok_before + 1
    assert metric_text(text, 'nightshift_request_errors_total{code="400",route="infer"}') == bad_before + 1
    assert metric_text(text, 'nightshift_request_errors_total{code="404",route="unknown"}') == nf_before + 1
    for stage in ("preprocess", "queue", "inference", "serialization"):
        assert metric_text(text, f'nightshift_stage_duration_seconds_count{{stage="{stage}"}}') >= 1, stage
    assert "nightshift_queue_depth 0.0" in text and "nightshift_model_ready 1.0" in text


def test_loop_histogram_exposes_what_prometheus_clients_histogram_does():
    """Same observations, same ``_bucket``/``_count``/``_sum`` lines (edges included: a value
    equal to a bound counts in that bucket, beyond the last bound only in +Inf)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from nightshift.serving.metrics import LoopHistogram

    buckets = (.0005, .001, .0025, .1, 1.0, 10.0)
    values = [0.0, 0.0004, 0.0005, 0.00051, 0.001, 0.05, 0.1, 3.0, 10.0, 11.0, 1e9]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = LoopHistogram("h_seconds", "doc", "stage", buckets, ours)
    ref = Histogram("h_seconds", "doc", ["stage"], buckets=buckets, registry=theirs)
    for v in values:
        fast.labels("queue").observe(v)
        ref.labels("queue").observe(v)
    fast.labels("idle")
    ref.labels("idle")

    def series(reg):
        return sorted(line for line in generate_latest(reg).decode().splitlines()
                      if line.startswith("h_seconds_") and "_created" not in line)

    assert series(ours) == series(theirs)
    assert 'h_seconds_bucket{le="0.0005",stage="queue"} 3.0' in series(ours)
    assert 'h_seconds_count{stage="idle"} 0.0' in series(ours)

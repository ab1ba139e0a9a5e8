"""Prometheus metrics of one server (``GET /metrics``), on a registry of its own.

Names follow Prometheus conventions (``_total`` counters, ``_seconds``
histograms). Labels are bounded: ``route`` is the route's name, not the path.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (.0005, .001, .0025, .005, .0075, .01, .025, .05, .075, .1, .25, .5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Series:
    """One label set of a :class:`LoopHistogram`: bucket counts (the last one +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with le >= value
        self.sum += value


class LoopHistogram:
    """A Prometheus histogram written by one thread only, the event loop's, and read by the
    scrape (also served on the loop), so it needs no lock.

    ``prometheus_client``'s ``Histogram.observe`` takes a lock per bucket and sum update,
    about 5 µs; five of them per request were ~15% of the app's own time per request
    (``docs/benchmarks.md``). This one costs a bisect and two additions; its exposition
    (registered as a custom collector) is the same ``_bucket``/``_count``/``_sum`` series.
    """

    def __init__(self, name: str, documentation: str, label: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry):
        self.name, self.documentation, self.label = name, documentation, label
        self.bounds = [float(b) for b in buckets]
        self._series: dict[str, _Series] = {}
        registry.register(self)

    def labels(self, value: str) -> _Series:
        series = self._series.get(value)
        if series is None:
            series = self._series[value] = _Series(self.bounds)
        return series

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, series in list(self._series.items()):
            running, buckets = 0, []
            for bound, n in zip([*map(floatToGoString, self.bounds), "+Inf"], series.counts, strict=True):
                running += n
                buckets.append((bound, running))
            family.add_metric([value], buckets, series.sum)
        yield family

    def describe(self) -> list:
        return []  # collected at scrape time only


class Metrics:
    """The server's metrics.

    :param registry: default a fresh :class:`CollectorRegistry` (several apps in one process stay apart).
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("nightshift_requests", "HTTP requests answered, by route, method and status code",
                                ["route", "method", "code"], registry=r)
        self.errors = Counter("nightshift_request_errors", "Requests answered with a 4xx/5xx status, by route and code",
                              ["route", "code"], registry=r)
        # observed on the event loop's thread only (every request): lock-free, see LoopHistogram
        self.latency = LoopHistogram("nightshift_request_duration_seconds", "Time from the request to the answer",
                                     "route", _LATENCY_BUCKETS, r)
        self.stages = LoopHistogram("nightshift_stage_duration_seconds",
                                    "Per-stage time: preprocess (parse + validate), queue (waiting for a batch), "
                                    "inference (ONNX Runtime, whole batch), serialization (answer encoding)",
                                    "stage", _LATENCY_BUCKETS, r)
        # observed from the batching workers' threads: prometheus_client's locked histogram
        self.batch_size = Histogram("nightshift_batch_size", "Images per ONNX Runtime call",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.loop_lag = Histogram("nightshift_event_loop_lag_seconds",
                                  "How late the event loop ran a 100 ms timer (time it was blocked or starved of CPU)",
                                  buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0), registry=r)
        self.queue_depth = Gauge("nightshift_queue_depth", "Images waiting for a batch", registry=r)
        self.ready = Gauge("nightshift_model_ready", "1 when the model is loaded", registry=r)
        self.disconnects = Counter("nightshift_client_disconnects", "Clients that hung up before the answer",
                                   registry=r)
        self.log_written = Gauge("nightshift_request_log_records", "Request-log records written", registry=r)
        self.log_dropped = Gauge("nightshift_request_log_dropped", "Request-log samples dropped (queue full)",
                                 registry=r)
        self._stage = {s: self.stages.labels(s) for s in ("preprocess", "queue", "inference", "serialization")}
        # labelled children looked up once per label set (``labels()`` costs ~7 µs a call)
        self._req_children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    def bind(self, app: Any) -> None:
        """Read the live gauges from ``app`` at scrape time."""
        self.queue_depth.set_function(lambda: app.batcher.depth)
        self.ready.set_function(lambda: 1.0 if app.model.ready else 0.0)
        self.log_written.set_function(lambda: app.request_log.written if app.request_log is not None else 0)
        self.log_dropped.set_function(lambda: app.request_log.dropped if app.request_log is not None else 0)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count and time one answered request; call on the event loop's thread only."""
        key = (route, method, status)
        children = self._req_children.get(key)
        if children is None:  # bounded: routes, methods and status codes are fixed sets
            code = str(status)
            children = (self.requests.labels(route, method, code),
                        self.errors.labels(route, code) if status >= 400 else None, self.latency.labels(route))
            self._req_children[key] = children
        requests, errors, latency = children
        requests.inc()
        if errors is not None:
            errors.inc()
        latency.observe(seconds)

    def stage(self, name: str, seconds: float) -> None:
        """Observe one request's stage time; call on the event loop's thread only."""
        self._stage[name].observe(seconds)

    def observe_batch(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

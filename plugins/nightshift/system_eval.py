"""The system evaluation: run the inference image as it will serve and measure what a client sees.

No Airflow here (``SystemEvalOperator`` resolves its templates, calls
:func:`run_system_eval`, logs to MLflow and pushes the result); :mod:`docker`,
:mod:`onnxruntime` and matplotlib are imported where used.

The container starts through :class:`nightshift.containers.InferenceContainer`,
whose ``containers.run`` arguments come from
:func:`nightshift.containers.serving_run_kwargs` -- the function
:class:`nightshift.deploy.LocalDeployer` starts the champion with -- in the
deployed configuration (``ServingConfig.from_env()``: the request log on at the
deployed sampling rate, the same memory limit and environment). So the latency
and throughput the gates read are those of the server as it serves, request log
included; only the port, the name, the labels and the restart policy differ.

1. **Accuracy**: the whole test split through the Open Inference Protocol, shard
   by shard; served predictions are compared with ONNX Runtime run in process on
   the exported file (when ``onnx_path`` is given): a disagreement beyond
   ``skew_tolerance`` raises :class:`~nightshift.errors.PreprocessingSkew`,
   naming example image indices.
2. **Load**: ``concurrency`` clients for ``load_seconds`` seconds, binary
   protocol, one test image per request (:func:`load_phase`, :mod:`nightshift.loadgen`):
   p50/p95/p99, throughput, error rate; 503s and client timeouts are counted apart.
3. **Request log**: how many records the server wrote and dropped (its
   ``/metrics``), and how many reached the folder: evidence the log was on.

Results go to ``<out_dir>/system_eval.json``, the latency histogram under load to
``<out_dir>/latency_histogram.png``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from nightshift.containers import ServingConfig
from nightshift.contracts import SYSTEM_EVAL_FILE
from nightshift.errors import PreprocessingSkew

log = logging.getLogger(__name__)

#: Sub-folder of ``out_dir`` the evaluated server writes its request log to.
REQUEST_LOG_SUBDIR = "requests"


class TestSplit(Protocol):
    """What :func:`run_system_eval` reads of a snapshot (:class:`nightshift.data.snapshot.Snapshot`)."""

    @property
    def class_names(self) -> list[str]: ...

    def iter_split(self, name: str) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


def load_phase(url: str, model_name: str, image: np.ndarray, *, concurrency: int, seconds: float,
               timeout_s: float, warmup_s: float = 0.5) -> Any:
    """``concurrency`` keep-alive clients send ``image`` (one per request, binary protocol)
    for ``seconds`` after ``warmup_s``. :returns: a :class:`nightshift.loadgen.LoadResult`."""
    from nightshift.loadgen import infer_request, run_load

    req = infer_request(url, model_name, np.asarray(image)[:1], binary=True)
    return run_load(url, req, concurrency=int(concurrency), duration_s=float(seconds), timeout_s=float(timeout_s),
                    warmup_s=warmup_s)


def offline_predictions(onnx_path: str | Path, shards: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Class indices ONNX Runtime gives in process on the exported file, in input order
    (:func:`nightshift.scoring.score_onnx`, the one offline scorer)."""
    from nightshift.scoring import score_onnx

    return score_onnx(onnx_path, shards, batch_size=256)["predictions"]


def request_log_counts(metrics_text: str) -> dict[str, int | None]:
    """``records`` written and ``dropped`` (queue full) from the server's ``/metrics`` text."""
    found: dict[str, int | None] = {"records": None, "dropped": None}
    for line in metrics_text.splitlines():
        for key, metric in (("records", "nightshift_request_log_records"), ("dropped", "nightshift_request_log_dropped")):
            if line.startswith(metric + " "):
                try:
                    found[key] = int(float(line.rsplit(" ", 1)[1]))
                except ValueError:
                    pass
    return found


def count_request_log_lines(directory: Path) -> int:
    """Records (lines) in the request-log files of ``directory``, published or still ``.part``."""
    n = 0
    for f in list(directory.glob("requests-*.jsonl")) + list(directory.glob("requests-*.jsonl.part")):
        try:
            with open(f, "rb") as fh:
                n += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
        except OSError as exc:
            log.warning("could not read request-log file %s: %s", f, exc)
    return n


def _server_request_log(url: str) -> dict[str, int | None]:
    import requests

    try:
        with requests.Session() as http:
            http.trust_env = False
            return request_log_counts(http.get(f"{url}/metrics", timeout=5).text)
    except requests.RequestException as exc:
        log.warning("could not read %s/metrics for the request-log counts: %s", url, exc)
        return {"records": None, "dropped": None}


def plot_latency_histogram(latencies_ms: Sequence[float], percentiles: dict[str, Any], path: str | Path, *,
                           title: str) -> Path:
    """Histogram of request latencies with the p50/p95/p99 lines (PNG, written atomically)."""
    from nightshift.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(list(latencies_ms), bins=60)
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        if percentiles.get(q) is not None:
            ax.axvline(percentiles[q], color="k", linestyle=style, label=f"{q} {percentiles[q]} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def run_system_eval(image: str, snapshot: TestSplit, *, model_name: str, out_dir: str | Path,
                    onnx_path: str | Path | None = None, config: ServingConfig | None = None,
                    docker_client: Any = None, batch_size: int = 32, concurrency: int = 16,
                    load_seconds: float = 5.0, request_timeout_s: float = 2.0, skew_tolerance: float = 0.005,
                    ready_timeout_s: float = 60.0, owner: str | None = None, keep_request_log: bool = False,
                    on_container: Callable[[Any], None] | None = None,
                    on_report: Callable[[dict[str, Any], Path], None] | None = None) -> dict[str, Any]:
    """Run ``image`` in the deployed configuration and evaluate it (see the module docstring).

    :param snapshot: the test split (``iter_split("test")``) and ``class_names``.
    :param out_dir: where ``system_eval.json``, the histogram and (while it runs) the request log go.
    :param onnx_path: the exported model for the skew check; ``None`` skips it (with a warning).
    :param config: how the image runs; default ``ServingConfig.from_env()``, what deploy uses.
    :param concurrency: clients in the load phase; 0 skips it.
    :param skew_tolerance: largest share of test images whose served and offline predictions
        may differ (a near-tie may flip with the batch size's numerics; skew moves far more).
    :param owner: recorded on the container (``dag/run/task``) for the leftover sweep.
    :param keep_request_log: keep the evaluated server's request-log files in
        ``out_dir/requests`` (by default they are counted and removed: load-test traffic).
    :param on_container: called with the :class:`~nightshift.containers.InferenceContainer`
        before it starts (an operator keeps it to stop it from ``on_kill``).
    :param on_report: called with the result and ``out_dir`` once ``system_eval.json`` is
        written, before a skew failure is raised (the operator logs to MLflow there).
    :returns: the result: top-level ``accuracy``, ``latency_ms`` (load phase), ``errors``
        (failed requests of both phases, timeouts and 503s of the load included),
        ``throughput_rps`` are what the promotion gates read.
    :raises ServingError: the image is missing or the server did not become ready (with its log).
    :raises PreprocessingSkew: served and offline predictions disagree beyond the tolerance,
        or the server answered none of the test images.
    """
    from nightshift.artifacts import atomic_write_json
    from nightshift.containers import InferenceContainer, sweep_containers
    from nightshift.scoring import merge_endpoint_scores, score_endpoint, skew_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or ServingConfig.from_env()
    log_dir = out_dir / REQUEST_LOG_SUBDIR
    if log_dir.exists():  # a retried try: count only this try's records
        shutil.rmtree(log_dir, ignore_errors=True)
    container = InferenceContainer(image, docker_client=docker_client, config=config, request_log_dir=log_dir,
                                   owner=owner)
    if on_container is not None:
        on_container(container)
    sweep_containers(container._client())
    concurrency = int(concurrency)
    with container:
        ready_s = container.wait_ready(float(ready_timeout_s))
        log.info("%s ready at %s after %.2fs (request log sample %s, memory limit %s)", image, container.url,
                 ready_s, config.request_log_sample, config.mem_limit)
        parts = [score_endpoint(container.url, model_name, images, labels, batch_size=int(batch_size),
                                   class_names=snapshot.class_names, return_predictions=True,
                                   warmup=3 if i == 0 else 0)
                 for i, (images, labels) in enumerate(snapshot.iter_split("test"))]  # shard by shard
        acc = merge_endpoint_scores(parts)
        served_pred = acc.pop("predictions")
        first_images = next(snapshot.iter_split("test"), (None, None))[0]
        if acc["errors"]:
            log.warning("%d request(s) failed; first: %s; container log tail:\n%s", acc["errors"],
                        acc.get("error_samples"), container.logs(tail=50))
        load: dict[str, Any] | None = None
        latencies: list[float] = []
        if concurrency > 0 and first_images is not None and len(first_images):
            lr = load_phase(container.url, model_name, first_images[:1], concurrency=concurrency,
                            seconds=float(load_seconds), timeout_s=float(request_timeout_s))
            load, latencies = lr.summary(), lr.latencies_ms
            if load["errors"] or load["timeouts"]:
                log.warning("load phase: %d errors, %d timeouts; container log tail:\n%s", load["errors"],
                            load["timeouts"], container.logs(tail=50))
        request_log = _server_request_log(container.url)
        logs_tail = container.logs(tail=200)
    request_log.update(sample_rate=config.request_log_sample, on_disk=count_request_log_lines(log_dir),
                       kept=str(log_dir) if keep_request_log else None)
    if not keep_request_log:
        shutil.rmtree(log_dir, ignore_errors=True)

    skew = None
    if onnx_path:
        skew = skew_report(served_pred, offline_predictions(onnx_path, snapshot.iter_split("test")))
    else:
        log.warning("no exported model given: the served-vs-in-process skew check is not run")
    if load is None and concurrency > 0:
        log.warning("the load phase did not run (no test images): no latency under load is reported, "
                    "so the latency and throughput gates cannot pass")
    result: dict[str, Any] = {
        "image": image, "ready_seconds": ready_s, "n": acc["n"], "accuracy": acc["accuracy"],
        "accuracy_all": acc["accuracy_all"], "correct": acc["correct"],
        # a request refused with 503 under the evaluation's own bounded load is a failure too
        "errors": acc["errors"] + ((load["errors"] + load["timeouts"] + load["rejected_503"]) if load else 0),
        "latency_ms": load["latency_ms"] if load else (acc["latency_ms"] if concurrency <= 0 else {}),
        "throughput_ips": (load or acc)["throughput_ips"],
        "throughput_rps": load["throughput_rps"] if load else None,
        "accuracy_phase": {k: v for k, v in acc.items() if k != "latencies"}, "load": load, "skew": skew,
        # the configuration measured: deploy's (nightshift.containers), request log included
        "serving": {"mem_limit": config.mem_limit, "request_log_sample": config.request_log_sample,
                    "environment": dict(config.environment)},
        "request_log": request_log, "latency_histogram": None,
    }
    if latencies and load:
        result["latency_histogram"] = str(plot_latency_histogram(
            latencies, load["latency_ms"], out_dir / "latency_histogram.png",
            title=f"{image} under load (c={load['concurrency']}, request log {config.request_log_sample:g})"))
    report = out_dir / SYSTEM_EVAL_FILE
    atomic_write_json(report, result)
    if on_report is not None:
        on_report(result, out_dir)
    lat = result["latency_ms"]
    log.info("served accuracy %s on %d images; under load (c=%s): p50 %s / p95 %s / p99 %s ms, %s req/s, %d errors; "
             "request log: %s records written, %s dropped", result["accuracy"], result["n"], concurrency,
             lat.get("p50"), lat.get("p95"), lat.get("p99"), result["throughput_rps"], result["errors"],
             request_log.get("records"), request_log.get("dropped"))
    if skew is not None and skew["mismatch_rate"] is None:
        raise PreprocessingSkew(f"the skew check compared no images: the server answered none of the "
                                f"{result['n']} test images; report {report}", logs=logs_tail)
    if skew is not None and skew["mismatch_rate"] > float(skew_tolerance):
        raise PreprocessingSkew(
            f"preprocessing skew: the served model disagrees with ONNX Runtime in process on "
            f"{skew['mismatches']} of {skew['n']} test images ({skew['mismatch_rate']:.2%} > tolerance "
            f"{float(skew_tolerance):.2%}); examples (image index, served, offline): "
            f"{[(e['index'], e['served'], e['offline']) for e in skew['examples']]}; report {report}",
            logs=logs_tail)
    return result


__all__ = ["REQUEST_LOG_SUBDIR", "count_request_log_lines", "load_phase", "offline_predictions",
           "plot_latency_histogram", "request_log_counts", "run_system_eval"]

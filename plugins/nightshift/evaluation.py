"""System evaluation: run the inference image and check what it answers (OIP v2).

No Airflow here; :mod:`docker` and :mod:`requests` are imported where used.
:class:`InferenceContainer` runs the image through
:func:`nightshift.containers.serving_run_kwargs`, the function deployment uses
too (host network bound to 127.0.0.1 on a free port, the deployed memory and
process limits, every capability dropped, no privilege escalation, and the
request log when given a folder); :func:`sweep_containers` removes containers
that a dead worker left behind. :func:`evaluate_endpoint` sends a labelled test
set through ``POST /v2/models/{name}/infer`` and reports accuracy, and
:func:`skew_report` compares it with the offline predictions. The whole system
evaluation (accuracy, skew, load) is :func:`nightshift.system_eval.run_system_eval`;
the load client lives in :mod:`nightshift.loadgen`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nightshift.containers import LOOPBACK, ROLE_LABEL, ServingConfig, free_port, serving_run_kwargs
from nightshift.errors import DataError, ServingError

log = logging.getLogger(__name__)

#: ``ROLE_LABEL`` value of every evaluation container, so leftovers can be found.
ROLE_SYSTEM_EVAL = "system-eval"
STARTED_LABEL = "ai.nightshift.started"
HOST_LABEL = "ai.nightshift.host"
OWNER_LABEL = "ai.nightshift.owner"


class InferenceContainer:
    """One inference container for an evaluation, as a context manager.

    The container runs as :func:`nightshift.containers.serving_run_kwargs` says a
    serving container runs (the arguments :class:`nightshift.deploy.LocalDeployer`
    uses too): host network, 127.0.0.1 on a free port, ``config``'s memory limit,
    environment and request-log sampling, the request log mounted from
    ``request_log_dir``. It is labelled ``ai.nightshift.role=system-eval`` and has
    no restart policy. :meth:`stop` force-removes it; it is idempotent and
    thread-safe, so call it from ``finally`` and from an operator's ``on_kill``.

    :param image: image reference or id to run.
    :param docker_client: a ``docker.DockerClient``; default ``docker.from_env()``.
    :param port: port to serve on; default a free one.
    :param name: container name; default ``nightshift-eval-<random>``.
    :param config: how the image runs; default ``ServingConfig.from_env()`` (the deployed one).
    :param request_log_dir: host folder for the request log (created, not world-writable);
        ``None``: no request log.
    :param labels: extra labels.
    :param owner: recorded as label ``ai.nightshift.owner`` (e.g. ``dag/run/task``) for the sweep.
    :param command: override the image's command (tests and debugging).
    :param environment: extra environment variables on top of ``config``'s (tests and the
        model-load variant; the system evaluation passes none).
    :param volumes: extra docker volume bindings (tests and the model-load variant).
    """

    def __init__(
        self,
        image: str,
        *,
        docker_client: Any | None = None,
        port: int | None = None,
        name: str | None = None,
        config: ServingConfig | None = None,
        request_log_dir: str | os.PathLike | None = None,
        labels: dict[str, str] | None = None,
        owner: str | None = None,
        command: str | Sequence[str] | None = None,
        environment: dict[str, str] | None = None,
        volumes: dict[str, dict[str, str]] | None = None,
    ):
        self.image = image
        self.client = docker_client
        self.port = port or free_port()
        self.name = name or f"nightshift-eval-{uuid.uuid4().hex[:12]}"
        config = config or ServingConfig.from_env()
        if environment:
            config = dataclasses.replace(config, environment={**config.environment, **environment})
        self.config = config
        self.request_log_dir = Path(request_log_dir) if request_log_dir is not None else None
        self.command = list(command) if command is not None and not isinstance(command, str) else command
        self.labels = {**(labels or {}), ROLE_LABEL: ROLE_SYSTEM_EVAL, STARTED_LABEL: str(int(time.time())),
                       HOST_LABEL: socket.gethostname()}
        if owner:
            self.labels[OWNER_LABEL] = owner
        self.volumes = volumes
        self.container: Any = None
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False

    @property
    def url(self) -> str:
        """Base URL of the server, ``http://127.0.0.1:<port>``."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def container_id(self) -> str | None:
        """The container's id once started."""
        return getattr(self.container, "id", None)

    def _client(self) -> Any:
        if self.client is None:
            import docker
            from docker.errors import DockerException

            try:
                self.client = docker.from_env(timeout=120)
                self.client.ping()
            except DockerException as exc:
                raise ServingError(
                    f"cannot reach the Docker daemon ({os.environ.get('DOCKER_HOST', 'unix:///var/run/docker.sock')}):"
                    f" {exc}. Start one with scripts/ensure_docker.sh (or `make setup`)."
                ) from exc
        return self.client

    def run_kwargs(self) -> dict[str, Any]:
        """The ``containers.run`` arguments (image included): :func:`serving_run_kwargs`
        for this container, plus the extra ``volumes`` when given. Creates the request-log folder."""
        spec = serving_run_kwargs(self.image, name=self.name, port=self.port, config=self.config,
                                  request_log_dir=self.request_log_dir, labels=self.labels, restart=False,
                                  command=self.command)
        if self.volumes:
            spec["volumes"] = {**spec.get("volumes", {}), **self.volumes}
        return spec

    def start(self) -> "InferenceContainer":
        """Run the image detached on the host network.

        :returns: ``self``.
        :raises ServingError: the image is missing or the daemon refused; the
            half-created container (if any) is removed.
        """
        from docker.errors import APIError, ImageNotFound

        client = self._client()
        with self._lock:
            if self._stopped:
                raise ServingError(f"container {self.name} was already stopped; create a new InferenceContainer")
            if self._started:
                return self
            self._started = True
        try:  # containers.run would try to *pull* a missing image; never do that
            client.images.get(self.image)
        except ImageNotFound:
            raise ServingError(f"image {self.image} does not exist in the local daemon; build it first") from None
        log.info("starting %s from %s on %s", self.name, self.image, self.url)
        try:
            spec = self.run_kwargs()
            container = client.containers.run(spec.pop("image"), **spec)
        except ImageNotFound as exc:
            self.stop()
            raise ServingError(f"image {self.image} does not exist in the local daemon; build it first") from exc
        except APIError as exc:
            self.stop()
            raise ServingError(f"could not start container {self.name} from {self.image}: {exc}") from exc
        except OSError as exc:  # the request-log folder could not be made
            self.stop()
            raise ServingError(f"could not prepare the request-log folder {self.request_log_dir} for "
                               f"{self.name}: {exc}") from exc
        with self._lock:
            self.container = container
            stopped = self._stopped
        if stopped:  # on_kill raced with start: make sure nothing is left behind
            self.stop()
            raise ServingError(f"container {self.name} was stopped while starting")
        return self

    def logs(self, tail: int = 200) -> str:
        """The container's last ``tail`` log lines ('' if unavailable)."""
        if self.container is None:
            return ""
        try:
            return self.container.logs(tail=tail).decode("utf-8", errors="replace")
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            return f"(could not read logs: {exc})"

    def wait_ready(self, timeout_s: float = 60.0, interval_s: float = 0.25) -> float:
        """Poll ``GET /v2/health/ready`` until it answers 200.

        :param timeout_s: give up after this many seconds.
        :returns: seconds it took.
        :raises ServingError: the container exited, or was not ready in time;
            carries the container log.
        """
        import requests
        from docker.errors import NotFound

        if self.container is None:
            raise ServingError(f"container {self.name} is not running; call start() first")
        t0 = time.monotonic()
        last = "no answer yet"
        with requests.Session() as http:
            http.trust_env = False  # never route 127.0.0.1 through a proxy
            while True:
                try:
                    self.container.reload()
                    state = self.container.attrs.get("State", {})
                except NotFound:
                    raise ServingError(f"container {self.name} disappeared while waiting for it to be ready") from None
                if state.get("Status") in ("exited", "dead"):
                    raise ServingError(
                        f"container {self.name} ({self.image}) exited with status {state.get('ExitCode')} "
                        f"before becoming ready at {self.url}",
                        logs=self.logs(),
                    )
                try:
                    r = http.get(f"{self.url}/v2/health/ready", timeout=2)
                    if r.status_code == 200:
                        waited = time.monotonic() - t0
                        log.info("%s ready after %.1fs", self.name, waited)
                        return waited
                    last = f"HTTP {r.status_code}: {r.text[:300]}"
                except requests.RequestException as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() - t0 > timeout_s:
                    raise ServingError(
                        f"container {self.name} ({self.image}) was not ready at {self.url}/v2/health/ready "
                        f"within {timeout_s:.0f}s; last answer: {last}",
                        logs=self.logs(),
                    )
                time.sleep(interval_s)

    def stop(self) -> None:
        """Force-remove the container. Idempotent; safe from another thread (``on_kill``)."""
        from docker.errors import APIError, NotFound

        with self._lock:
            self._stopped = True
            container, self.container = self.container, None
            started = self._started
        if not started or self.client is None:
            return
        try:
            if container is not None:
                container.remove(force=True)
            else:  # start() may have created it and failed before we got the handle
                self.client.containers.get(self.name).remove(force=True)
            log.info("removed container %s", self.name)
        except NotFound:
            pass
        except APIError as exc:
            if "already in progress" in str(exc):
                return
            log.warning("could not remove container %s: %s", self.name, exc)
            raise ServingError(f"could not remove container {self.name}: {exc}") from exc

    def __enter__(self) -> "InferenceContainer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def sweep_containers(docker_client: Any, *, older_than_s: float = 3600.0, role: str = ROLE_SYSTEM_EVAL,
                     this_host_only: bool = True) -> list[str]:
    """Remove evaluation containers left by dead workers: labelled with ``role`` and
    started more than ``older_than_s`` ago (a live evaluation is far shorter).

    :returns: the names removed.
    """
    from docker.errors import APIError, NotFound

    now = time.time()
    removed = []
    for c in docker_client.containers.list(all=True, filters={"label": f"{ROLE_LABEL}={role}"}):
        labels = c.labels or {}
        if this_host_only and labels.get(HOST_LABEL) not in (None, socket.gethostname()):
            continue
        try:
            started = float(labels.get(STARTED_LABEL, "0"))
        except ValueError:
            started = 0.0
        if now - started < older_than_s:
            continue
        try:
            c.remove(force=True)
            removed.append(c.name)
            log.warning("removed leftover evaluation container %s (started %.0fs ago)", c.name, now - started)
        except (NotFound, APIError) as exc:
            log.warning("could not remove leftover container %s: %s", c.name, exc)
    return removed


# --------------------------------------------------------------------------- evaluation


def skew_report(served_pred: np.ndarray, offline_pred: np.ndarray, *, max_examples: int = 10) -> dict[str, Any]:
    """Where the served predictions differ from the offline ones (preprocessing skew).

    :returns: ``n``, ``mismatches``, ``mismatch_rate``, ``examples`` (image indices with both predictions).
    """
    served_pred = np.asarray(served_pred)
    offline_pred = np.asarray(offline_pred)
    if served_pred.shape != offline_pred.shape:
        raise DataError(f"served and offline predictions differ in shape: {served_pred.shape} vs {offline_pred.shape}")
    answered = served_pred >= 0
    bad = np.flatnonzero(answered & (served_pred != offline_pred))
    n = int(answered.sum())
    return {"n": n, "mismatches": int(bad.size), "mismatch_rate": (bad.size / n) if n else None,
            "examples": [{"index": int(i), "served": int(served_pred[i]), "offline": int(offline_pred[i])}
                         for i in bad[:max_examples]]}



def merge_evaluations(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from :func:`evaluate_endpoint` results over parts of a split
    (shards), each made with ``return_predictions=True``."""
    n = sum(p["n"] for p in parts)
    answered = sum(p["answered"] for p in parts)
    correct = sum(p["correct"] for p in parts)
    wall = sum(p["wall_s"] for p in parts)
    latencies = [x for p in parts for x in p.get("latencies", [])]
    preds = [p["predictions"] for p in parts if "predictions" in p]
    return {
        "n": n, "requests": sum(p["requests"] for p in parts), "errors": sum(p["errors"] for p in parts),
        "errored_images": sum(p["errored_images"] for p in parts), "answered": answered, "correct": correct,
        "accuracy": correct / answered if answered else None, "accuracy_all": correct / n if n else None,
        "latency_ms": _percentiles(latencies), "throughput_ips": round(answered / wall, 3) if wall > 0 else None,
        "wall_s": round(wall, 4), "batch_size": parts[0]["batch_size"] if parts else None,
        "error_samples": [e for p in parts for e in p["error_samples"]][:5], "shards": len(parts),
        "predictions": np.concatenate(preds) if preds else np.zeros(0, np.int64),
    }


def _percentiles(latencies_ms: list[float]) -> dict[str, float | None]:
    if not latencies_ms:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(latencies_ms, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p95": round(float(np.percentile(a, 95)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
        "max": round(float(a.max()), 3),
    }


def _payload(batch: np.ndarray, input_name: str) -> bytes:
    return json.dumps(
        {"inputs": [{"name": input_name, "shape": list(batch.shape), "datatype": "UINT8",
                     "data": batch.reshape(-1).tolist()}]},
        separators=(",", ":"),
    ).encode("utf-8")


def _predictions(body: Any, n: int, class_names: Sequence[str] | None) -> np.ndarray:
    """Predicted class indices from an OIP answer; ``ValueError`` says what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("outputs"), list):
        raise ValueError("response has no 'outputs' list")
    outputs = {o.get("name"): o for o in body["outputs"] if isinstance(o, dict)}
    if "logits" in outputs:
        o = outputs["logits"]
        shape = o.get("shape")
        if not isinstance(shape, list) or len(shape) != 2 or shape[0] != n:
            raise ValueError(f"logits shape is {shape}, expected [{n}, num_classes]")
        data = np.asarray(o.get("data"), dtype=np.float64)
        if data.size != shape[0] * shape[1]:
            raise ValueError(f"logits carry {data.size} values for shape {shape}")
        return data.reshape(shape).argmax(axis=1)
    if "label" in outputs and class_names is not None:
        data = outputs["label"].get("data")
        if not isinstance(data, list) or len(data) != n:
            got = len(data) if isinstance(data, list) else repr(data)
            raise ValueError(f"label output has {got} entries, expected {n}")
        index = {str(c): i for i, c in enumerate(class_names)}
        unknown = [d for d in data if str(d) not in index]
        if unknown:
            raise ValueError(f"label output holds unknown class names {unknown[:3]}")
        return np.asarray([index[str(d)] for d in data])
    raise ValueError(f"response has neither 'logits' nor (with class_names) 'label' outputs; got {list(outputs)}")


def evaluate_endpoint(
    base_url: str,
    model_name: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 1,
    timeout_s: float = 10,
    class_names: Sequence[str] | None = None,
    input_name: str = "pixels",
    warmup: int = 3,
    max_error_samples: int = 5,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Send a labelled image set through ``POST /v2/models/{model_name}/infer``.

    Errors (connection failures, timeouts, non-200 answers, malformed or
    wrongly shaped responses) are counted, not raised; the first few messages
    are kept in ``error_samples``. ``warmup`` requests with the first batch are
    sent first and not counted.

    :param base_url: e.g. ``http://127.0.0.1:8080``.
    :param images: ``uint8`` array ``(N, H, W, C)``.
    :param labels: integer array ``(N,)``, indices into the class list.
    :param batch_size: images per request.
    :param timeout_s: per-request timeout.
    :param class_names: needed only if the server returns ``label`` but no ``logits``.
    :param input_name: the model's input tensor name.
    :returns: ``n``, ``requests``, ``errors`` (failed requests), ``errored_images``,
        ``answered`` (images), ``correct``, ``accuracy`` (over answered images,
        ``None`` if none), ``accuracy_all`` (errored images count as wrong),
        ``latency_ms`` (``p50``/``p95``/``p99``/``mean``/``max`` over successful
        requests), ``throughput_ips`` (answered images per second of wall time),
        ``wall_s``, ``batch_size``, ``error_samples`` (and with ``return_predictions``,
        ``predictions``: an int array, -1 where the request failed).
    :raises DataError: ``images``/``labels`` have the wrong type or shape.
    """
    import requests

    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"images must be a uint8 array (N, H, W, C); got {images.dtype} with shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"labels must have shape ({images.shape[0]},) to match images; got {labels.shape}")
    if labels.size and labels.dtype.kind not in "iu":
        raise DataError(f"labels must be integers (class indices); got {labels.dtype}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n = int(images.shape[0])
    url = f"{base_url.rstrip('/')}/v2/models/{model_name}/infer"
    headers = {"Content-Type": "application/json"}

    latencies: list[float] = []
    predictions = np.full(n, -1, dtype=np.int64)
    error_samples: list[str] = []
    n_requests = n_errors = errored_images = answered = correct = 0

    def record_error(msg: str, lo: int, hi: int) -> None:
        nonlocal n_errors, errored_images
        n_errors += 1
        errored_images += hi - lo
        if len(error_samples) < max_error_samples:
            error_samples.append(f"images {lo}..{hi - 1}: {msg}")

    with requests.Session() as http:
        http.trust_env = False  # never send 127.0.0.1 traffic through a proxy
        if n:
            first = _payload(images[: min(batch_size, n)], input_name)
            for _ in range(max(0, warmup)):
                try:
                    http.post(url, data=first, headers=headers, timeout=timeout_s)
                except requests.RequestException:
                    pass  # the timed loop will count and report failures
        t_start = time.perf_counter()
        for lo in range(0, n, batch_size):
            hi = min(lo + batch_size, n)
            body = _payload(images[lo:hi], input_name)
            n_requests += 1
            t0 = time.perf_counter()
            try:
                r = http.post(url, data=body, headers=headers, timeout=timeout_s)
            except requests.RequestException as exc:
                record_error(f"{type(exc).__name__}: {exc}", lo, hi)
                continue
            ms = (time.perf_counter() - t0) * 1000.0
            if r.status_code != 200:
                try:
                    detail = r.json().get("error", r.text)
                except ValueError:
                    detail = r.text
                record_error(f"HTTP {r.status_code}: {str(detail)[:300]}", lo, hi)
                continue
            try:
                pred = _predictions(r.json(), hi - lo, class_names)
            except ValueError as exc:
                record_error(f"malformed response: {exc}", lo, hi)
                continue
            latencies.append(ms)
            predictions[lo:hi] = pred
            answered += hi - lo
            correct += int((pred == labels[lo:hi]).sum())
        wall = time.perf_counter() - t_start

    result = {
        "n": n,
        "requests": n_requests,
        "errors": n_errors,
        "errored_images": errored_images,
        "answered": answered,
        "correct": correct,
        "accuracy": (correct / answered) if answered else None,
        "accuracy_all": (correct / n) if n else None,
        "latency_ms": _percentiles(latencies),
        "throughput_ips": round(answered / wall, 3) if wall > 0 else None,
        "wall_s": round(wall, 4),
        "batch_size": batch_size,
        "error_samples": error_samples,
    }
    if return_predictions:
        result["predictions"] = predictions
        result["latencies"] = latencies
    log.info(
        "evaluated %s: n=%d requests=%d errors=%d accuracy=%s p95=%sms throughput=%s img/s",
        url, n, n_requests, n_errors, result["accuracy"], result["latency_ms"]["p95"], result["throughput_ips"],
    )
    return result

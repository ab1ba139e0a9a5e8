from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import NightshiftViewLink, ServedDriftReportLink


class DriftMonitorOperator(NightshiftOperator):
    """Compare one window of the champion's served traffic (its request log) with the
    champion's reference data (Evidently): image statistics, confidence, predicted
    class mix and embeddings. Writes an HTML + JSON report and a line in the drift
    timeline. Skips (not fails) when there is no champion yet.

    The request log is a folder on the Docker host that serves the champion (the serving
    container's bind mount, :func:`nightshift.contracts.request_log_dir`); it is never in the
    artifact store. So this task runs where it is written, on the Docker queue
    (``NIGHTSHIFT_DOCKER_QUEUE``, as ``deploy`` does), and publishes what it judged to the
    store: the window of request-log records it read (``request_window.parquet``), the reports,
    and the timeline point, so the evidence is readable from any worker and from the
    Nightshift view. The champion's reference frame is cached in the store too (keyed by its
    version and ONNX digest).

    :param model_name: registered model whose ``champion`` is served. (templated)
    :param window_start: start of the traffic window, ISO time; default the run's
        data interval start. (templated)
    :param window_end: end of the window (exclusive); default the data interval end. (templated)
    :param min_rows: fewer requests than this in the window -> "not enough data". (templated)
    :param drift_share_threshold: share of drifted features that counts as drift. (templated)
    :param embedding_threshold: ROC AUC of the embedding drift classifier that counts as drift. (templated)
    :param request_log_dir: where the serving container writes its request log, on this
        worker's Docker host; default ``<working copy>/request_logs/<model_name>``. (templated)
    """

    template_fields: Sequence[str] = ("model_name", "window_start", "window_end", "min_rows", "drift_share_threshold",
                                      "embedding_threshold", "request_log_dir")
    #: Nothing of the run folder: its reports and the reference cache live under the model's drift
    #: folder (fetched in ``execute``), the request log on the Docker host.
    run_folder_reads: Sequence[str] = ()
    operator_extra_links = (ServedDriftReportLink(), NightshiftViewLink(),)
    ui_color = "#f8bbd0"

    def __init__(self, *, model_name: str, window_start: Any = None, window_end: Any = None, min_rows: int = 100,
                 drift_share_threshold: float = 0.5, embedding_threshold: float = 0.6,
                 request_log_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.window_start = window_start
        self.window_end = window_end
        self.min_rows = min_rows
        self.drift_share_threshold = drift_share_threshold
        self.embedding_threshold = embedding_threshold
        self.request_log_dir = request_log_dir

    def execute(self, context: Any) -> dict[str, Any]:
        from pathlib import Path

        from airflow.sdk.exceptions import AirflowSkipException

        from nightshift import contracts, monitoring, registry, state
        from nightshift.artifacts import folder_name
        from nightshift.data.snapshot import load_snapshot
        from nightshift.errors import DataError
        from nightshift.scoring import fetch_model_onnx

        start = monitoring._ts(self.window_start or context["data_interval_start"])
        end = monitoring._ts(self.window_end or context["data_interval_end"])
        c = self.mlflow
        champion = registry.get_champion(c, self.model_name)
        if champion is None:
            raise AirflowSkipException(f"no champion of {self.model_name} yet: nothing is served, nothing to monitor")
        tags = champion["tags"]
        snap_uri, sha = tags.get(contracts.tag("snapshot_uri")), tags.get(contracts.tag("onnx_sha256"), "")
        if not snap_uri:
            raise DataError(f"champion v{champion['version']} has no {contracts.tag('snapshot_uri')} tag: "
                            "its reference data cannot be found")
        store = self.store
        root = store.local_root
        base = contracts.drift_timeline_path(root, self.model_name).parent
        cache = base / f"reference-v{champion['version']}-{sha[:12]}.parquet"  # keyed by everything it depends on
        if store.fetch(store.to_uri(cache), required=False).is_file():  # built by an earlier check, any worker
            reference = monitoring.champion_reference(None, None, cache)
        else:
            onnx = fetch_model_onnx(c, self.model_name, champion["version"], base / "champion" / champion["version"])
            reference = monitoring.champion_reference(load_snapshot(snap_uri, store=store), onnx, cache)
            store.publish(cache)
        log_dir = Path(self.request_log_dir or contracts.request_log_dir(root, self.model_name))
        window = monitoring.read_request_log(log_dir, start, end, model_name=self.model_name)
        current = window
        served_by = {}
        if "model_version" in current.columns and sha:
            served_by = current["model_version"].astype(str).value_counts().to_dict()
            current = current[current["model_version"].astype(str) == sha[:12]]
        self.log.info("window %s .. %s: %d request(s) from the champion v%s (%s) in %s; by served version: %s",
                      start.isoformat(), end.isoformat(), len(current), champion["version"], sha[:12], log_dir,
                      served_by)
        out = base / folder_name(context["run_id"])
        result = monitoring.check_served_drift(reference, current, out, min_rows=int(self.min_rows),
                                               drift_share_threshold=float(self.drift_share_threshold),
                                               embedding_threshold=float(self.embedding_threshold))
        others = {v: n for v, n in served_by.items() if v != sha[:12]}
        if result["status"] == "not_enough_data" and others:  # traffic there was, from another model
            result["message"] += (
                f"; {sum(others.values())} other request(s) in the window were answered by other model versions "
                f"(by ONNX sha256 prefix: {others}), not by the champion v{champion['version']} ({sha[:12]}): is the "
                "deployment serving the champion? promote_model and rollback_model redeploy it")
        # the evidence leaves this host: what was read (every served version's records) and the reports
        monitoring.write_request_window(window, out / monitoring.REQUEST_WINDOW)
        store.publish(out)
        for k in ("report_html", "report_json"):
            if result.get(k):
                result[k] = store.to_uri(result[k])
        result.update({"model_name": self.model_name, "champion_version": champion["version"],
                       "window_start": start.isoformat(), "window_end": end.isoformat(),
                       "served_versions": served_by, "request_log_dir": str(log_dir),
                       "request_window": store.to_uri(out / monitoring.REQUEST_WINDOW)})
        state.append_drift_point(store, self.model_name, {
            "time": end.isoformat(), "window_start": start.isoformat(), "window_end": end.isoformat(),
            "status": result["status"], "drift_detected": result["drift_detected"],
            "drifted_share": result.get("drifted_share"), "embedding_drift_score": result.get("embedding_drift_score"),
            "n": result["n_current"], "champion_version": champion["version"], "report": result.get("report_html"),
            "message": result.get("message"),
            "dag_id": self.dag_id, "run_id": context["run_id"]},
            key=f"{self.dag_id}/{context['run_id']}/{self.task_id}/{start.isoformat()}/{end.isoformat()}")
        if result["status"] == "not_enough_data":
            self.log.info("not enough traffic: %s", result["message"])
        else:
            self.log.info("drift %s: %d feature(s) drifted (share %.2f): %s; embedding score %s; report %s",
                          "DETECTED" if result["drift_detected"] else "not detected", len(result["drifted_columns"]),
                          result["drifted_share"], result["drifted_columns"], result["embedding_drift_score"],
                          result["report_html"])
        return {k: v for k, v in result.items() if k != "columns"}

from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import DriftReportLink


class DriftCheckOperator(NightshiftOperator):
    """Compare the new snapshot's profile with the current champion's training data
    (Evidently). Saves an HTML and a JSON report. With no champion yet, records
    ``no_reference`` and succeeds.

    :param snapshot: the ``collect_data`` result (XCom). (templated)
    :param model_name: registered model whose ``champion`` is the reference. (templated)
    :param drift_share_threshold: share of drifted columns that counts as dataset drift. (templated)
    """

    template_fields: Sequence[str] = ("snapshot", "model_name", "drift_share_threshold")
    #: what of the run folder it reads (fetched first on an object store): its own folder
    run_folder_reads: Sequence[str] = ("drift",)
    operator_extra_links = (DriftReportLink(),)

    def __init__(self, *, snapshot: Any, model_name: str = "nightshift-classifier",
                 drift_share_threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.snapshot = snapshot
        self.model_name = model_name
        self.drift_share_threshold = drift_share_threshold

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift import registry
        from nightshift.data.snapshot import fetch_snapshot, load_snapshot
        from nightshift.drift import check_drift
        from nightshift.errors import DataError
        from nightshift.store import StoreError

        snapshot_uri = self.require(self.snapshot, "snapshot", "collect_data")["snapshot_uri"]
        current = load_snapshot(fetch_snapshot(self.store, snapshot_uri))
        champion = registry.get_champion(self.mlflow, self.model_name)
        reference = None
        ref_desc: dict[str, Any] = {"champion_version": None, "reference_snapshot": None}
        unavailable = None
        if champion is not None:
            ref_uri = champion["tags"].get("nightshift.snapshot_uri")
            ref_desc = {"champion_version": champion["version"], "reference_snapshot": ref_uri}
            try:
                if not ref_uri:
                    raise DataError(f"champion v{champion['version']} of {self.model_name} has no "
                                    "'nightshift.snapshot_uri' tag: its training data is unknown")
                reference = load_snapshot(fetch_snapshot(self.store, ref_uri)).profile(locations=False)
                reference = reference[reference["split"] == "train"]
            except (DataError, StoreError) as exc:
                if isinstance(exc, StoreError) and exc.retryable:  # the store is down: retry, do not guess
                    raise
                # Drift is evidence, not a gate: the champion's data may predate this snapshot
                # format or be gone. Say so loudly; promotion still re-scores the champion itself.
                unavailable = str(exc)
                self.log.warning("the champion's training data cannot be read, so drift is not measured: %s", exc)
        cur = current.profile(locations=False)
        result = check_drift(reference, cur[cur["split"] == "train"], self.run_dir(context, "drift"),
                             drift_share_threshold=float(self.drift_share_threshold))
        result.update(ref_desc)
        if unavailable:
            result.update({"status": "reference_unavailable", "message": unavailable})
        if result["status"] in ("no_reference", "reference_unavailable"):
            self.log.info("No readable reference for %s (%s): drift not measured (not a failure)", self.model_name,
                          result.get("message", "no champion yet"))
        else:
            self.log.info("Drift vs champion v%s: %d/%d columns drifted (share %.2f) -> drift_detected=%s; report %s",
                          champion["version"], result["n_drifted"], result["n_columns"], result["drifted_share"],
                          result["drift_detected"], result["report_html"])
        return result

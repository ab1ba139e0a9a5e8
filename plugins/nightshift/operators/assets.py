"""Airflow Assets Nightshift produces and consumes."""

from __future__ import annotations

from airflow.sdk import Asset

#: Updated with ``extra={"digest": ..., "uri": ...}`` every time a snapshot is collected.
SNAPSHOT_ASSET = Asset(name="nightshift_snapshot", uri="nightshift://snapshot", group="nightshift")

#: Emitted when served traffic of the default model has drifted from the champion's reference
#: data; ``nightly_retrain`` runs on it as well as on its cron schedule.
DRIFT_DETECTED_ASSET = Asset(name="nightshift_drift_detected", uri="nightshift://drift-detected", group="nightshift")


def drift_asset(model_name: str | None = None) -> Asset:
    """The drift Asset of one model: :data:`DRIFT_DETECTED_ASSET` for the default model (``None``),
    ``nightshift_drift_detected__<model>`` for every other model of ``include/models.yaml``, so
    one model's drift (``drift_monitor__<model>``) retrains only that model
    (``nightly_retrain__<model>``)."""
    if model_name is None:
        return DRIFT_DETECTED_ASSET
    return Asset(name=f"nightshift_drift_detected__{model_name}", uri=f"nightshift://drift-detected/{model_name}",
                 group="nightshift")

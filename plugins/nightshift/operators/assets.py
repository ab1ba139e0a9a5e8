"""Airflow Assets Nightshift produces and consumes."""

from __future__ import annotations

from airflow.sdk import Asset

#: Updated with ``extra={"digest": ..., "uri": ...}`` every time a snapshot is collected.
SNAPSHOT_ASSET = Asset(name="nightshift_snapshot", uri="nightshift://snapshot", group="nightshift")

#: Emitted when served traffic has drifted from the champion's reference data;
#: ``nightly_retrain`` runs on it as well as on its cron schedule.
DRIFT_DETECTED_ASSET = Asset(name="nightshift_drift_detected", uri="nightshift://drift-detected", group="nightshift")

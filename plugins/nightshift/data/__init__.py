"""Data collection: sources, content-addressed snapshots, per-image profiles."""

from nightshift.data.snapshot import Snapshot, load_snapshot, write_snapshot

__all__ = ["Snapshot", "load_snapshot", "write_snapshot"]

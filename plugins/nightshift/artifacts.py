"""Artifact store helpers: atomic writes, content hashes, run-scoped folders.

Every write goes to a temporary sibling first and is renamed into place, so a
retried or killed task never leaves a half-written file where a reader looks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, record: Any) -> Path:
    """Append one JSON line with a single write (concurrent appenders do not interleave)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(json_safe(record), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` when the block succeeds.

    If ``final`` already exists and ``replace`` is false (content-addressed
    data), the temporary directory is discarded and the existing one kept.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not replace:
                shutil.rmtree(tmp)
                return
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
#: Joins a sanitised name and the hash of the original; never part of a kept name (see :func:`folder_name`).
_HASH_SEP = "~"
_MAX_KEPT = 200
#: Written into every run folder by :func:`run_dir`: which DAG run the folder belongs to.
RUN_META = "run.json"


def safe_name(value: str) -> str:
    """A file-system-safe form of a run id or name (``manual__2026-01-01T00:00`` ...).

    Not injective (``_x``, ``x_`` and ``x`` all give ``x``): use :func:`folder_name`
    for anything that names a folder one id owns.
    """
    return _UNSAFE.sub("_", value).strip("._") or "run"


def folder_name(value: str) -> str:
    """The folder name of a DAG id or run id, one folder per id (injective).

    An id that is already safe (``safe_name(value) == value``, at most 200
    characters) is its own folder name, so existing folders keep their path.
    Any other id becomes ``<safe_name(value)[:100]>~<16 hex of sha256(value)>``:
    ``~`` is never in a kept name, so a sanitised name cannot equal a kept one,
    and the hash tells apart ids that sanitise alike (``_private``, ``private_``).
    """
    value = str(value)
    if safe_name(value) == value and len(value) <= _MAX_KEPT:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{safe_name(value)[:100]}{_HASH_SEP}{digest}"


def run_path(artifact_root: str | os.PathLike, dag_id: str, run_id: str) -> Path:
    """Where one DAG run's artifacts are: ``<root>/runs/<folder_name(dag_id)>/<folder_name(run_id)>``.

    Creates nothing: readers use this, writers use :func:`run_dir`. The one place
    that maps a DAG run to its folder.
    """
    return Path(artifact_root) / "runs" / folder_name(dag_id) / folder_name(run_id)


def run_dir(artifact_root: str | os.PathLike, dag_id: str, run_id: str) -> Path:
    """The folder for one DAG run's artifacts (:func:`run_path`), created with its
    :data:`RUN_META` (``{"dag_id", "run_id"}``) on first use.

    :raises ValueError: the folder's :data:`RUN_META` names another DAG run.
    """
    path = run_path(artifact_root, dag_id, run_id)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"dag_id": str(dag_id), "run_id": str(run_id)}
    recorded = read_run_meta(path)
    if recorded is None:
        atomic_write_json(path / RUN_META, meta)
    elif recorded != meta:
        raise ValueError(f"run folder {path} belongs to DAG {recorded.get('dag_id')!r} run "
                         f"{recorded.get('run_id')!r} (its {RUN_META}), not to DAG {dag_id!r} run {run_id!r}")
    return path


def folder_owners(folder: str, ids: Iterable[str]) -> list[str]:
    """Those of ``ids`` whose runs may be in the folder named ``folder``: its
    :func:`folder_name`, or the :func:`safe_name` folders used before names were
    injective (which ``_x``, ``x_`` and ``x`` shared)."""
    return sorted(i for i in ids if folder in (folder_name(i), safe_name(i)))


def read_run_meta(folder: str | os.PathLike) -> dict[str, str] | None:
    """The ``{"dag_id", "run_id"}`` a run folder records, or None (no, or an unreadable, :data:`RUN_META`)."""
    try:
        meta = read_json(Path(folder) / RUN_META)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("dag_id"), str) or not isinstance(meta.get("run_id"), str):
        return None
    return {"dag_id": meta["dag_id"], "run_id": meta["run_id"]}


def json_safe(value: Any) -> Any:
    """Plain JSON values: numpy/pandas scalars and arrays, enums, sets and tuples
    become Python values; NaN, inf, ``pd.NA`` and ``pd.NaT`` become None."""
    import enum
    import math

    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and hasattr(value, "dtype") and getattr(value, "ndim", 0) > 0:  # ndarray
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, enum.Enum):  # str-based status enums: keep the value, not "Cls.MEMBER"
        value = value.value
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    return str(value)

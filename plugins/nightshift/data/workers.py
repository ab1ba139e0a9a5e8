"""Worker processes for collection that never run the parent's main script.

CPython's ``spawn`` (and ``forkserver``) start method prepares each child from
:func:`multiprocessing.spawn.get_preparation_data`, which reads
``sys.modules['__main__']`` *of the parent* when the child starts: a main with a
``__spec__`` is re-imported by name (``_fixup_main_from_name``), a main with a
``__file__`` is re-run as ``__mp_main__`` (``_fixup_main_from_path``). Inside an
Airflow task that main is the ``airflow`` entry point, and re-running it imports
Airflow and initialises its settings in the child, where the task supervisor has
blocked metadata-DB access (``sqlalchemy.exc.ArgumentError: Could not parse
SQLAlchemy URL``) — so every decode worker dies and the pool breaks.

:func:`worker_context` is a ``spawn`` context whose processes start with the
parent's main hidden: while a worker is being started, ``sys.modules['__main__']``
is a bare stand-in module (no ``__spec__``, no ``__file__``), so the child keeps
CPython's own ``-c`` main (``from multiprocessing.spawn import spawn_main``) and
imports only what the pickled callable needs (``nightshift.data.decode``: numpy
and Pillow). The swap lasts for the start of one process, under a lock; nothing
else of the parent changes (its ``sys.path`` still travels to the child). The
callables sent to these workers must live in importable modules, never in
``__main__``.

No Airflow here: this runs in the task process and in the workers.
"""

from __future__ import annotations

import multiprocessing.context
import sys
import threading
import types

#: What ``sys.modules['__main__']`` is while a worker starts: a module with nothing to re-import.
_HIDDEN_MAIN = types.ModuleType("__main__", "Stand-in main while a Nightshift worker process starts.")
_HIDDEN_MAIN.__spec__ = None
_START_LOCK = threading.Lock()


class WorkerProcess(multiprocessing.context.SpawnProcess):
    """A spawned process that does not import or run the parent's ``__main__``."""

    def start(self) -> None:
        with _START_LOCK:
            main = sys.modules["__main__"]
            sys.modules["__main__"] = _HIDDEN_MAIN
            try:
                super().start()
            finally:
                sys.modules["__main__"] = main


class WorkerContext(multiprocessing.context.SpawnContext):
    """The ``spawn`` context, with :class:`WorkerProcess` as its ``Process``."""

    Process = WorkerProcess


def worker_context() -> WorkerContext:
    """A multiprocessing context for ``ProcessPoolExecutor(mp_context=...)`` whose workers
    start from a clean interpreter that never runs the parent's main script."""
    return WorkerContext()

"""Nightshift's Airflow plugin: operator extra links and the Nightshift view.

Airflow's plugin manager imports this file (``plugins/.airflowignore`` keeps it
from importing every module of the ``nightshift`` package as a plugin
candidate). Importing it stays cheap: the FastAPI app is built on first use, in
the API server only, and MLflow is imported inside its request handlers.

- ``operator_extra_links``: the links each Nightshift operator lists in its own
  ``operator_extra_links`` (``nightshift/operators/links.py``), registered here
  for those operators so the API server resolves them with their ``get_link``.
- ``fastapi_apps``: the Nightshift view and its report server at ``/nightshift``,
  behind Airflow's auth manager (``nightshift/ui/app.py``).
- ``listeners``: a DAG-run note saying what a run decided (``nightshift/operators/listeners.py``, the note from ``nightshift/run_notes.py``).
- ``external_views``: a "Nightshift" entry in the UI's navigation that opens the
  view inside the Airflow UI (an iframe at ``/plugin/nightshift``).

In the API server it also installs a fix for an Airflow 3.3.2 bug that made clearing a task of
a run with a deadline (every nightly run) fail
(``nightshift.operators.deadline.fix_clearing_runs_with_a_deadline``).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from nightshift.operators.links import URL_PREFIX


def _operator_links() -> list[Any]:
    """One instance per link class, with ``operators`` = the Nightshift operators that list it."""
    import nightshift.operators as ops
    from airflow.sdk import BaseOperator

    by_class: dict[type, list[type]] = {}
    for name in ops.__all__:
        op = getattr(ops, name)
        if isinstance(op, type) and issubclass(op, BaseOperator):
            for link in op.operator_extra_links:
                by_class.setdefault(type(link), []).append(op)
    # operators imported on first use only (TrainGPUPodOperator: the cncf-kubernetes provider takes
    # seconds to import): Airflow matches a link's operators by class name and module, so a named
    # stand-in registers the link without importing them
    for (module, name), link_classes in ops.LAZY_OPERATOR_LINKS.items():
        stand_in = type(name, (), {"__module__": module, "__doc__": f"Name of {module}.{name} (not imported)"})
        for link_cls in link_classes:
            by_class.setdefault(link_cls, []).append(stand_in)
    links = []
    for link_cls, operators in by_class.items():
        link_cls.operators = operators
        links.append(link_cls())
    return links


def _listeners() -> Any:
    from nightshift.operators import listeners

    return listeners


class NightshiftPlugin(AirflowPlugin):
    name = "nightshift"
    listeners = [_listeners()]
    operator_extra_links = _operator_links()
    external_views = [
        {
            "name": "Nightshift",
            "href": f"{URL_PREFIX}/",
            "url_route": "nightshift",
            "destination": "nav",
            "category": "browse",
        }
    ]

    @cached_property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        from nightshift.operators.deadline import fix_clearing_runs_with_a_deadline
        from nightshift.ui.app import create_app

        # the API server clears tasks (UI, REST): Airflow 3.3.2 fails to for runs with a deadline
        fix_clearing_runs_with_a_deadline()
        return [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Nightshift view"}]

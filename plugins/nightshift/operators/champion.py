from __future__ import annotations

from typing import Any, Sequence

from nightshift.operators.base import NightshiftOperator
from nightshift.operators.links import ModelVersionLink, NightshiftViewLink

_ACTIONS = {"forced": "promote_model", "rolled_back": "rollback_model"}


class SetChampionOperator(NightshiftOperator):
    """Move ``champion`` by a person's decision and record who, why and when (on the
    model version and in the promotion history).

    :param model_name: registered model. (templated)
    :param version: the version to make champion; for ``rolled_back``, ``previous``
        (or empty) means the champion before the current one. (templated)
    :param reason: why (required). (templated)
    :param action: ``forced`` (``promote_model``) or ``rolled_back`` (``rollback_model``).
    """

    template_fields: Sequence[str] = ("model_name", "version", "reason")
    operator_extra_links = (ModelVersionLink(), NightshiftViewLink(),)
    ui_color = "#ffe0b2"

    def __init__(self, *, model_name: str, version: Any, reason: str, action: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if action not in _ACTIONS:
            raise ValueError(f"action must be one of {sorted(_ACTIONS)}, got {action!r}")
        self.model_name = model_name
        self.version = version
        self.reason = reason
        self.action = action

    def execute(self, context: Any) -> dict[str, Any]:
        from nightshift import contracts, registry
        from nightshift.errors import ConfigError

        if not str(self.reason or "").strip():
            raise ConfigError(f"{_ACTIONS[self.action]} needs a reason: say why champion moves (it is recorded)")
        c = self.mlflow
        root = self.settings.artifact_root
        version = str(self.version or "").strip()
        if self.action == "rolled_back":
            history = list(contracts.read_jsonl(contracts.history_path(root, self.model_name)))
            version = registry.rollback_target(c, self.model_name, history, version or None)
        elif not version:
            raise ConfigError("promote_model needs the version to make champion")
        dag_run = context.get("dag_run")
        actor = getattr(dag_run, "triggering_user_name", None) or "unknown"
        out = registry.set_champion(c, self.model_name, version.lstrip("v"), reason=str(self.reason), actor=actor,
                                    action=self.action)
        contracts.append_history(root, contracts.HistoryEvent(
            model=self.model_name, action=self.action, version=out["version"],
            previous_champion=out["previous_champion"], champion=out["champion"], reason=str(self.reason),
            actor=actor, dag_id=self.dag_id, run_id=context["run_id"]))
        self.log.warning("%s: champion of %s is now v%s (was v%s), by %s: %s", _ACTIONS[self.action],
                         self.model_name, out["champion"], out["previous_champion"], actor, self.reason)
        mv = c.get_model_version(self.model_name, out["version"])
        out["image"] = dict(mv.tags).get(contracts.tag(contracts.VersionTag.IMAGE))
        out["promoted"] = True
        return out

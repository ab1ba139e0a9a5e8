"""The models Nightshift retrains, from one config file (``include/models.yaml``).

Every entry of the file is one production model: its registered name, where its data
comes from, what it looks like, when it retrains, its training recipe, its gate file,
where it is deployed, its deadline and (optionally) a hyperparameter sweep. The DAG
files ``dags/nightly_retrain.py`` and ``dags/drift_monitor.py`` generate one DAG per
entry from it; the Nightshift view lists every entry, registered or not.

Parsing is cheap and Airflow-free: the file is read (and cached per process by its
mtime and size), and each entry is validated on its own. A malformed entry does not
stop the others: it is recorded as a :class:`ModelConfigError` naming the entry and
the field, and ``dags/model_config_errors.py`` raises those as the import error the
Airflow UI shows, while the well-formed entries' DAGs load.

The path is ``$NIGHTSHIFT_MODELS_FILE``, else ``include/models.yaml`` of the project.
Schema (every key but ``name`` optional; ``defaults:`` are merged under every entry)::

    defaults: {schedule: "0 2 * * *", deadline: 4h}
    models:
      - name: nightshift-digits          # MLflow registered model; DAG ids nightly_retrain__<name>
        default: true                    # this one keeps the ids nightly_retrain / drift_monitor
        source: bundled                  # bundled | ImageFolder path or URI | torchvision:<Dataset>
        image_shape: [8, 8, 1]           # [H, W, C]; null: by source
        classes: ["0", "1"]              # expected class names in label order; null: as found
        partition_window: null           # for <root>/<partition>/<class>/<image> sources
        schedule: "0 2 * * *"            # cron (UTC); the model's drift Asset also triggers it;
                                         # null: no timed runs, the drift Asset (and Trigger) only
        recipe: {model: auto, epochs: null, batch_size: null, lr: null, require_gpu: false,
                 onnx_opset: 20, quantize_int8: false}
        gates: gates.yaml                # relative to this file; unset: $NIGHTSHIFT_GATES_FILE
        deploy: {target: docker, port: 8600}
        require_approval: false
        retrain_cooldown_hours: 6
        deadline: 4h                     # the nightly run must be done this long after it was queued
        drift: {schedule: "@hourly", min_rows: 100, drift_share_threshold: 0.5, embedding_threshold: 0.6}
                                         # drift.schedule null: the monitor runs only when triggered
        sweep: {...}                     # nightshift.sweep.parse_sweep's schema
        description: "..."
        tags: [vision]
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.errors import ConfigError

ENV_VAR = "NIGHTSHIFT_MODELS_FILE"
#: DAG ids of the default model; every other model gets ``<prefix>__<name>``.
RETRAIN_DAG = "nightly_retrain"
MONITOR_DAG = "drift_monitor"
DAG_SEPARATOR = "__"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_NAME_LEN = 100  # dag ids are at most 250 characters; MLflow names stay readable
ARCHITECTURES = ("auto", "fast_cnn", "small_cnn", "resnet18")
DEPLOY_TARGETS = ("docker", "kubernetes", "none")
CRON_ALIASES = ("@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually", "@midnight")
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,?LW#-]+$")
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*d)?\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?"
                       r"\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$")

DEFAULT_SCHEDULE = "0 2 * * *"
DEFAULT_DEADLINE_S = 4 * 3600.0
#: The recipe keys and their defaults: what the Trigger form of nightly_retrain shows when empty.
DEFAULT_RECIPE: dict[str, Any] = {"model": "auto", "epochs": None, "batch_size": None, "lr": None,
                                  "require_gpu": False, "onnx_opset": 20, "quantize_int8": False}
DEFAULT_DRIFT: dict[str, Any] = {"schedule": "@hourly", "min_rows": 100, "drift_share_threshold": 0.5,
                                 "embedding_threshold": 0.6}
ENTRY_KEYS = ("name", "default", "source", "image_shape", "classes", "partition_window", "schedule", "recipe",
              "gates", "deploy", "require_approval", "retrain_cooldown_hours", "deadline", "drift", "sweep",
              "description", "tags")


class ModelConfigError(ConfigError):
    """One thing wrong with the models file: which entry (name, or ``#<index>`` when it has
    none; ``None`` for the file as a whole), which field, and what."""

    def __init__(self, path: str | os.PathLike, entry: str | None, field: str | None, message: str) -> None:
        self.path, self.entry, self.field, self.message = str(path), entry, field, message
        where = f"model {entry!r}" if entry is not None else "the file"
        what = f", field {field!r}" if field else ""
        super().__init__(f"{self.path}: {where}{what}: {message}")


@dataclass(frozen=True)
class ModelEntry:
    """One well-formed entry of the models file."""

    name: str
    default: bool = False
    source: str = "bundled"
    image_shape: list[int] | None = None
    classes: list[str] | None = None
    partition_window: int | None = None
    #: Cron (UTC) of the timed nightly run; ``None``: no timed runs, only the drift Asset (and Trigger).
    schedule: str | None = DEFAULT_SCHEDULE
    recipe: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_RECIPE))
    #: The gate file (absolute); ``None``: the deployment's (``$NIGHTSHIFT_GATES_FILE``).
    gates_file: str | None = None
    deploy_target: str = "docker"
    deploy_port: int = 8600
    require_approval: bool = False
    retrain_cooldown_hours: float = 6
    deadline_s: float = DEFAULT_DEADLINE_S
    drift: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_DRIFT))
    #: The raw ``sweep:`` mapping (validated by ``nightshift.sweep.parse_sweep``); ``None``: no sweep.
    sweep: dict[str, Any] | None = None
    description: str = ""
    tags: tuple[str, ...] = ()
    #: Position in the file (0-based): the DAGs are generated in this order.
    index: int = 0

    @property
    def retrain_dag_id(self) -> str:
        return dag_id(RETRAIN_DAG, self)

    @property
    def monitor_dag_id(self) -> str:
        return dag_id(MONITOR_DAG, self)

    def as_dict(self) -> dict[str, Any]:
        """What the Nightshift view shows of the entry."""
        return {"name": self.name, "default": self.default, "source": self.source, "image_shape": self.image_shape,
                "classes": self.classes, "schedule": self.schedule, "recipe": dict(self.recipe),
                "gates_file": self.gates_file, "deploy_target": self.deploy_target, "deploy_port": self.deploy_port,
                "require_approval": self.require_approval, "deadline_s": self.deadline_s,
                "deadline": format_duration(self.deadline_s), "drift": dict(self.drift),
                "sweep": self.sweep is not None, "description": self.description, "tags": list(self.tags),
                "retrain_dag_id": self.retrain_dag_id, "monitor_dag_id": self.monitor_dag_id}


@dataclass(frozen=True)
class ModelsConfig:
    """The parsed file: the well-formed entries in file order, and what was wrong."""

    path: str
    models: tuple[ModelEntry, ...]
    errors: tuple[ModelConfigError, ...]

    @property
    def default(self) -> ModelEntry | None:
        """The default model (``default: true``, else the first entry); ``None`` when that entry
        is malformed (its DAGs do not load; no other model takes its DAG ids)."""
        return next((m for m in self.models if m.default), None)

    def get(self, name: str) -> ModelEntry | None:
        return next((m for m in self.models if m.name == name), None)

    def error_report(self) -> str:
        """Every error, one per line (what the import error says)."""
        n = len(self.errors)
        head = f"{n} problem{'s' if n != 1 else ''} in the models file {self.path} (the other models' DAGs load):"
        return "\n".join([head, *(f"- {e}" for e in self.errors)])

    def for_dag(self, prefix: str, parsing_dag_id: str | None = None) -> list[ModelEntry]:
        """The entries whose ``prefix`` DAG (``nightly_retrain``/``drift_monitor``) a DAG file builds:
        all of them in file order, or only the one DAG ``parsing_dag_id`` names when a task runs
        (``airflow.sdk.get_parsing_context().dag_id``; the others are not built)."""
        if not parsing_dag_id:
            return list(self.models)
        return [m for m in self.models if dag_id(prefix, m) == parsing_dag_id]


def dag_id(prefix: str, entry: ModelEntry) -> str:
    """``prefix`` for the default model, ``<prefix>__<name>`` for the others."""
    return prefix if entry.default else f"{prefix}{DAG_SEPARATOR}{entry.name}"


def models_file() -> Path:
    """``$NIGHTSHIFT_MODELS_FILE``, else the project's ``include/models.yaml``."""
    from nightshift.settings import _project_root

    return Path(os.environ.get(ENV_VAR) or _project_root() / "include" / "models.yaml")


# --------------------------------------------------------------------------- loading

_CACHE: dict[str, tuple[tuple[int, int], ModelsConfig]] = {}


def load_models(path: str | os.PathLike | None = None) -> ModelsConfig:
    """The models file parsed (once per process while its mtime and size stay the same).
    Never raises for the file's content: what is wrong is in ``errors``."""
    p = Path(path) if path is not None else models_file()
    try:
        st = p.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError as exc:
        return ModelsConfig(str(p), (), (ModelConfigError(p, None, None, f"cannot be read ({exc.strerror or exc}); "
                                                          f"set {ENV_VAR} or restore include/models.yaml"),))
    cached = _CACHE.get(str(p))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        config = ModelsConfig(str(p), (), (ModelConfigError(p, None, None, f"cannot be read ({exc})"),))
    else:
        config = parse_models(text, p)
    _CACHE[str(p)] = (stamp, config)
    return config


def parse_models(text: str, path: str | os.PathLike = "<models>") -> ModelsConfig:
    """Parse the YAML text of a models file (see the module docstring)."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return ModelsConfig(str(path), (), (ModelConfigError(path, None, None, f"is not valid YAML: {exc}"),))
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list) or not doc["models"]:
        return ModelsConfig(str(path), (), (ModelConfigError(
            path, None, "models", "the file must be a mapping with a non-empty list 'models:' of entries"),))
    unknown = sorted(set(doc) - {"models", "defaults"})
    errors: list[ModelConfigError] = []
    if unknown:
        errors.append(ModelConfigError(path, None, unknown[0], "unknown top-level key (expected 'models', 'defaults')"))
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        errors.append(ModelConfigError(path, None, "defaults", "must be a mapping of entry fields"))
        defaults = {}
    raw = doc["models"]
    default_index = _default_index(raw)
    base = Path(path).parent
    models: list[ModelEntry] = []
    for i, item in enumerate(raw):
        label = _label(item, i)
        if not isinstance(item, dict):
            errors.append(ModelConfigError(path, label, None, "an entry must be a mapping with at least 'name'"))
            continue
        merged = {**defaults, **item}
        try:
            models.append(_entry(merged, index=i, default=(i == default_index), base=base, path=path, label=label))
        except ModelConfigError as exc:
            errors.append(exc)
    models, cross = _check_across(models, path)
    return ModelsConfig(str(path), tuple(models), tuple(errors + cross))


def _label(item: Any, i: int) -> str:
    name = item.get("name") if isinstance(item, dict) else None
    return name if isinstance(name, str) and name else f"#{i + 1}"


def _default_index(raw: list[Any]) -> int:
    """The entry marked ``default: true`` (the first one so marked), else the first entry."""
    for i, item in enumerate(raw):
        if isinstance(item, dict) and item.get("default") is True:
            return i
    return 0


def _entry(d: dict[str, Any], *, index: int, default: bool, base: Path, path: Any, label: str) -> ModelEntry:
    def err(fieldname: str, message: str) -> ModelConfigError:
        return ModelConfigError(path, label, fieldname, message)

    for key in d:
        if key not in ENTRY_KEYS:
            raise err(str(key), f"unknown field (known: {', '.join(ENTRY_KEYS)})")
    name = d.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > MAX_NAME_LEN:
        raise err("name", f"must be a registered model name (letters, digits, '_', '.', '-'; at most "
                          f"{MAX_NAME_LEN} characters), got {name!r}")
    if "default" in d and not isinstance(d["default"], bool):
        raise err("default", f"must be true or false, got {d['default']!r}")
    source = d.get("source", "bundled")
    if not isinstance(source, str) or not source.strip():
        raise err("source", f"must be 'bundled', an ImageFolder path or URI, or 'torchvision:<Dataset>', got {source!r}")
    shape = d.get("image_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3
                                  and all(_is_int(v) and v >= 1 for v in shape)):
        raise err("image_shape", f"must be [height, width, channels] of positive integers, got {shape!r}")
    classes = d.get("classes")
    if classes is not None:
        if not (isinstance(classes, list) and len(classes) >= 2
                and all(isinstance(c, (str, int)) and str(c) for c in classes)):
            raise err("classes", f"must be a list of at least 2 class names, got {classes!r}")
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise err("classes", f"has duplicates: {classes!r}")
    window = d.get("partition_window")
    if window is not None and not (_is_int(window) and window >= 1):
        raise err("partition_window", f"must be a positive integer or null, got {window!r}")
    schedule = d.get("schedule", DEFAULT_SCHEDULE)
    problem = schedule_problem(schedule, "the drift Asset (and Trigger) only")
    if problem:
        raise err("schedule", problem)
    recipe = _recipe(d.get("recipe"), err)
    gates = d.get("gates")
    if gates is not None and (not isinstance(gates, str) or not gates.strip()):
        raise err("gates", f"must be the path of a gate file (relative to the models file), got {gates!r}")
    gates_file = str(base / gates) if isinstance(gates, str) and not gates.startswith(("/", "s3://")) else gates
    target, port = _deploy(d.get("deploy"), err)
    approval = d.get("require_approval", False)
    if not isinstance(approval, bool):
        raise err("require_approval", f"must be true or false, got {approval!r}")
    cooldown = d.get("retrain_cooldown_hours", 6)
    if not _is_number(cooldown) or cooldown < 0:
        raise err("retrain_cooldown_hours", f"must be a number >= 0, got {cooldown!r}")
    try:
        deadline_s = parse_duration(d.get("deadline", DEFAULT_DEADLINE_S))
    except ValueError as exc:
        raise err("deadline", str(exc)) from None
    drift = _drift(d.get("drift"), err)
    sweep = d.get("sweep")
    if sweep is not None:
        _check_sweep(sweep, err)
    description = d.get("description", "")
    if not isinstance(description, str):
        raise err("description", f"must be text, got {description!r}")
    tags = d.get("tags", [])
    if not (isinstance(tags, list) and all(isinstance(t, str) and t for t in tags)):
        raise err("tags", f"must be a list of words, got {tags!r}")
    return ModelEntry(name=name, default=default, source=source.strip(), image_shape=shape, classes=classes,
                      partition_window=window, schedule=schedule, recipe=recipe, gates_file=gates_file,
                      deploy_target=target, deploy_port=port, require_approval=approval,
                      retrain_cooldown_hours=float(cooldown) if not _is_int(cooldown) else cooldown,
                      deadline_s=deadline_s, drift=drift, sweep=sweep, description=description,
                      tags=tuple(tags), index=index)


def _recipe(raw: Any, err: Any) -> dict[str, Any]:
    if raw is None:
        return dict(DEFAULT_RECIPE)
    if not isinstance(raw, dict):
        raise err("recipe", f"must be a mapping ({', '.join(DEFAULT_RECIPE)}), got {raw!r}")
    for key in raw:
        if key not in DEFAULT_RECIPE:
            raise err(f"recipe.{key}", f"unknown recipe field (known: {', '.join(DEFAULT_RECIPE)})")
    r = {**DEFAULT_RECIPE, **raw}
    checks = {
        "model": (r["model"] in ARCHITECTURES, f"one of {', '.join(ARCHITECTURES)}"),
        "epochs": (r["epochs"] is None or (_is_int(r["epochs"]) and 1 <= r["epochs"] <= 500),
                   "an integer from 1 to 500, or null"),
        "batch_size": (r["batch_size"] is None or (_is_int(r["batch_size"]) and r["batch_size"] >= 2),
                       "an integer >= 2 (BatchNorm), or null"),
        "lr": (r["lr"] is None or (_is_number(r["lr"]) and 0 < r["lr"] <= 10), "a number in (0, 10], or null"),
        "require_gpu": (isinstance(r["require_gpu"], bool), "true or false"),
        "onnx_opset": (_is_int(r["onnx_opset"]) and 18 <= r["onnx_opset"] <= 25, "an integer from 18 to 25"),
        "quantize_int8": (isinstance(r["quantize_int8"], bool), "true or false"),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            raise err(f"recipe.{key}", f"must be {expected}, got {r[key]!r}")
    return r


def _deploy(raw: Any, err: Any) -> tuple[str, int]:
    if raw is None:
        return "docker", 8600
    if not isinstance(raw, dict):
        raise err("deploy", f"must be a mapping {{target, port}}, got {raw!r}")
    for key in raw:
        if key not in ("target", "port"):
            raise err(f"deploy.{key}", "unknown deploy field (known: target, port)")
    target, port = raw.get("target", "docker"), raw.get("port", 8600)
    if target not in DEPLOY_TARGETS:
        raise err("deploy.target", f"must be one of {', '.join(DEPLOY_TARGETS)}, got {target!r}")
    if not (_is_int(port) and 1 <= port <= 65535):
        raise err("deploy.port", f"must be a port number (1..65535), got {port!r}")
    return target, port


def _drift(raw: Any, err: Any) -> dict[str, Any]:
    if raw is None:
        return dict(DEFAULT_DRIFT)
    if not isinstance(raw, dict):
        raise err("drift", f"must be a mapping ({', '.join(DEFAULT_DRIFT)}), got {raw!r}")
    for key in raw:
        if key not in DEFAULT_DRIFT:
            raise err(f"drift.{key}", f"unknown drift field (known: {', '.join(DEFAULT_DRIFT)})")
    r = {**DEFAULT_DRIFT, **raw}
    problem = schedule_problem(r["schedule"], "only when triggered")
    if problem:
        raise err("drift.schedule", problem)
    if not (_is_int(r["min_rows"]) and r["min_rows"] >= 1):
        raise err("drift.min_rows", f"must be an integer >= 1, got {r['min_rows']!r}")
    if not (_is_number(r["drift_share_threshold"]) and 0 < r["drift_share_threshold"] <= 1):
        raise err("drift.drift_share_threshold", f"must be a number in (0, 1], got {r['drift_share_threshold']!r}")
    if not (_is_number(r["embedding_threshold"]) and 0.5 <= r["embedding_threshold"] <= 1):
        raise err("drift.embedding_threshold", f"must be a number in [0.5, 1], got {r['embedding_threshold']!r}")
    return r


def _check_sweep(sweep: Any, err: Any) -> None:
    """Validate ``sweep:`` with the sweep module's own schema (imported only for an entry that has one)."""
    if not isinstance(sweep, dict):
        raise err("sweep", f"must be a mapping (method, trials, space, ...), got {sweep!r}")
    try:
        from nightshift.sweep import parse_sweep
    except ImportError as exc:
        raise err("sweep", f"cannot be validated: nightshift.sweep is not importable ({exc})") from None
    try:
        parse_sweep(sweep)
    except (ConfigError, ValueError, TypeError) as exc:
        raise err("sweep", str(exc)) from None


def _check_across(models: list[ModelEntry], path: Any) -> tuple[list[ModelEntry], list[ModelConfigError]]:
    """Names and Docker serving ports are one per model: a later entry that repeats one is an error
    (the earlier one keeps its DAGs)."""
    kept: list[ModelEntry] = []
    errors: list[ModelConfigError] = []
    names: dict[str, int] = {}
    ports: dict[int, str] = {}
    for m in models:
        if m.name in names:
            errors.append(ModelConfigError(path, m.name, "name", f"entry #{m.index + 1} repeats the name of entry "
                                                                 f"#{names[m.name] + 1}"))
            continue
        # a deployed model holds its port and the next (its gRPC port: nightshift.deploy.grpc_port_for)
        clash = next((p for p in (m.deploy_port, m.deploy_port + 1) if p in ports), None) \
            if m.deploy_target == "docker" else None
        if clash is not None:
            what = "already serves" if clash == m.deploy_port else "(this entry's gRPC port, port + 1) already serves"
            errors.append(ModelConfigError(path, m.name, "deploy.port", f"port {clash} {what} {ports[clash]!r}; "
                                                                        "each model takes its port and the next"))
            continue
        names[m.name] = m.index
        if m.deploy_target == "docker":
            ports[m.deploy_port] = ports[m.deploy_port + 1] = m.name
        kept.append(m)
    return kept, errors


# --------------------------------------------------------------------------- small parsers


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def schedule_problem(expr: Any, null_means: str) -> str | None:
    """Why ``expr`` is neither a cron expression (:func:`cron_problem`) nor ``null`` (no timed
    runs: ``null_means``), or None. An empty or blank string is refused rather than read as
    null: "no timed runs" has to be said on purpose."""
    if expr is None:
        return None
    problem = cron_problem(expr)
    return f"{problem}; or null for no timed runs ({null_means})" if problem else None


def cron_problem(expr: Any) -> str | None:
    """Why ``expr`` is not a cron expression Airflow's cron timetable takes (5 fields, or an
    ``@daily``-style alias), or None. A syntax check without a cron library: the DAG file
    still builds the timetable, which checks the values."""
    if not isinstance(expr, str) or not expr.strip():
        return f"must be a cron expression such as '0 2 * * *', got {expr!r}"
    e = expr.strip()
    if e.startswith("@"):
        return None if e in CRON_ALIASES else f"unknown cron alias {e!r} (known: {', '.join(CRON_ALIASES)})"
    fields = e.split()
    if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
        return f"must be a cron expression of 5 fields (minute hour day month weekday), got {expr!r}"
    for value, (name, low, high) in zip(fields, _CRON_RANGES):
        for number in re.findall(r"\d+", value.split("/")[0]):  # a step (*/90) may exceed the range
            if not low <= int(number) <= high:
                return f"{name} {number} is out of range {low}-{high} in {expr!r}"
    return None


_CRON_RANGES = (("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("weekday", 0, 7))


def parse_duration(value: Any) -> float:
    """Seconds from ``4h``, ``90m``, ``1h30m``, ``45s``, ``1d`` or a number of seconds; > 0."""
    if _is_number(value):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)) and any(m.groups()):
        d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = d * 86400 + h * 3600 + mi * 60 + s
    else:
        raise ValueError(f"must be a duration such as '4h', '90m', '1h30m' or seconds, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"must be longer than 0 s, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``14400`` -> ``4h``, ``5400`` -> ``1h30m``, ``2.5`` -> ``2.5s``."""
    s = float(seconds)
    if s < 60 or s != int(s):
        return f"{s:g}s"
    s = int(s)
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
    return "".join(f"{n}{u}" for n, u in parts if n)

"""Hyperparameter sweeps: a model's ``sweep:`` entry, its trials, and the pick of the winner.

Pure and cheap to import (no Airflow, torch, numpy or MLflow): a DAG file parses a sweep at
parse time, and the operators (:mod:`nightshift.operators.sweep`) call the same functions when
they run. The entry looks like::

    sweep:
      method: grid            # grid | random
      trials: 8               # random: how many draws (grid: leave out, or the grid's size)
      seed: 0                 # random: the draws' seed (same seed, same trials)
      max_failed: 2           # failed trials tolerated: a count (2) or a fraction of the trials (0.25)
      max_parallel: 2         # trials running at once in one DAG run (and never more than the GPU pool)
      metric: val_accuracy    # what picks the winner: a validation metric only (val_*)
      space:
        lr: [0.5, 1.0, 1.5]                    # choices
        batch_size: [64, 128]
        epochs: {low: 4, high: 12}             # an int range (grid: every value, or `step`)
        weight_decay: {low: 1e-5, high: 1e-2, log: true}   # a float range (grid: needs `num`)

Grid trials are the cartesian product in the order the space lists its parameters (the last
one varies fastest); random trials are drawn by a ``random.Random(seed)`` in that same order,
so a sweep's trials are the same on every worker and every retry.

The winner is chosen on the **validation** split only (:func:`select_best`): the test split
stays untouched until the winner's gates. Ties go to the lowest trial index.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from nightshift.errors import ConfigError, NightshiftError

METHODS = ("grid", "random")
#: Most trials one sweep may have: sweeps are "tens of trials", each a training run and a task.
MAX_TRIALS = 256
DEFAULT_METRIC = "val_accuracy"
#: Failed trials tolerated when ``max_failed`` is not given: a quarter of the trials (rounded down).
DEFAULT_MAX_FAILED = 0.25
DEFAULT_MAX_PARALLEL = 2
_KEYS = {"method", "trials", "seed", "max_failed", "max_parallel", "metric", "space"}
_RANGE_KEYS = {"low", "high", "log", "step", "num"}


class SweepFailed(NightshiftError):
    """Too many trials of a sweep failed (or none succeeded); carries every failure.

    :param failures: one dict per failed trial: ``trial`` (index), ``error`` and ``hparams``.
    """

    def __init__(self, message: str, failures: list[dict[str, Any]]):
        self.failures = failures
        lines = [message] + [f"  - trial {f.get('trial')} {f.get('hparams') or {}}: {f.get('error') or 'failed'}"
                             for f in failures]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Choices:
    """A parameter that takes one of ``values``."""

    values: tuple[Any, ...]

    def grid(self) -> list[Any]:
        return list(self.values)

    def draw(self, rng: random.Random) -> Any:
        return self.values[rng.randrange(len(self.values))]


@dataclass(frozen=True)
class Range:
    """A numeric range ``[low, high]`` (both ends included), uniform or log-uniform.

    ``integer`` ranges (both ends are ints) draw ints; on a grid they list every ``step``-th
    value. A float range on a grid needs ``num`` points (evenly, or geometrically with ``log``).
    """

    low: float
    high: float
    log: bool = False
    integer: bool = False
    step: int | None = None
    num: int | None = None

    def grid(self) -> list[Any]:
        if self.integer and self.num is None:
            return list(range(int(self.low), int(self.high) + 1, self.step or 1))
        n = int(self.num or 0)
        if n == 1:
            return [self._cast(self.low)]
        if self.log:
            a, b = math.log(self.low), math.log(self.high)
            points = [math.exp(a + (b - a) * i / (n - 1)) for i in range(n)]
        else:
            points = [self.low + (self.high - self.low) * i / (n - 1) for i in range(n)]
        out: list[Any] = []
        for p in points:  # an int range with `num` may round two points onto one value
            v = self._cast(p)
            if v not in out:
                out.append(v)
        return out

    def draw(self, rng: random.Random) -> Any:
        if self.log:
            u = rng.uniform(math.log(self.low), math.log(self.high))
            return self._cast(min(max(math.exp(u), self.low), self.high))
        if self.integer:
            return rng.randint(int(self.low), int(self.high))
        return self._cast(rng.uniform(self.low, self.high))

    def _cast(self, v: float) -> Any:
        if self.integer:
            return int(min(max(round(v), self.low), self.high))
        return float(f"{v:.6g}")  # readable in MLflow and the UI; ~1e-6 relative is far below any lr's effect


Param = Choices | Range


@dataclass(frozen=True)
class SweepSpec:
    """A validated ``sweep:`` entry (build it with :func:`parse_sweep`)."""

    method: str
    space: dict[str, Param]
    trials_count: int | None = None
    seed: int = 0
    max_failed: int | float = DEFAULT_MAX_FAILED
    max_parallel: int = DEFAULT_MAX_PARALLEL
    metric: str = DEFAULT_METRIC
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def size(self) -> int:
        """How many trials :meth:`trials` returns."""
        if self.method == "grid":
            return math.prod(len(p.grid()) for p in self.space.values())
        return int(self.trials_count or 0)

    def trials(self) -> list[dict[str, Any]]:
        """The hyperparameters of each trial, in trial order (deterministic: see the module doc)."""
        names = list(self.space)
        if self.method == "grid":
            return [dict(zip(names, combo)) for combo in itertools.product(*(self.space[n].grid() for n in names))]
        rng = random.Random(self.seed)
        return [{n: self.space[n].draw(rng) for n in names} for _ in range(int(self.trials_count or 0))]

    def allowed_failures(self, n_trials: int | None = None) -> int:
        """Failed trials tolerated out of ``n_trials`` (default: this sweep's size)."""
        return allowed_failures(self.max_failed, self.size() if n_trials is None else n_trials)

    def select_best(self, results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """:func:`select_best` with this sweep's metric and failure threshold."""
        return select_best(results, self.metric, max_failed=self.max_failed)


def parse_sweep(d: Mapping[str, Any], *, where: str = "sweep",
                known_hparams: Iterable[str] | None = None) -> SweepSpec:
    """Validate a model's ``sweep:`` entry.

    :param where: how the error messages name the entry (e.g. ``models.yaml: digits.sweep``).
    :param known_hparams: the hyperparameter names a space may use (e.g.
        ``nightshift.training.DEFAULT_HPARAMS``); ``None``: not checked here (the trials task
        checks every trial's hyperparameters before any trial runs).
    :raises ConfigError: naming the field (``sweep.space.lr.low``...) and what is wrong.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: must be a mapping (method, space, ...), got {type(d).__name__}")
    unknown = sorted(set(d) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(_KEYS)}")
    method = d.get("method", "grid")
    if method not in METHODS:
        raise ConfigError(f"{where}.method: must be one of {list(METHODS)}, got {method!r}")
    seed = _int(d.get("seed", 0), f"{where}.seed", minimum=0)
    max_parallel = _int(d.get("max_parallel", DEFAULT_MAX_PARALLEL), f"{where}.max_parallel", minimum=1)
    max_failed = _max_failed(d.get("max_failed", DEFAULT_MAX_FAILED), f"{where}.max_failed")
    metric = d.get("metric", DEFAULT_METRIC)
    if not isinstance(metric, str) or not metric.startswith("val_"):
        raise ConfigError(f"{where}.metric: must be a validation metric (val_accuracy, val_loss), got {metric!r}: "
                          "the test split stays untouched until the winner's gates")
    space_raw = d.get("space")
    if not isinstance(space_raw, Mapping) or not space_raw:
        raise ConfigError(f"{where}.space: must be a non-empty mapping of hyperparameter -> choices list "
                          "or {low, high} range")
    known = set(known_hparams) if known_hparams is not None else None
    space: dict[str, Param] = {}
    for name, spec in space_raw.items():
        here = f"{where}.space.{name}"
        if known is not None and name not in known:
            raise ConfigError(f"{here}: unknown hyperparameter {name!r}; known: {sorted(known)}")
        space[str(name)] = _param(spec, here, grid=method == "grid")
    trials_raw = d.get("trials")
    spec = SweepSpec(method=method, space=space, seed=seed, max_failed=max_failed, max_parallel=max_parallel,
                     metric=metric, raw=dict(d))
    if method == "random":
        if trials_raw is None:
            raise ConfigError(f"{where}.trials: a random sweep needs the number of trials to draw")
        n = _int(trials_raw, f"{where}.trials", minimum=1)
        spec = SweepSpec(method=method, space=space, trials_count=n, seed=seed, max_failed=max_failed,
                         max_parallel=max_parallel, metric=metric, raw=dict(d))
    size = spec.size()
    if method == "grid" and trials_raw is not None and _int(trials_raw, f"{where}.trials", minimum=1) != size:
        raise ConfigError(f"{where}.trials: the grid has {size} points but trials is {trials_raw}; leave trials "
                          "out of a grid sweep or set it to the grid's size")
    if size > MAX_TRIALS:
        raise ConfigError(f"{where}: {size} trials; at most {MAX_TRIALS} (use method: random with fewer trials)")
    if isinstance(max_failed, int) and max_failed >= size:
        raise ConfigError(f"{where}.max_failed: {max_failed} tolerates every one of the {size} trials failing; "
                          f"at most {size - 1}")
    return spec


def allowed_failures(max_failed: int | float, n_trials: int) -> int:
    """Failed trials tolerated out of ``n_trials``: ``max_failed`` itself when a count, else
    ``floor(max_failed * n_trials)`` (a fraction in ``[0, 1)``)."""
    if isinstance(max_failed, float):
        return int(math.floor(max_failed * n_trials + 1e-9))
    return int(max_failed)


def check_failures(results: Sequence[Mapping[str, Any]], max_failed: int | float) -> list[dict[str, Any]]:
    """The failed trials of ``results`` (records with ``failed: true``); raises when they are more
    than ``max_failed`` tolerates.

    :raises SweepFailed: with every failure listed.
    """
    failures = [dict(r) for r in results if r.get("failed")]
    limit = allowed_failures(max_failed, len(results))
    if len(failures) > limit:
        raise SweepFailed(f"{len(failures)} of {len(results)} sweep trials failed; max_failed={max_failed!r} "
                          f"tolerates {limit}:", failures)
    return failures


def select_best(results: Sequence[Mapping[str, Any]], metric: str = DEFAULT_METRIC, *,
                max_failed: int | float | None = None) -> dict[str, Any]:
    """The winning trial's record among ``results``, chosen on the validation ``metric``.

    Each record: ``trial`` (index), ``metrics`` (a dict with ``metric``), and ``failed: true``
    (with ``error``) for a trial that did not finish. Higher is better, except for a loss
    (a metric whose name ends in ``loss``); ties go to the lowest trial index.

    :param max_failed: apply the failure rule first (:func:`check_failures`); ``None``: any
        number of failures is tolerated as long as one trial succeeded.
    :raises ConfigError: ``metric`` is not a validation metric, or a successful trial lacks it.
    :raises SweepFailed: too many failures, or none succeeded (lists the failures).
    """
    if not metric.startswith("val_"):
        raise ConfigError(f"the sweep picks its winner on validation metrics only (val_*), not {metric!r}: "
                          "the test split stays untouched until the gates")
    failures = check_failures(results, max_failed) if max_failed is not None else [r for r in results if r.get("failed")]
    ok = [r for r in results if not r.get("failed")]
    if not ok:
        raise SweepFailed(f"none of the {len(results)} sweep trials succeeded:", [dict(f) for f in failures])
    for r in ok:
        value = (r.get("metrics") or {}).get(metric)
        if not isinstance(value, (int, float)) or value != value:
            raise ConfigError(f"sweep trial {r.get('trial')} has no {metric} (its metrics: "
                              f"{sorted(r.get('metrics') or {})}); cannot pick a winner on it")
    sign = 1.0 if metric.endswith("loss") else -1.0  # sort ascending on sign * value
    return dict(min(ok, key=lambda r: (sign * float(r["metrics"][metric]), int(r.get("trial", 0)))))


def merge_hparams(base: Mapping[str, Any] | None, trial: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's hyperparameters: ``base`` (the model's recipe and the run's Params) with the
    trial's values over it. The sweep's values win: a sweep over ``lr`` ignores a run's ``lr``."""
    return {**dict(base or {}), **dict(trial)}


# --------------------------------------------------------------------------- validation helpers


def _int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {value}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number, got {value!r}")
    return value


def _max_failed(value: Any, name: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: must be a count (0, 1, 2 ...) or a fraction in [0, 1) of the trials, "
                          f"got {value!r}")
    if isinstance(value, int):
        return _int(value, name, minimum=0)
    if not 0 <= value < 1:
        raise ConfigError(f"{name}: a fraction of the trials must be in [0, 1), got {value!r} "
                          "(write a count as an integer)")
    return float(value)


def _param(spec: Any, name: str, *, grid: bool) -> Param:
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"{name}: an empty list of choices")
        for v in spec:
            if not isinstance(v, (str, int, float, bool)) and v is not None:
                raise ConfigError(f"{name}: choices must be plain values (numbers, strings, booleans), got {v!r}")
        if len(set(map(repr, spec))) != len(spec):
            raise ConfigError(f"{name}: a choice is listed twice in {list(spec)}")
        return Choices(tuple(spec))
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{name}: must be a list of choices or a {{low, high}} range, got {spec!r}")
    unknown = sorted(set(spec) - _RANGE_KEYS)
    if unknown:
        raise ConfigError(f"{name}: unknown range field(s) {unknown}; known: {sorted(_RANGE_KEYS)}")
    for k in ("low", "high"):
        if k not in spec:
            raise ConfigError(f"{name}.{k}: a range needs both low and high")
    low, high = _number(spec["low"], f"{name}.low"), _number(spec["high"], f"{name}.high")
    if not low < high:
        raise ConfigError(f"{name}: low ({low}) must be below high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{name}.log: must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{name}.low: a log range needs low > 0, got {low}")
    integer = isinstance(low, int) and isinstance(high, int)
    step = _int(spec["step"], f"{name}.step", minimum=1) if "step" in spec else None
    num = _int(spec["num"], f"{name}.num", minimum=1) if "num" in spec else None
    if step is not None and not integer:
        raise ConfigError(f"{name}.step: only an integer range takes a step; a float range on a grid takes num")
    if step is not None and num is not None:
        raise ConfigError(f"{name}: give step or num, not both")
    if grid and not integer and num is None:
        raise ConfigError(f"{name}.num: a float range on a grid needs num (how many points between low and high), "
                          "or list the choices")
    if grid and log and integer and num is None:
        raise ConfigError(f"{name}.num: a log range on a grid needs num (how many points between low and high)")
    return Range(low=low, high=high, log=log, integer=integer, step=step, num=num)

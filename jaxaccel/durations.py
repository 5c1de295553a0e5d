"""Durations: points in the run and periods, in the unit that keeps their meaning.

A duration field (``sparsity.start``, ``sparsity.end``, ``sparsity.update_every``,
``sparsity.threshold_at``, ``quant.start``, ``optim.warmup``) takes one of

    1000            steps: an integer >= 0 (also written "1000 steps")
    "2 epochs"      epochs, also "2ep" or "1.5 epochs": floor(x * steps_per_epoch)
    "30%"           a fraction of the run: floor(p / 100 * total_steps)

(big_vision's ``utils.steps`` idea). The config keeps what was written, so an experiment that says
"2 epochs" still means two epochs at another batch size, and "30%" still means 30% of a shorter
run. :func:`to_steps` is the one conversion; :func:`resolve` returns the config with every duration
as its step count and runs each section's check of what must happen within the run
(``check_run``), so the training code only ever deals in steps and a schedule that cannot happen
is a config error (exit 2) naming its keys.
"""
from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Any, Union

from pydantic import AfterValidator, BaseModel, StrictInt

from jaxaccel.schema import ConfigError

__all__ = ["Duration", "Parsed", "parse", "to_steps", "resolve", "is_duration", "MAX_STEPS"]

MAX_STEPS = 2 ** 31 - 1  # the step counters are int32
_GRAMMAR = re.compile(r"^\s*(?P<amount>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>steps?|epochs?|ep|%)\s*$")
_UNITS = {"step": "steps", "steps": "steps", "epoch": "epochs", "epochs": "epochs", "ep": "epochs", "%": "percent"}
HELP = "a step count (1000), epochs ('2 epochs', '2ep') or a fraction of the run ('30%')"


@dataclass(frozen=True)
class Parsed:
    """A duration as an exact amount of ``steps``, ``epochs`` or ``percent`` of the run."""
    amount: Fraction
    unit: str


def parse(value: Any) -> Parsed:
    """The amount and unit of a duration; ValueError (naming the grammar) if it is none."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a duration is at least 0, got {value}")
        return Parsed(Fraction(value), "steps")
    match = _GRAMMAR.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a duration: write {HELP}")
    amount, unit = Fraction(match["amount"]), _UNITS[match["unit"]]
    if unit == "steps" and amount.denominator != 1:
        raise ValueError(f"{value!r}: a step count is a whole number")
    if unit == "percent" and amount > 100:
        raise ValueError(f"{value!r}: a fraction of the run is at most 100%")
    return Parsed(amount, unit)


def _check(value: Union[int, str]) -> Union[int, str]:
    parse(value)
    return value.strip() if isinstance(value, str) else value


class _DurationField:
    """Marks a field as a duration, for :func:`resolve` and ``--help``."""


DURATION = _DurationField()
Duration = Annotated[Union[StrictInt, str], AfterValidator(_check), DURATION]


def is_duration(field: Any) -> bool:
    """Whether a pydantic FieldInfo is a :data:`Duration` (or an ``Optional[Duration]``: None is no point)."""
    if any(m is DURATION for m in field.metadata):
        return True
    return any(DURATION in getattr(arg, "__metadata__", ()) for arg in typing.get_args(field.annotation))


def to_steps(value: Union[int, str], steps_per_epoch: int | None, total_steps: int) -> int:
    """The step count of a duration in a run of ``total_steps`` steps of ``steps_per_epoch`` each
    epoch (rounded down: the last whole step not past the point written). ``steps_per_epoch=None``:
    a duration in epochs is refused (the caller does not know the epoch)."""
    parsed = parse(value)
    if parsed.unit == "epochs" and steps_per_epoch is None:
        raise ValueError(f"{value!r} is in epochs: convert it knowing the epoch's length (jaxaccel.durations.resolve)")
    scale = {"steps": 1, "epochs": steps_per_epoch, "percent": Fraction(total_steps, 100)}[parsed.unit]
    return math.floor(parsed.amount * scale)


def same_unit_order(first: Any, second: Any) -> tuple[Fraction, Fraction] | None:
    """``(a, b)`` amounts of two durations written in the same unit (comparable before the run's
    length is known), else None."""
    a, b = parse(first), parse(second)
    return (a.amount, b.amount) if a.unit == b.unit else None


def resolve(cfg: BaseModel, steps_per_epoch: int, total_steps: int) -> Any:
    """``cfg`` with every :data:`Duration` field converted to its step count by :func:`to_steps`;
    every section that defines ``check_run(total_steps, given)`` then checks (raising
    :class:`ConfigError`) that what it schedules happens within the run. ``given`` is the section
    as written, for messages."""
    if total_steps > MAX_STEPS:
        raise ConfigError(f"train.epochs/train.steps: {total_steps} steps is more than the {MAX_STEPS} a step "
                          "counter holds: train fewer steps")
    return _resolve(cfg, steps_per_epoch, total_steps)


def _resolve(section: BaseModel, steps_per_epoch: int, total_steps: int) -> BaseModel:
    updates = {}
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            resolved = _resolve(value, steps_per_epoch, total_steps)
            if resolved is not value:
                updates[name] = resolved
        elif is_duration(field) and value is not None:
            steps = to_steps(value, steps_per_epoch, total_steps)
            if steps != value:
                updates[name] = steps
    out = section.model_copy(update=updates) if updates else section
    check = getattr(out, "check_run", None)
    if check is not None:
        check(total_steps, section)
    return out


def describe(key: str, given: Any, steps: int) -> str:
    """``sparsity.start='2 epochs' (step 936)``, or ``sparsity.start=936`` when written in steps."""
    return f"{key}={given}" if given == steps else f"{key}={given!r} (step {steps})"

"""Model surgery: changing a model's shapes in the middle of a run.

Structured shrinking (pruned channels removed) and low-rank factorization (a kernel replaced by
two factors) both end with a model of other shapes than the one the run started with. They share
this mechanism: a *surgeon* says at which steps it may act (:meth:`Surgeon.points`, where the plan
puts a step-group boundary) and, at such a boundary, converts one unsharded copy of the train state
into a :class:`Change`: the new model config, the converted state and a JSON record. The trainer
then puts the state back on the devices, rebuilds the models (:func:`rebuild`), recompiles the step
groups and the evaluator (that compile timed apart from training) and trains on.

The model config in force is written into every checkpoint's record (:func:`model_record`); a
resumed run rebuilds its model from it before restoring (:func:`follow`), so a run stopped after
a change resumes bitwise. The export is of the final model and names its config, so
:func:`jaxaccel.export.load` rebuilds it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np
import optax


if TYPE_CHECKING:
    from jaxaccel import step as step_lib  # annotations only: the config imports the low-rank surgeon
    from jaxaccel.config import Config
    from jaxaccel.models.base import ModelConfig

__all__ = ["Change", "Surgeon", "registered", "registered_factories", "points", "operate", "model_record",
           "checkpoint_record", "model_of", "param_count", "line", "describe", "FlopsTally"]


@dataclasses.dataclass(frozen=True)
class Change:
    """What one operation did: the rebuilt model's config, the converted state, and a JSON record."""
    model: "ModelConfig"          # e.g. cfg.model.model_copy(update={"features": [120, 41]})
    state: step_lib.TrainState    # params, opt_state (masks included), model_state: all converted, one unsharded copy
    record: dict[str, Any]        # JSON-able: {"kind": "shrink", "widths": {...}} / {"kind": "lowrank", "ranks": {...}}


@runtime_checkable
class Surgeon(Protocol):
    """One technique that changes the model's shapes during training. A run builds its surgeons
    anew when it resumes: what they decide must follow from the config, the step and the state
    they are given (not from what an instance saw earlier), or the resumed run would differ."""
    name: str

    def due(self, step: int) -> bool:
        """Whether it acts at the step-group boundary after ``step`` steps (asked only at the
        steps of :meth:`points`, when some surgeon has one there)."""
        ...

    def points(self, total_steps: int) -> list[int]:
        """The steps at which the plan must end a step group (where :meth:`due` may be true)."""
        ...

    def operate(self, step: int, state: step_lib.TrainState, model: "ModelConfig",
                tx: optax.GradientTransformation) -> Change | None:
        """The change at ``step``, or None when there is nothing to do this time. ``state`` is one
        unsharded copy (``parallel.single``); ``tx`` is the run's optimizer, to initialise
        optimizer state for new parameters."""
        ...


# Surgeon factories added for a while by :func:`registered` (tests, plugins): each takes the
# resolved config and returns its surgeon or None.
_REGISTERED: list[Callable[["Config"], Surgeon | None]] = []


def registered_factories() -> tuple[Callable[["Config"], Surgeon | None], ...]:
    """The factories :func:`registered` holds now (:func:`jaxaccel.surgeons.surgeons` adds them)."""
    return tuple(_REGISTERED)


@contextlib.contextmanager
def registered(factory: Callable[["Config"], Surgeon | None]) -> Iterator[None]:
    """Add the surgeon ``factory(cfg)`` to every run started inside the ``with`` (tests, plugins)."""
    _REGISTERED.append(factory)
    try:
        yield
    finally:
        _REGISTERED.remove(factory)


def points(active: list[Surgeon], total_steps: int) -> tuple[int, ...]:
    """The sorted steps inside the run (0 < step < total) at which some surgeon may act."""
    return tuple(sorted({int(p) for s in active for p in s.points(total_steps) if 0 < p < total_steps}))


def operate(active: list[Surgeon], step: int, state: step_lib.TrainState, model: "ModelConfig",
            tx: optax.GradientTransformation) -> Change | None:
    """Let every due surgeon operate in turn, each on the previous one's result; one Change (the
    records of all, under ``"changes"`` when more than one acted) or None when none changed anything."""
    records = []
    for surgeon in active:
        if not surgeon.due(step):
            continue
        change = surgeon.operate(step, state, model, tx)
        if change is not None:
            state, model = change.state, change.model
            records.append({"surgeon": surgeon.name, **change.record})
    if not records:
        return None
    return Change(model, state, records[0] if len(records) == 1 else {"changes": records})


def model_record(model_cfg: "ModelConfig") -> dict[str, Any] | None:
    """The JSON form of ``model_cfg`` written into checkpoint records (None when it has no JSON
    form, e.g. a user model given as an object with non-JSON arguments: never operated on)."""
    try:
        record = model_cfg.model_dump(mode="json")
        json.dumps(record)
        return record
    except (TypeError, ValueError):
        return None


def checkpoint_record(setup: Any, changes: list[dict[str, Any]]) -> dict[str, Any]:
    """What a checkpoint's record says about the model: the config in force, the run's own config
    it started from, and the changes (:func:`line` records) that led from one to the other."""
    return {"model": model_record(setup.model_cfg), "model_at_start": model_record(setup.cfg.model),
            "surgery": list(changes)}


def model_of(meta: dict[str, Any], original: "ModelConfig") -> "ModelConfig":
    """The model config a checkpoint was written with, from its record (:func:`checkpoint_record`):
    the changed one when changes were made to the run's own ``original``, else ``original`` (also
    when the run now names another model than the checkpoint's run started from: the restore then
    reports the mismatch, as for any checkpoint of another model)."""
    saved = meta.get("model")
    if saved is None or not meta.get("surgery") or meta.get("model_at_start") != model_record(original):
        return original
    return type(original).model_validate(saved)  # changes keep the model's class (its name)


def param_count(params: Any) -> int:
    """Number of parameter values."""
    import jax
    return int(sum(np.size(p) for p in jax.tree.leaves(params)))


def line(step: int, change: Change, compile_seconds: float, params: Any) -> dict[str, Any]:
    """The ``metrics.jsonl`` line of a change (``split: surgery``, so readers of training and test
    lines pass it by), also kept in checkpoint records, config.json and summary.json."""
    return {"step": int(step), "split": "surgery", "surgery": change.record, "compile_seconds": compile_seconds,
            "model": model_record(change.model), "param_count": param_count(params)}


def describe(record: dict[str, Any]) -> str:
    """One line for the run's output about the change ``record`` (a :func:`line`)."""
    what = json.dumps(record["surgery"], separators=(",", ":"))
    if len(what) > 160:
        what = what[:157] + "..."
    return (f"model changed ({what}): {record['param_count']} parameters, new model compiled in "
            f"{record['compile_seconds']:.1f}s")


class FlopsTally:
    """Model FLOPs per step averaged over the steps this process trained, when the model changed
    on the way (each compiled model counts for the steps it ran)."""

    def __init__(self, start: int):
        self.start, self.mark, self.total = start, start, 0.0

    def add(self, per_step: float | None, step: int) -> None:
        """The model compiled so far, whose FLOPs per step are ``per_step``, ran until ``step``."""
        self.total = None if per_step is None or self.total is None else self.total + per_step * (step - self.mark)
        self.mark = step

    def per_step(self, last: float | None, end: int) -> float | None:
        """The average with the last model, ``last`` FLOPs per step, run until ``end``; None when
        some count is unknown."""
        if self.mark == self.start:  # the model never changed: its own count
            return last
        self.add(last, end)
        return None if self.total is None or end == self.start else self.total / (end - self.start)

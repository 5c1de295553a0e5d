"""Model surgery: operations that change the model's shapes in the middle of a run.

MINIMAL COPY of the interface agreed with helper ``surgery`` (who owns this module and the trainer
wiring): :class:`Change`, the :class:`Surgeon` protocol and :func:`surgeons`. At merge their module
replaces this one; the only line to keep is lowrank's registration in :func:`surgeons`.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

import optax

from jaxaccel import step as step_lib

if TYPE_CHECKING:
    from jaxaccel.config import Config, ModelConfig

__all__ = ["Change", "Surgeon", "surgeons"]


@dataclasses.dataclass(frozen=True)
class Change:
    """What one operation did: the rebuilt model's config, the converted state, and a JSON record."""
    model: "ModelConfig"
    state: step_lib.TrainState   # params, opt_state, model_state: all converted, one host/single copy
    record: dict[str, Any]       # JSON-able, e.g. {"kind": "lowrank", "ranks": {...}}


class Surgeon(Protocol):
    """One kind of operation, acting at the step-group boundaries :meth:`points` asks for."""
    name: str

    def due(self, step: int) -> bool:
        """Whether it may act after ``step``."""

    def points(self, total_steps: int) -> list[int]:
        """The steps the plan must put a step-group boundary at."""

    def operate(self, step: int, state: step_lib.TrainState, model: "ModelConfig",
                tx: optax.GradientTransformation) -> Change | None:
        """The change after ``step`` (None: nothing to do this time)."""


def surgeons(cfg: "Config") -> list[Surgeon]:
    """The surgeons a (duration-resolved) config asks for."""
    from jaxaccel import lowrank
    return [s for s in (lowrank.surgeon(cfg),) if s is not None]

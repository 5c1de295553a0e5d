"""Model surgery: operations that change the model's shapes in the middle of a run.

MINIMAL COPY of the agreed interface (helper ``shrink``'s branch): helper ``surgery`` owns this
module and its trainer wiring; at the merge theirs is taken, keeping the registration of the
shrink surgeon in :func:`surgeons`.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

import optax

from jaxaccel import step as step_lib

if TYPE_CHECKING:
    from jaxaccel.models.base import ModelConfig

__all__ = ["Change", "Surgeon", "surgeons"]


@dataclasses.dataclass(frozen=True)
class Change:
    """What one operation did: the rebuilt model's config, the converted state, and a JSON record."""
    model: "ModelConfig"
    state: step_lib.TrainState
    record: dict[str, Any]


class Surgeon(Protocol):
    """One kind of operation (``name``), acting at the step-group boundaries ``points`` asks for."""
    name: str

    def due(self, step: int) -> bool:
        """Whether it may act after ``step`` steps."""

    def points(self, total_steps: int) -> list[int]:
        """The step counts the plan must put a step-group boundary at."""

    def operate(self, step: int, state: step_lib.TrainState, model: "ModelConfig",
                tx: optax.GradientTransformation) -> Change | None:
        """The converted state and model (None: nothing to do this time). ``state`` is one
        unsharded copy; ``tx`` is the run's optimizer."""


def surgeons(cfg: Any) -> list[Surgeon]:
    """The surgeons the config asks for (``sparsity.shrink=true``: channel shrinking)."""
    from jaxaccel.sparsity import shrink
    return [s for s in (shrink.surgeon(cfg),) if s is not None]

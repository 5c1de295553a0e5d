"""The techniques that change the model's shapes mid-run, chosen by the config: each one's surgeon
(:class:`jaxaccel.surgery.Surgeon`) when the config asks for it. Apart from :mod:`jaxaccel.surgery`
(the mechanism), which the techniques import.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from jaxaccel import lowrank, surgery
from jaxaccel.sparsity import shrink

if TYPE_CHECKING:
    from jaxaccel.config import Config

__all__ = ["surgeons"]


def surgeons(cfg: "Config") -> list[surgery.Surgeon]:
    """The surgeons the resolved config ``cfg`` asks for, in the order they operate at a shared step:
    channel shrinking (``sparsity.shrink``, issue 19), low-rank factorization (``lowrank.at``, issue
    21), then any added by :func:`jaxaccel.surgery.registered`."""
    found = [shrink.surgeon(cfg), lowrank.surgeon(cfg), *(make(cfg) for make in surgery.registered_factories())]
    return [s for s in found if s is not None]

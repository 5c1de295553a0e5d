"""When masks change and to what sparsity: pruning schedules and per-layer distributions.

Schedules (``step`` may be a traced integer; all results are jnp values):

* ``one_shot``: masks are computed once, at ``start``, at the target sparsity.
* ``polynomial`` (Zhu & Gupta 2017, "To prune, or not to prune"): with t0 = start,
  n * dt = end - start and dt = update_every, at the update steps
  t in {t0, t0 + dt, ..., end}

      s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt)) ** power      (power = 3 in the paper)

  with s_i = 0; between update steps the mask (and so the sparsity) of the last update holds, and
  a last update at end reaches s_f even when (end - start) is not a multiple of dt.
* ``periodic``: re-prune to s_f every dt steps from start on (for methods whose scores can
  revive weights: saliency, or N:M patterns that may move).
* ``early_bird`` (You et al. 2020, channel pruning): the *checks* are polynomial's update steps
  (every dt from start, and end); at each the transformation computes the channel masks at s_f
  and prunes once, to s_f, at the check where the ticket is drawn (jaxaccel.sparsity.transform), so
  the sparsity is a function of the run's history, not of the step: it has no ``sparsity_fraction``.

Distributions (static, from shapes): ``uniform`` gives every prunable layer the target;
``erk`` (Erdos-Renyi-Kernel, Evci et al. 2020, RigL) gives layer l the density

    d_l = eps * sum(shape_l) / prod(shape_l),   eps such that  sum_l d_l n_l = (1 - s) sum_l n_l,

capping layers with d_l > 1 at dense and solving again for the rest.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Union

import jax
import jax.numpy as jnp

from jaxaccel import paths

__all__ = [
    "schedule_step", "polynomial_sparsity",
    "sparsity_fraction", "is_update_step", "erk_densities", "layer_sparsities",
]

Step = Union[int, jax.Array]


def schedule_step(step: Step, start: int, end: int, every: int) -> jax.Array:
    """The step of the last polynomial mask update at or before ``step``, clipped to [start, end]."""
    t = jnp.clip(jnp.asarray(step, jnp.int32), start, max(end, start))
    last = start + (t - start) // every * every
    return jnp.where(t >= end, max(end, start), last)


def polynomial_sparsity(step: Step, target: float, start: int, end: int, every: int = 1,
                        power: float = 3.0, initial: float = 0.0) -> jax.Array:
    """Zhu & Gupta: ``s_f + (s_i - s_f) (1 - (t - t0)/(end - t0)) ** power`` at the last update
    step t <= ``step`` (``s_i`` before ``start``, ``s_f`` from ``end`` on)."""
    t = schedule_step(step, start, end, every)
    frac = (t - start).astype(jnp.float32) / max(end - start, 1) if end > start else jnp.float32(1.0)
    # Clip: XLA may turn the division into a multiply by 1/span, leaving 1 - frac slightly below
    # 0 at the end, where a fractional power would give NaN.
    value = target + (initial - target) * jnp.clip(1.0 - frac, 0.0, 1.0) ** power
    return jnp.where(jnp.asarray(step) < start, jnp.float32(initial), value).astype(jnp.float32)


def sparsity_fraction(schedule: str, step: Step, start: int, end: int, every: int,
                      power: float = 3.0) -> jax.Array:
    """The fraction r(t) in [0, 1] of the final sparsity that applies at ``step``; a layer with
    final sparsity s_l is pruned to r(t) * s_l (the polynomial with s_i = 0 scales linearly)."""
    if schedule in ("one_shot", "periodic"):
        return jnp.where(jnp.asarray(step) >= start, 1.0, 0.0).astype(jnp.float32)
    if schedule == "polynomial":
        return polynomial_sparsity(step, 1.0, start, end, every, power)
    if schedule == "early_bird":
        raise ValueError("schedule=early_bird prunes when its ticket is drawn: its sparsity is in the optimizer "
                         "state, not a function of the step")
    raise ValueError(f"unknown sparsity schedule {schedule!r}")


def is_update_step(schedule: str, step: Step, start: int, end: int, every: int) -> jax.Array:
    """Whether masks are recomputed at ``step`` (a bool scalar); for early_bird, whether it is a check."""
    step = jnp.asarray(step, jnp.int32)
    on_grid = (step >= start) & ((step - start) % every == 0)
    if schedule == "one_shot":
        return step == start
    if schedule == "periodic":
        return on_grid
    if schedule in ("polynomial", "early_bird"):
        end = max(end, start)
        return (on_grid & (step <= end)) | (step == end)
    raise ValueError(f"unknown sparsity schedule {schedule!r}")


def erk_densities(shapes: Mapping[str, tuple[int, ...]], target: float) -> dict[str, float]:
    """ERK density of each layer (see the module docstring); ``sum d_l n_l = (1 - target) N``."""
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    budget = (1.0 - target) * sum(sizes.values())
    dense: set[str] = set()
    eps = 0.0
    while True:
        rest = [k for k in shapes if k not in dense]
        divisor = sum(raw[k] * sizes[k] for k in rest)
        if not rest or divisor <= 0:
            break
        eps = (budget - sum(sizes[k] for k in dense)) / divisor
        top = max(raw[k] for k in rest)
        if eps * top <= 1.0:
            break
        # Cap only the densest layers and solve again: capping can push others over 1 too.
        dense.update(k for k in rest if raw[k] == top)
    return {k: 1.0 if k in dense else min(1.0, max(0.0, eps * raw[k])) for k in shapes}


def layer_sparsities(params: Any, prunable: Any, target: float, distribution: str = "uniform") -> dict[str, float]:
    """Final sparsity of every prunable leaf, by path."""
    shapes = {name: tuple(leaf.shape)
              for (name, leaf), keep in zip(paths.named_leaves(params), jax.tree.leaves(prunable)) if keep}
    if distribution == "uniform":
        return {k: float(target) for k in shapes}
    if distribution == "erk":
        return {k: 1.0 - d for k, d in erk_densities(shapes, target).items()}
    raise ValueError(f"unknown sparsity distribution {distribution!r}")

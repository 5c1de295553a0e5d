"""Dynamic sparse training at constant sparsity: SET and RigL drop-and-grow mask updates.

Every ``update_every`` steps in [start, end) each prunable layer with k active weights

1. drops the ``d = floor(f(t) * k)`` active weights of smallest |w|, and
2. grows ``d`` weights among those inactive after the drop: uniformly random ones (SET, Mocanu
   et al. 2018) or those with the largest dense gradient |g| (RigL, Evci et al. 2020),

so the active count, and the sparsity, stay exactly k. The drop fraction decays by a cosine,

    f(t) = f0 / 2 * (1 + cos(pi * (t - start) / (end - start))),     f(t) = 0 from end on.

A grown weight starts at exactly zero with zero optimizer moments (the transform sets its update
to -w and resets its moments); a weight dropped and regrown in the same update keeps its value, as
in the RigL reference code. The first masks (step 0) are random for SET and |w| for RigL, at the
layer sparsities of the distribution (uniform or ERK).
"""
from __future__ import annotations

from typing import Any, Union

import jax
import jax.numpy as jnp

from jaxaccel.sparsity.masks import ranks_desc, uniform_leaves

__all__ = ["drop_fraction", "is_dst_update_step", "drop_and_grow", "dst_masks"]

Step = Union[int, jax.Array]


def drop_fraction(step: Step, initial: float, start: int, end: int) -> jax.Array:
    """Cosine decay of the drop fraction from ``initial`` at ``start`` to 0 at ``end``."""
    t = jnp.asarray(step, jnp.float32)
    span = max(end - start, 1)
    progress = jnp.clip((t - start) / span, 0.0, 1.0)
    value = 0.5 * initial * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where((t >= start) & (t < end), value, 0.0).astype(jnp.float32)


def is_dst_update_step(step: Step, start: int, end: int, every: int) -> jax.Array:
    """Drop-and-grow happens at start + i * every in [start, end), never at step 0 (where the
    initial masks were just drawn and no training has happened)."""
    step = jnp.asarray(step, jnp.int32)
    return (step > 0) & (step >= start) & (step < end) & ((step - start) % every == 0)


def drop_and_grow(mask: jax.Array, weight: jax.Array, grow_score: jax.Array,
                  fraction: Union[float, jax.Array]) -> jax.Array:
    """One drop-and-grow of a layer's boolean ``mask``; the number of True entries is unchanged.

    Drop the ``floor(fraction * active)`` active entries of smallest |w| (ties: lower index first),
    then grow as many among the entries inactive after the drop, by highest ``grow_score``.
    """
    active = jnp.sum(mask, dtype=jnp.int32)
    count = jnp.floor(jnp.asarray(fraction, jnp.float32) * active).astype(jnp.int32)
    # Smallest |w| first among the active: rank descending by -|w|; inactive go last (-inf).
    drop_score = jnp.where(mask, -jnp.abs(weight).astype(jnp.float32), -jnp.inf)
    dropped = ranks_desc(drop_score) < count
    kept = mask & ~dropped
    # Candidates are everything not kept; there are at least `count` of them.
    grow = jnp.where(kept, -jnp.inf, grow_score.astype(jnp.float32))
    grown = ranks_desc(grow) < count
    return kept | grown


def dst_masks(method: str, params: Any, grads: Any, masks: Any, fraction: Union[float, jax.Array],
              key: jax.Array) -> Any:
    """Drop-and-grow every leaf that has a mask. ``method``: 'set' grows random entries (one
    uniform draw with ``key`` for all leaves; pass a per-step key), 'rigl' grows by |g|."""
    if method not in ("set", "rigl"):
        raise ValueError(f"dynamic sparse training method must be set or rigl, got {method!r}")
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves = treedef.flatten_up_to(grads)
    m_leaves = treedef.flatten_up_to(masks)
    masked = [i for i, mk in enumerate(m_leaves) if mk is not None]
    if method == "set":
        scores = dict(zip(masked, uniform_leaves(key, [jnp.shape(p_leaves[i]) for i in masked])))
    else:
        scores = {i: jnp.abs(g_leaves[i]).astype(jnp.float32) for i in masked}
    out = [None if mk is None else drop_and_grow(mk, p_leaves[i], scores[i], fraction)
           for i, mk in enumerate(m_leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)

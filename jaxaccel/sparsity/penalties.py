"""Sparsity-inducing loss terms over the prunable weights W_l (cfg.include / cfg.exclude).

    l1           lambda * sum_l sum |W_l|
    group_lasso  lambda * sum_l sum_{groups G of W_l} ||W_G||_2

With ``importance=norm_scale`` (network slimming, Liu et al. 2017) ``l1`` penalises instead the
scales gamma_l of the normalizations paired with the prunable layers (``norms``, the model's
``unit_norms()``), the quantity that ranks the units:

    l1 (norm_scale)  lambda * sum_l sum |gamma_l|        (Liu et al.: lambda = 1e-4 .. 1e-5)

so training drives unimportant units' scales towards 0 and channel pruning removes them. The group
lasso still acts on the kernels.

Groups of the group lasso (``cfg.group``), for kernels shaped (..., in, out):

* ``row``: one group per output unit, i.e. per column W[..., j] of a Dense kernel (in, out):
  all the weights that feed unit j. Driving a group to zero removes the unit (what channel
  pruning removes).
* ``channel``: one group per conv output filter W[:, :, :, j] (kh, kw, in). For any kernel this is
  the same reduction as ``row`` (all axes but the last); the two names read naturally for Dense
  and conv models respectively.
* ``nm``: the N:M groups, M = ``group_size`` consecutive entries along the contracting axis (-2) for a fixed output
  unit and spatial position; the axis is zero-padded to a multiple of M (zeros do not change a norm).

The L2 norm uses a "double where" so its gradient at an all-zero group is 0 instead of NaN:
groups that are already pruned stay finite. The threshold step that turns small weights into
frozen exact zeros after training with a penalty lives in the optax transform (transform.py).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxaccel.sparsity.masks import paired_scales, prunable_tree

__all__ = ["safe_norm", "group_norms", "penalty"]


def safe_norm(x: jax.Array, axis: Any) -> jax.Array:
    """sqrt(sum x^2) over ``axis``, with gradient 0 (a subgradient) where the norm is 0."""
    sq = jnp.sum(jnp.square(x), axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def group_norms(w: jax.Array, group: str, m: int = 4) -> jax.Array:
    """L2 norm of every group of ``w`` (see the module docstring), as a flat-able array."""
    w = w.astype(jnp.float32)
    if w.ndim < 2:
        # A 1-D prunable leaf has no output axis to group by: each entry is its own group.
        return jnp.abs(w) if group != "nm" else safe_norm(
            jnp.pad(w, (0, -w.shape[0] % m)).reshape(-1, m), axis=-1)
    if group in ("row", "channel"):
        return safe_norm(w, axis=tuple(range(w.ndim - 1)))
    if group == "nm":
        x = jnp.moveaxis(w, -2, -1)
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -x.shape[-1] % m)])
        return safe_norm(x.reshape(*x.shape[:-1], -1, m), axis=-1)
    raise ValueError(f"unknown group lasso group {group!r}")


def penalty(cfg: Any, params: Any, norms: Mapping[str, str] | None = None) -> jax.Array:
    """``cfg.penalty_weight`` times the penalty ``cfg.penalty`` (none, l1, group_lasso) over the
    prunable leaves of ``params``; a float32 scalar, 0.0 for ``penalty='none'``.
    ``cfg`` is a sparsity config (:mod:`jaxaccel.sparsity.methods`) or anything with its fields.
    ``norms`` (layer -> the normalization after it): with ``cfg.importance == 'norm_scale'``, l1 is
    over the scales of the normalizations paired with the prunable layers (module docstring)."""
    if cfg.penalty == "none":
        return jnp.float32(0.0)
    prunable = prunable_tree(params, cfg.include, cfg.exclude)
    flags = jax.tree.leaves(prunable)
    leaves = [w for w, keep in zip(jax.tree.leaves(params), flags) if keep]
    if cfg.penalty == "l1" and getattr(cfg, "importance", "weight_norm") == "norm_scale":
        scales, missing = paired_scales(params, prunable, norms or {})
        if missing:  # the transformation's init refuses this first, with the fix
            raise ValueError(f"penalty=l1 with importance=norm_scale: no normalization scale after "
                             f"{', '.join(missing)}")
        leaves = list(scales.values())
    if cfg.penalty == "l1":
        total = sum((jnp.sum(jnp.abs(w.astype(jnp.float32))) for w in leaves), jnp.float32(0.0))
    elif cfg.penalty == "group_lasso":
        total = sum((jnp.sum(group_norms(w, cfg.group, cfg.group_size)) for w in leaves), jnp.float32(0.0))
    else:
        raise ValueError(f"unknown sparsity penalty {cfg.penalty!r}")
    return jnp.float32(cfg.penalty_weight) * total

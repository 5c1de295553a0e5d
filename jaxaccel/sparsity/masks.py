"""Mask calculators: pure, jittable functions from scores or parameters to boolean masks.

A *score* array has a parameter's shape; a higher score means "more worth keeping". The scores of
the methods are

    magnitude  |w|            random  u ~ U[0, 1)  (a fixed key, so masks at growing sparsity nest)
    saliency   |w * g|        (first-order Taylor estimate of the loss change of removing w)

and, for whole units (structure=channel), ``importance=norm_scale`` scores a unit by |gamma|, the
scale of the normalization after its layer (network slimming, Liu et al. 2017; :func:`norm_scale_scores`),

and a *structure* turns scores into a mask:

    unstructured  keep the k = round((1 - s) * size) highest scores of the layer (or, with
                  scope=global, of all prunable layers concatenated);
    nm            in every group of M consecutive entries along the contracting axis (axis -2:
                  ``in`` of a Dense kernel (in, out), of a conv kernel (kh, kw, in, out)) keep the N
                  highest; ``target`` is ignored (sparsity = 1 - N/M);
    block         view the kernel as 2-D (prod(shape[:-1]), out), cut it into h x w blocks (edge
                  blocks zero-padded), rank blocks by the L2 norm of their scores, keep
                  round((1 - s) * n_blocks) blocks;
    channel       rank output units (the last axis) by the L2 norm of their scores over all other
                  axes, keep round((1 - s) * out) of them.

Kept counts are exact: ranks come from a stable descending sort, so ties go to the lower flat index
and never make a threshold keep too many. ``s`` may be a traced scalar (the schedule's value), so
counts are computed with jnp and selection uses ranks, not ``lax.top_k`` (which needs a static k).

Parameter trees are nested dicts as flax linen gives them; leaves are named by
:mod:`jaxaccel.paths` (e.g. ``Dense_0/kernel``). Non-prunable leaves get the mask ``None`` (dense).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp

from jaxaccel import paths

__all__ = [
    "prunable_tree", "unbox", "nm_layout", "ranks_desc", "keep_top", "n_keep",
    "unstructured_mask", "nm_mask", "block_mask", "channel_mask", "structured_mask",
    "global_unstructured_masks", "uniform_leaves", "scores_for", "compute_masks", "magnitude_masks", "random_masks",
    "saliency_masks", "nm_masks", "block_masks", "channel_masks", "apply_masks", "tree_map_masked",
    "paired_scales", "norm_scale_scores",
]

PyTree = Any
Sparsity = Union[float, jax.Array]


# ------------------------------------------------------------------------------------------------
# Paths and the prunable selection.

def prunable_tree(params: PyTree, include: Sequence[str] = (r"kernel$",),
                  exclude: Sequence[str] = ()) -> PyTree:
    """Which leaves may be pruned: :func:`jaxaccel.paths.select` with sparsity's default include
    (paths ending in ``kernel``: Dense and Conv kernels)."""
    return paths.select(params, include, exclude)


def unbox(tree: PyTree) -> PyTree:
    """``tree`` with every box (NNX ``Variable``, linen metadata) replaced by its array: the masks of
    a tree of ``nnx.Param`` are the masks of its arrays (``nnx.Optimizer`` inits with Variables and
    updates with arrays)."""
    return jax.tree.map(lambda x: x.get_value() if paths.is_nnx_variable(x) else x.unbox()
                        if paths.is_box(x) else x, tree, is_leaf=paths.is_box)


def nm_layout(params: PyTree, prunable: PyTree, n: int, m: int) -> tuple[list[str], list[str]]:
    """N:M groups along the contracting axis (-2) of each prunable leaf: ``(refused, too_small)``,
    one line per leaf. A leaf whose axis is at least ``m`` long but not a multiple of it is refused:
    its last group would be short and the layer's sparsity would not be ``1 - n/m`` (the actual
    value is given). A leaf whose axis is shorter than ``m`` (a first conv on 1-channel images)
    cannot hold one group: it stays dense and is named."""
    refused, small = [], []
    for (name, leaf), keep in zip(paths.named_leaves(params), jax.tree.leaves(prunable)):
        if not keep:
            continue
        shape = jnp.shape(leaf)
        length = shape[-2] if len(shape) >= 2 else shape[0] if shape else 1
        if length < m:
            small.append(f"{name} {list(shape)}: its contracting axis has {length} < m={m} entries, so {n}:{m} "
                         "leaves it dense (put it in sparsity.exclude to leave it out of the reported sparsity)")
        elif length % m:
            kept = n * (length // m) + min(n, length % m)
            refused.append(f"{name} {list(shape)}: contracting axis of {length}, not a multiple of m={m}, would "
                           f"get sparsity {1 - kept / length:.4f} instead of {1 - n / m:.4f}")
    return refused, small


# ------------------------------------------------------------------------------------------------
# Ranking.

def ranks_desc(score: jax.Array) -> jax.Array:
    """Rank of every entry of ``score`` (any shape) in a stable descending order of the flattened
    array: 0 is the highest score; equal scores rank by flat index (lower index first)."""
    flat = score.reshape(-1)
    order = jnp.argsort(flat, descending=True, stable=True)
    # Inverse permutation by scatter: O(n), no second sort.
    ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return ranks.reshape(score.shape)


def keep_top(score: jax.Array, k: Union[int, jax.Array]) -> jax.Array:
    """Boolean mask with exactly ``clip(k, 0, size)`` True entries: the ``k`` highest scores."""
    return ranks_desc(score) < k


def n_keep(size: int, sparsity: Sparsity) -> jax.Array:
    """Kept count ``round((1 - s) * size)`` (``s`` may be traced)."""
    return jnp.round((1.0 - jnp.asarray(sparsity, jnp.float32)) * size).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------
# Structures: score array -> mask of the same shape.

def unstructured_mask(score: jax.Array, sparsity: Sparsity) -> jax.Array:
    """Keep the ``round((1 - s) * size)`` highest scores."""
    return keep_top(score, n_keep(score.size, sparsity))


def _contracting_last(x: jax.Array) -> jax.Array:
    # The contracting (input) axis is -2 of (..., in, out) kernels; a 1-D leaf groups along axis 0.
    return jnp.moveaxis(x, -2, -1) if x.ndim >= 2 else x


def _contracting_back(x: jax.Array, ndim: int) -> jax.Array:
    return jnp.moveaxis(x, -1, -2) if ndim >= 2 else x


def nm_mask(score: jax.Array, n: int = 2, m: int = 4) -> jax.Array:
    """N:M: in each group of ``m`` consecutive entries along the contracting axis (-2), for every
    fixed output unit and spatial position, keep the ``n`` highest scores. An axis length that is
    not a multiple of ``m`` is padded with -inf, so a short last group keeps min(n, its length)
    (:func:`make_sparsity` refuses such layers, see :func:`nm_layout`)."""
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < n < m, got n={n}, m={m}")
    x = _contracting_last(score.astype(jnp.float32))
    length = x.shape[-1]
    pad = -length % m
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
    groups = x.reshape(*x.shape[:-1], -1, m)
    order = jnp.argsort(groups, axis=-1, descending=True, stable=True)
    ranks = jnp.argsort(order, axis=-1)  # inverse permutation within each group (m is small)
    keep = (ranks < n).reshape(x.shape)[..., :length]
    return _contracting_back(keep, score.ndim)


def _as_2d(x: jax.Array) -> jax.Array:
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.ndim >= 1 else x.reshape(1, 1)


def block_mask(score: jax.Array, sparsity: Sparsity, block: Sequence[int] = (4, 4)) -> jax.Array:
    """Blocks of ``h x w`` over the 2-D view ``(prod(shape[:-1]), out)``, zero-padded to whole
    blocks, ranked by the L2 norm ``sqrt(sum score^2)`` of each block; the
    ``round((1 - s) * n_blocks)`` highest blocks are kept. (With partial edge blocks the fraction
    of zero *weights* differs slightly from ``s``; the block count is exact.)"""
    bh, bw = int(block[0]), int(block[1])
    x = _as_2d(score.astype(jnp.float32))
    rows, cols = x.shape
    x = jnp.pad(x, [(0, -rows % bh), (0, -cols % bw)])
    rb, cb = x.shape[0] // bh, x.shape[1] // bw
    norms = jnp.sqrt(jnp.sum(jnp.square(x.reshape(rb, bh, cb, bw)), axis=(1, 3)))
    keep_blocks = unstructured_mask(norms, sparsity)
    keep = jnp.repeat(jnp.repeat(keep_blocks, bh, axis=0), bw, axis=1)[:rows, :cols]
    return keep.reshape(score.shape)


def channel_mask(score: jax.Array, sparsity: Sparsity) -> jax.Array:
    """Whole output units: rank the last axis by ``sqrt(sum score^2)`` over all other axes and keep
    ``round((1 - s) * out)`` of them."""
    x = score.astype(jnp.float32)
    norms = jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(x.ndim - 1))))
    return jnp.broadcast_to(unstructured_mask(norms, sparsity), score.shape)


def structured_mask(score: jax.Array, structure: str, sparsity: Sparsity, *, n: int = 2, m: int = 4,
                    block: Sequence[int] = (4, 4)) -> jax.Array:
    """Dispatch on ``structure`` in {unstructured, nm, block, channel}."""
    if structure == "unstructured":
        return unstructured_mask(score, sparsity)
    if structure == "nm":
        return nm_mask(score, n, m)
    if structure == "block":
        return block_mask(score, sparsity, block)
    if structure == "channel":
        return channel_mask(score, sparsity)
    raise ValueError(f"unknown sparsity structure {structure!r}")


def global_unstructured_masks(scores: Sequence[jax.Array], sparsity: Sparsity) -> list[jax.Array]:
    """One ranking over all layers' scores concatenated: keep the ``round((1 - s) * total)``
    highest; layers then end up with whatever sparsity their scores earn."""
    flat = jnp.concatenate([s.reshape(-1).astype(jnp.float32) for s in scores])
    keep = unstructured_mask(flat, sparsity)
    out, start = [], 0
    for s in scores:
        out.append(keep[start:start + s.size].reshape(s.shape))
        start += s.size
    return out


# ------------------------------------------------------------------------------------------------
# Whole parameter trees.

def uniform_leaves(key: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list[jax.Array]:
    """U[0, 1) arrays of the given shapes from ONE draw of their total size, split in order.

    One draw instead of one per leaf: each ``jax.random`` call adds its own copy of the threefry
    graph, which costs seconds of XLA:CPU compile time; the values are just as independent."""
    sizes = [math.prod(s) for s in shapes]
    flat = jax.random.uniform(key, (sum(sizes),), jnp.float32)
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flat[start:start + size].reshape(shape))
        start += size
    return out


def scores_for(method: str, param: jax.Array, grad: jax.Array | None = None,
               key: jax.Array | None = None) -> jax.Array:
    """The score array of ``method`` in {magnitude, random, saliency, set, rigl} for one leaf
    (set/rigl start from random/magnitude masks respectively)."""
    if method in ("magnitude", "rigl"):
        return jnp.abs(param).astype(jnp.float32)
    if method in ("random", "set"):
        if key is None:
            raise ValueError("random scores need a PRNG key")
        return jax.random.uniform(key, param.shape, jnp.float32)
    if method == "saliency":
        if grad is None:
            raise ValueError("saliency scores |w * g| need gradients")
        return jnp.abs(param.astype(jnp.float32) * grad.astype(jnp.float32))
    raise ValueError(f"no mask scores for sparsity method {method!r}")


def compute_masks(params: PyTree, prunable: PyTree, sparsity: Union[Sparsity, Mapping[str, Sparsity]], *,
                  method: str = "magnitude", structure: str = "unstructured", scope: str = "layer",
                  n: int = 2, m: int = 4, block: Sequence[int] = (4, 4), grads: PyTree = None,
                  key: jax.Array | None = None) -> PyTree:
    """Masks for every prunable leaf (``None`` for the others).

    ``sparsity`` is one value or a dict ``path -> value`` (per-layer, e.g. ERK); with
    ``scope='global'`` it must be one value and ``structure`` must be unstructured. Random scores
    of all prunable leaves come from one draw with ``key`` (:func:`uniform_leaves`): the same key
    gives the same scores, so masks at growing sparsity nest.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    flags = jax.tree.leaves(prunable)
    grad_leaves = jax.tree.leaves(grads) if grads is not None else [None] * len(flat)
    if len(flags) != len(flat) or len(grad_leaves) != len(flat):
        raise ValueError("params, prunable and grads must have the same tree structure")
    chosen = [i for i, f in enumerate(flags) if f]
    if method in ("random", "set"):
        if key is None:
            raise ValueError("random scores need a PRNG key")
        scores = dict(zip(chosen, uniform_leaves(key, [jnp.shape(flat[i][1]) for i in chosen])))
    else:
        scores = {i: scores_for(method, flat[i][1], grad_leaves[i]) for i in chosen}
    masks: list[Any] = [None] * len(flat)
    if scope == "global":
        if structure != "unstructured" or isinstance(sparsity, Mapping):
            raise ValueError("scope=global ranks single weights across layers: it needs "
                             "structure=unstructured and one sparsity value")
        for i, mk in zip(chosen, global_unstructured_masks([scores[i] for i in chosen], sparsity)):
            masks[i] = mk
    elif scope == "layer":
        for i in chosen:
            s = sparsity[paths.name(flat[i][0])] if isinstance(sparsity, Mapping) else sparsity
            masks[i] = structured_mask(scores[i], structure, s, n=n, m=m, block=block)
    else:
        raise ValueError(f"unknown sparsity scope {scope!r}")
    return jax.tree_util.tree_unflatten(treedef, masks)


def _default_prunable(params: PyTree, prunable: PyTree | None) -> PyTree:
    return prunable_tree(params) if prunable is None else prunable


def magnitude_masks(params: PyTree, sparsity, prunable: PyTree | None = None, scope: str = "layer") -> PyTree:
    """Unstructured |w| masks, per layer or global."""
    return compute_masks(params, _default_prunable(params, prunable), sparsity, scope=scope)


def random_masks(key: jax.Array, params: PyTree, sparsity, prunable: PyTree | None = None) -> PyTree:
    """Unstructured masks keeping a uniformly random subset of exact size in each layer."""
    return compute_masks(params, _default_prunable(params, prunable), sparsity, method="random", key=key)


def saliency_masks(params: PyTree, grads: PyTree, sparsity, prunable: PyTree | None = None,
                   scope: str = "layer") -> PyTree:
    """Unstructured |w * g| masks."""
    return compute_masks(params, _default_prunable(params, prunable), sparsity, method="saliency",
                         grads=grads, scope=scope)


def nm_masks(params: PyTree, n: int = 2, m: int = 4, prunable: PyTree | None = None) -> PyTree:
    """N:M |w| masks along the contracting axis."""
    return compute_masks(params, _default_prunable(params, prunable), 0.0, structure="nm", n=n, m=m)


def block_masks(params: PyTree, sparsity, block: Sequence[int] = (4, 4), prunable: PyTree | None = None) -> PyTree:
    """Block |w| masks ranked by block L2 norm."""
    return compute_masks(params, _default_prunable(params, prunable), sparsity, structure="block", block=block)


def channel_masks(params: PyTree, sparsity, prunable: PyTree | None = None) -> PyTree:
    """Output-unit |w| masks ranked by the unit's L2 norm."""
    return compute_masks(params, _default_prunable(params, prunable), sparsity, structure="channel")


# ------------------------------------------------------------------------------------------------
# Network slimming: units scored by the scale of the normalization after their layer.

def paired_scales(params: PyTree, prunable: PyTree, norms: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """``({leaf path: scale}, missing)``: for every prunable leaf ``L/kernel`` the ``scale`` of the
    normalization ``norms[L]`` that follows layer ``L`` (one entry per output unit); ``missing``
    names the prunable leaves that have none (not a kernel, no normalization, or a scale whose length
    is not the kernel's unit count)."""
    leaves = dict(paths.named_leaves(params))
    found, missing = {}, []
    for (name, leaf), keep in zip(paths.named_leaves(params), jax.tree.leaves(prunable)):
        if not keep:
            continue
        layer, _, last = name.rpartition("/")
        scale = leaves.get(f"{norms[layer]}/scale") if last == "kernel" and layer in norms else None
        if scale is None or jnp.shape(scale) != jnp.shape(leaf)[-1:]:
            missing.append(name)
        else:
            found[name] = scale
    return found, missing


def norm_scale_scores(params: PyTree, prunable: PyTree, norms: Mapping[str, str], masks: PyTree = None) -> PyTree:
    """Scores for channel masks that rank units by ``|scale|`` of their normalization: every
    prunable kernel becomes ``|scale|`` broadcast to its shape (the channel structure's L2 norm over
    the other axes is then ``|scale| * sqrt(fan_in)``: the same order). Where ``masks`` is given, a
    unit it prunes scores 0: its scale no longer gets a gradient (its normalized input is constant),
    so without this it could outrank kept units and revive; with it, masks at growing sparsity nest.
    Other leaves pass through (compute_masks does not score them). Raises ValueError naming the
    prunable leaves without a paired scale (:func:`paired_scales`)."""
    scales, missing = paired_scales(params, prunable, norms)
    if missing:
        raise ValueError(f"no normalization scale after: {', '.join(missing)}")
    mask_leaves = dict(paths.named_leaves(masks)) if masks is not None else {}

    def score(name, leaf):
        if name not in scales:
            return leaf
        s = jnp.broadcast_to(jnp.abs(scales[name]).astype(jnp.float32), jnp.shape(leaf))
        mk = mask_leaves.get(name)
        return s if mk is None else jnp.where(mk, s, 0.0)

    return paths.map_with_names(score, params)


# ------------------------------------------------------------------------------------------------
# Using masks.

def tree_map_masked(fn: Callable[[Any, jax.Array], Any], tree: PyTree, masks: PyTree) -> PyTree:
    """``fn(leaf, mask)`` where a mask exists; leaves whose mask is ``None`` pass through."""
    return jax.tree.map(lambda x, mk: x if mk is None else fn(x, mk), tree, masks)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zero the masked-out entries (exact zeros, same dtype)."""
    return tree_map_masked(lambda p, mk: jnp.where(mk, p, jnp.zeros_like(p)), params, masks)

"""The sparsity optax transformation: wraps any inner optimizer and keeps pruned weights at zero.

``make_sparsity(cfg, inner, total_steps)`` returns a GradientTransformation whose update, for
masks M (True = kept) and inner optimizer ``inner``, is

    M'      = M, or new masks when the schedule says so (lax.cond inside jit: static shapes)
    A       = M' & M                     entries active both before and after this step
    inner state: param-shaped leaves (moments, traces, ...) zeroed where M' != M (when entries can
                 be regrown: SET/RigL, saliency; magnitude/random masks are nested)
    u       = inner.update(where(A, g, 0), inner_state, params)
    update  = where(A, u, -params)       so params + update == 0 exactly off A

Masking gradients in and updates out means no optimizer can revive a pruned weight: its update is
``-w`` and its moments only decay (they see zero gradients; where entries can be regrown they are
also zeroed when pruned). A grown entry (in M', not in M) is set to exactly zero, with zero
moments, and trains from the next step. The param-shaped parts of the inner state are found generically with
``optax.tree_utils.tree_map_params`` (init on a placeholder), so sgd, momentum, adam, adamw,
``inject_hyperparams`` and chains all work without a list of state types.

The state is a :class:`SparsityState` (count, masks, frozen, inner_state, early_bird); :func:`find_masks`
pulls the masks out of any optimizer state that contains one. Thresholding (cfg.threshold > 0):
at ``threshold_at`` the prunable weights with |w| < threshold get a frozen zero mask
(``frozen``) that every later mask update respects.

With ``shrink`` (structure=channel) the biases of the masked layers get masks too
(:func:`unit_masks`): a pruned unit's bias is a frozen 0, so the unit outputs exactly 0 and
:mod:`jaxaccel.sparsity.shrink` can remove it without changing the model's function.

``importance=norm_scale`` (network slimming, Liu et al. 2017): channel masks rank a layer's units by
|scale| of the normalization after it (``norms``; :func:`jaxaccel.sparsity.masks.norm_scale_scores`)
instead of their filters' L2 norms; the masks still apply to the kernels. A selected layer without
such a normalization is a ConfigError at init.

``schedule=early_bird`` (Early-Bird tickets, You et al. 2020): at every check (every ``update_every``
from ``start``, and ``end``; :func:`mask_update_due` is True there) the candidate channel masks at
``target`` are computed from the current importances. With u_k the concatenated unit masks of all
prunable layers at check k, the distance d_k = mean(u_k != u_{k-1}) (normalized Hamming) is pushed
into a window of the last ``early_bird_window`` distances; the ticket is drawn at the first check
where all of them are < ``early_bird_epsilon`` (so at the earliest at check ``window``), or at
``end`` if that never happens: the masks become that check's candidate, once, and stay (the shrink
surgeon, acting after every check, then removes the pruned units; before and after it finds nothing).
The history lives in :class:`EarlyBirdState` (``SparsityState.early_bird``; None for the other
schedules, so their state trees are unchanged), so a resumed run decides as the uninterrupted one;
:func:`early_bird_record` says when and why the ticket was drawn.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaccel import paths
from jaxaccel.durations import to_steps
from jaxaccel.schema import ConfigError
from jaxaccel.sparsity import dst as dst_lib
from jaxaccel.sparsity import masks as masks_lib
from jaxaccel.sparsity import schedules

__all__ = ["SparsityState", "EarlyBirdState", "early_bird_state", "early_bird_record", "SparsityWarning",
           "make_sparsity", "find_masks", "map_param_trees", "mask_update_due", "schedule_steps", "sparsity_count",
           "changes_masks", "unit_masks"]

PRUNE_METHODS = ("magnitude", "random", "saliency")
DST_METHODS = ("set", "rigl")


class SparsityWarning(UserWarning):
    """A choice the sparsity transformation had to make for the user (a layer too small for its
    structure left dense); the trainer prints these in the run's output."""


class EarlyBirdState(NamedTuple):
    """The early-bird search so far (schedule=early_bird; module docstring)."""
    units: jax.Array      # bool [units of all prunable layers]: the last check's candidate unit masks
    distances: jax.Array  # float32 [window]: the last distances, oldest first (1.0 = none yet)
    checks: jax.Array     # int32: checks done
    drawn_at: jax.Array   # int32: the step at which the ticket was drawn, -1 before
    reason: jax.Array     # int32: 0 not drawn, 1 the masks settled, 2 end reached


EARLY_BIRD_REASONS = {1: "settled", 2: "end"}


class SparsityState(NamedTuple):
    """Optimizer state of :func:`make_sparsity`."""
    count: jax.Array   # int32: updates done so far (the step the next update is)
    masks: Any         # bool array per prunable leaf (True = kept), None for the other leaves
    frozen: Any        # bool threshold masks per prunable leaf, or None without thresholding
    inner_state: Any   # the wrapped optimizer's state
    early_bird: Any = None  # EarlyBirdState with schedule=early_bird; None (no leaves) otherwise


def _first_state(opt_state: Any) -> SparsityState | None:
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparsityState))
    return next((n for n in nodes if isinstance(n, SparsityState)), None)


def find_masks(opt_state: Any) -> Any:
    """The mask tree of the first :class:`SparsityState` inside ``opt_state`` (None if none)."""
    state = _first_state(opt_state)
    return None if state is None else state.masks


def early_bird_state(opt_state: Any) -> EarlyBirdState | None:
    """The early-bird search state inside ``opt_state`` (None without schedule=early_bird)."""
    state = _first_state(opt_state)
    return None if state is None else state.early_bird


def early_bird_record(early_bird: EarlyBirdState | None) -> dict[str, Any]:
    """For a run's records, from a host copy of :func:`early_bird_state`: ``early_bird_step`` (the
    step the ticket was drawn at, None before), ``early_bird_reason`` (``settled``: the masks'
    distance stayed below epsilon for the window; ``end``: drawn at ``sparsity.end``) and
    ``early_bird_distance`` (the largest distance in the window); {} without early-bird."""
    if early_bird is None:
        return {}
    drawn = int(np.asarray(early_bird.drawn_at))
    distances = np.asarray(early_bird.distances)
    return {"early_bird_step": drawn if drawn >= 0 else None,
            "early_bird_reason": EARLY_BIRD_REASONS.get(int(np.asarray(early_bird.reason))),
            "early_bird_distance": float(distances.max()) if int(np.asarray(early_bird.checks)) > 1 else None}


def changes_masks(cfg: Any) -> bool:
    """Whether the transformation for ``cfg`` ever changes its masks (pruning, DST, thresholding)."""
    return cfg.method in PRUNE_METHODS + DST_METHODS or cfg.threshold > 0.0


def schedule_steps(cfg: Any, total_steps: int) -> dict[str, int]:
    """The schedule's points as step counts: ``start``, ``end``, ``update_every`` (for the methods
    that have them) and ``threshold_at``. Durations a config resolved (:func:`jaxaccel.durations.resolve`)
    are step counts already; an unresolved fraction of the run is converted with ``total_steps``."""
    names = ("start", "end", "update_every", "threshold_at")
    return {n: to_steps(getattr(cfg, n), None, total_steps) for n in names if hasattr(cfg, n)}


def mask_update_due(cfg: Any, total_steps: int, count: Any) -> jax.Array:
    """Whether the masks may change at the update numbered ``count`` (a scalar or an array of
    counts; usable on the host). The transformation itself decides with this function."""
    count = jnp.asarray(count, jnp.int32)
    due = jnp.zeros(count.shape, jnp.bool_)
    at = schedule_steps(cfg, total_steps)
    if cfg.method in PRUNE_METHODS:
        due |= schedules.is_update_step(cfg.schedule, count, at["start"], at["end"], at["update_every"])
    if cfg.method in DST_METHODS:
        due |= dst_lib.is_dst_update_step(count, at["start"], at["end"], at["update_every"])
    if cfg.threshold > 0.0:
        due |= count == at["threshold_at"]
    return due


def sparsity_count(opt_state: Any) -> jax.Array | None:
    """The update count of the first :class:`SparsityState` inside ``opt_state`` (None if none)."""
    state = _first_state(opt_state)
    return None if state is None else state.count


def map_param_trees(inner: optax.GradientTransformation, fn, state: Any, params: Any, *rest: Any) -> Any:
    """``fn(leaf, *rest_leaves)`` over every param-shaped subtree of the optimizer ``state``.

    Uses ``optax.tree_utils.tree_map_params``; if the optimizer's init cannot run on its placeholder
    (an init that does arithmetic on params), falls back to matching subtrees whose tree structure
    and leaf shapes equal ``params``'.
    """
    try:
        return optax.tree_utils.tree_map_params(inner, fn, state, *rest)
    except Exception:  # noqa: BLE001 - any init that rejects the placeholder; the fallback is exact
        treedef = jax.tree.structure(params)
        shapes = [jnp.shape(p) for p in jax.tree.leaves(params)]

        def is_params(x):
            if jax.tree.structure(x) != treedef:
                return False
            return [jnp.shape(v) for v in jax.tree.leaves(x)] == shapes

        return jax.tree.map(lambda x: jax.tree.map(fn, x, *rest) if is_params(x) else x,
                            state, is_leaf=is_params)


def _is_none(x: Any) -> bool:
    return x is None


# Mask trees hold None for non-prunable leaves; treating None as a leaf keeps them aligned.
def _and(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: None if x is None else x & y, a, b, is_leaf=_is_none)


def _select(pred: jax.Array, a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: None if x is None else jnp.where(pred, x, y), a, b, is_leaf=_is_none)


def unit_masks(masks: Any, params: Any, norms: Mapping[str, str] | None = None) -> Any:
    """``masks`` with a mask for the bias of every layer whose kernel has one: a unit's bias is kept
    iff some weight of its kernel column is (structure=channel: the whole unit). ``norms`` (layer
    name -> the normalization layer after it, :meth:`jaxaccel.models.base.ModelConfig.unit_norms`):
    that layer's ``scale`` and ``bias`` get the same unit mask, so a pruned unit leaves its
    normalization at exactly 0 too."""
    out = _bias_masks(masks, params)
    for layer, norm in (norms or {}).items():
        kernel = _at(out, f"{layer}/kernel")
        if kernel is None:
            continue
        unit = jnp.any(kernel, axis=tuple(range(kernel.ndim - 1)))
        for leaf in ("scale", "bias"):
            if _at(params, f"{norm}/{leaf}") is not None:
                out = _set(out, f"{norm}/{leaf}", unit)
    return out


def _bias_masks(masks: Any, params: Any) -> Any:
    if not isinstance(params, Mapping):
        return masks
    out = {k: _bias_masks(masks[k], v) for k, v in params.items()}
    kernel = out.get("kernel")
    if kernel is not None and "bias" in params and out.get("bias") is None:
        out["bias"] = jnp.any(kernel, axis=tuple(range(kernel.ndim - 1)))
    return type(masks)(out) if isinstance(masks, Mapping) else out


def _at(tree: Any, path: str) -> Any:
    """The node of a nested mapping at a ``/``-separated path (None when absent)."""
    for key in path.split("/"):
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree: Mapping, path: str, value: Any) -> Any:
    """A copy of the nested mapping ``tree`` with ``value`` at ``path`` (which exists)."""
    key, _, rest = path.partition("/")
    out = dict(tree)
    out[key] = _set(tree[key], rest, value) if rest else value
    return type(tree)(out)


def make_sparsity(cfg: Any, inner: optax.GradientTransformation, total_steps: int, *,
                  seed: int = 0, refresh: bool = True,
                  norms: Mapping[str, str] | None = None) -> optax.GradientTransformation:
    """Wrap ``inner`` with the pruning / DST / threshold behaviour ``cfg`` (a SparsityConfig) asks.

    Returns ``inner`` itself when nothing is asked (method none and no threshold; a penalty alone
    only changes the loss, see :func:`jaxaccel.sparsity.penalty`). ``total_steps`` converts
    schedule points given as fractions of the run (:func:`schedule_steps`); ``seed`` keys random
    scores and SET.
    ``refresh=False``: the masks are never recomputed (no ``lax.cond``, which costs XLA:CPU ~0.2 ms
    a step even when not taken); only for updates at which :func:`mask_update_due` is False, as the
    trainer's fixed-mask step groups. Same state either way.
    ``norms``: the model's :meth:`~jaxaccel.models.base.ModelConfig.unit_norms` (layer -> the
    normalization after it); shrinking masks a pruned unit's normalization scale and bias with it.
    The update requires ``params``. Make this the outermost transformation (wrap the whole
    optimizer, clipping included): anything that rescales updates after it would break
    ``params + update == 0`` for pruned entries; a wrapper that skips whole steps is fine.
    """
    # Incompatible combinations are refused by the method's config class (config time).
    prune, dst = cfg.method in PRUNE_METHODS, cfg.method in DST_METHODS
    thresholding = cfg.threshold > 0.0
    if not (prune or dst or thresholding):
        return inner
    if cfg.method not in PRUNE_METHODS + DST_METHODS + ("none",):
        raise ValueError(f"unknown sparsity method {cfg.method!r}")
    inner = optax.with_extra_args_support(inner)
    # Moments are reset where a mask changes only if a pruned entry can come back: SET/RigL grow
    # entries, and saliency |w*g| can re-select a pruned entry on ties at zero score. Magnitude and
    # random masks are nested (a pruned weight is 0 and scores last; random scores are fixed), so
    # there a pruned entry's moments only decay and never act (its update is forced to -w); the
    # reset, an extra pass over every moment at every step, would be pure cost (~10% of a LeNet step).
    regrows = dst or cfg.method == "saliency"
    # Shrinking removes pruned units whole: their biases are masked with them, so a pruned unit's
    # output is exactly 0 (not relu(bias)) and removing it leaves the model's function unchanged.
    shrink = prune and getattr(cfg, "shrink", False)
    early = prune and cfg.schedule == "early_bird"
    norm_scale = prune and getattr(cfg, "importance", "weight_norm") == "norm_scale"
    at = schedule_steps(cfg, total_steps)
    start, end, every, thr_step = (at.get(n) for n in ("start", "end", "update_every", "threshold_at"))
    kw = dict(structure=cfg.structure, scope=cfg.scope, n=cfg.n, m=cfg.m, block=tuple(cfg.block)) if prune else {}

    def prunable(params):
        return masks_lib.prunable_tree(params, tuple(cfg.include), tuple(cfg.exclude))

    def keys():
        base = jax.random.key(seed)
        return {name: jax.random.fold_in(base, i) for i, name in enumerate(("score", "init", "grow"))}

    def layer_targets(params):
        return schedules.layer_sparsities(params, prunable(params), cfg.target, cfg.distribution)

    def ones(params):
        masks = jax.tree.map(lambda p, f: jnp.ones_like(p, dtype=jnp.bool_) if f else None,
                             params, prunable(params))
        return unit_masks(masks, params, norms) if shrink else masks

    def init_fn(params):
        params = masks_lib.unbox(params)
        check_selection(params)
        if dst:
            # Constant sparsity from the start: random (SET) or |w| (RigL) masks at the targets.
            masks = masks_lib.compute_masks(params, prunable(params), layer_targets(params),
                                            method=cfg.method, key=keys()["init"])
        else:
            masks = ones(params)  # dense until the schedule's first update
        frozen = ones(params) if thresholding else None
        return SparsityState(jnp.zeros([], jnp.int32), masks, frozen, inner.init(params),
                             early_bird_init(params) if early else None)

    def early_bird_init(params):
        units = sum(jnp.shape(p)[-1] for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(prunable(params)))
                    if f and jnp.ndim(p))
        return EarlyBirdState(jnp.zeros([units], jnp.bool_), jnp.ones([cfg.early_bird_window], jnp.float32),
                              jnp.zeros([], jnp.int32), jnp.full([], -1, jnp.int32), jnp.zeros([], jnp.int32))

    def check_selection(params):
        # A pattern that selects nothing is a typo: refuse it rather than prune less. Exclude is
        # checked only when every parameter is here: under init.freeze the frozen ones are masked
        # out of this tree, and excluding one is how a run leaves it out of the reported sparsity
        # (the trainer checks exclude against all parameters).
        paths.require_matches(params, cfg.include, "sparsity.include", ConfigError)
        frozen_out = any(isinstance(x, optax.MaskedNode) for x in
                         jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, optax.MaskedNode)))
        if not frozen_out:
            paths.require_matches(params, cfg.exclude, "sparsity.exclude", ConfigError)
        if not any(jax.tree.leaves(prunable(params))):
            raise ConfigError(f"sparsity.include={list(cfg.include)} with sparsity.exclude={list(cfg.exclude)} "
                              f"selects no parameter; paths: {', '.join(paths.leaf_paths(params))}")
        if norm_scale:
            _, missing = masks_lib.paired_scales(params, prunable(params), norms or {})
            if missing:
                raise ConfigError(
                    f"sparsity.importance=norm_scale ranks units by the scale of the normalization after their "
                    f"layer, and these selected parameters have none: {', '.join(missing)}. Put them in "
                    "sparsity.exclude, or use importance=weight_norm")
        if prune and cfg.structure == "nm":
            refused, small = masks_lib.nm_layout(params, prunable(params), cfg.n, cfg.m)
            if refused:
                raise ConfigError(f"sparsity {cfg.n}:{cfg.m} is not exact on: {'; '.join(refused)}. Choose an m "
                                  "that divides these axes, or put them in sparsity.exclude")
            for line in small:
                warnings.warn(line, SparsityWarning, stacklevel=2)

    def cut_fraction(step, r, s):
        """The fraction of a shrunk layer to prune now: the shrink after the previous update left
        1 - r_prev * s of its original units, and r * s of those are to be gone after this one.
        Each shrink rounds to whole units, so after several the width can be a unit or two off
        round((1 - r * s) * original) (LeNet's 300 units, four updates to 50%: 149)."""
        prev = start + jnp.maximum((step - 1 - start) // every, 0) * every  # the previous update's step
        r_prev = jnp.where(step > start, schedules.sparsity_fraction(cfg.schedule, prev, start, end, every,
                                                                     cfg.power), 0.0)
        return 1.0 - (1.0 - r * s) / (1.0 - r_prev * s)

    def scores(params, masks):
        """What the masks rank: the parameters, or for norm_scale every selected kernel as the
        |scale| of its units' normalization (0 for units ``masks`` pruned, so masks nest)."""
        return masks_lib.norm_scale_scores(params, prunable(params), norms or {}, masks) if norm_scale else params

    def early_bird_check(step, grads, state, params):
        """(masks, early-bird state) after the check at ``step`` (module docstring)."""
        eb = state.early_bird
        cand = masks_lib.compute_masks(scores(params, state.masks), prunable(params), layer_targets(params),
                                       method=cfg.method, structure="channel", grads=grads)
        kernels = [mk for mk in jax.tree.leaves(cand) if mk.ndim]
        units = jnp.concatenate([jnp.any(mk, axis=tuple(range(mk.ndim - 1))) for mk in kernels])
        if units.shape != eb.units.shape:
            # Shapes change only when the shrink surgeon cut the model, which it does only after
            # the ticket was drawn: nothing is left to decide.
            return state.masks, eb
        distance = jnp.mean((units != eb.units).astype(jnp.float32))
        distances = jnp.where(eb.checks > 0, jnp.append(eb.distances[1:], distance), eb.distances)
        settled = jnp.all(distances < cfg.early_bird_epsilon)
        drawn = eb.drawn_at >= 0
        draw = ~drawn & (settled | (step >= end))
        searched = EarlyBirdState(units, distances, eb.checks + 1, jnp.where(draw, step, -1).astype(jnp.int32),
                                  jnp.where(draw, jnp.where(settled, 1, 2), 0).astype(jnp.int32))
        eb = jax.tree.map(lambda kept, new: jnp.where(drawn, kept, new), eb, searched)  # frozen once drawn
        ticket = unit_masks(cand, params, norms) if shrink else cand
        return _select(draw, ticket, state.masks), eb

    def recompute(step, grads, state, params):
        """New (masks, frozen, early_bird) at a step where some mask update is due."""
        old, new, frozen, early_bird = state.masks, state.masks, state.frozen, state.early_bird
        if early:
            new, early_bird = early_bird_check(step, grads, state, params)
        elif prune:
            r = schedules.sparsity_fraction(cfg.schedule, step, start, end, every, cfg.power)
            target = (r * cfg.target if cfg.scope == "global"
                      else {k: cut_fraction(step, r, s) if shrink else r * s
                            for k, s in layer_targets(params).items()})
            cand = masks_lib.compute_masks(scores(params, old), prunable(params), target, method=cfg.method,
                                           grads=grads, key=keys()["score"], **kw)
            cand = unit_masks(cand, params, norms) if shrink else cand
            new = _select(schedules.is_update_step(cfg.schedule, step, start, end, every), cand, old)
        if dst:
            frac = dst_lib.drop_fraction(step, cfg.drop_fraction, start, end)
            key = jax.random.fold_in(keys()["grow"], step)
            cand = dst_lib.dst_masks(cfg.method, params, grads, old, frac, key)
            new = _select(dst_lib.is_dst_update_step(step, start, end, every), cand, old)
        if thresholding:
            cand = jax.tree.map(lambda p, f: None if f is None else f & (jnp.abs(p) >= cfg.threshold),
                                params, frozen)
            frozen = _select(step == thr_step, cand, frozen)
            new = _and(new, frozen)

        return new, frozen, early_bird

    def reset(s, o, n):
        # Moments of entries whose mask changed restart from zero (pruned or grown alike).
        if o is None or n is None or jnp.shape(s) != n.shape:
            return s
        return jnp.where(o == n, s, jnp.zeros_like(s))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("the sparsity transformation needs params: call tx.update(grads, state, params)")
        updates, params = masks_lib.unbox(updates), masks_lib.unbox(params)
        step = state.count
        due = mask_update_due(cfg, total_steps, step)
        # Only the masks go through the conditional: passing the optimizer state through it makes
        # XLA copy every moment every step. The reset below is an elementwise select that fuses
        # into the optimizer's update (a no-op where the masks did not change).
        if refresh:
            masks, frozen, early_bird = jax.lax.cond(
                due, lambda: recompute(step, updates, state, params),
                lambda: (state.masks, state.frozen, state.early_bird))
        else:  # refresh=False: the caller runs this only where mask_update_due is False
            masks, frozen, early_bird = state.masks, state.frozen, state.early_bird
        inner_state = state.inner_state
        if regrows and refresh:
            inner_state = map_param_trees(inner, reset, inner_state, params, state.masks, masks)
        active = _and(masks, state.masks)
        grads = masks_lib.apply_masks(updates, active)
        new_updates, inner_state = inner.update(grads, inner_state, params, **extra_args)
        new_updates = jax.tree.map(lambda u, p, a: u if a is None else jnp.where(a, u, -p),
                                   new_updates, params, active)
        return new_updates, SparsityState(step + 1, masks, frozen, inner_state, early_bird)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

"""Loss scaling and the non-finite-step guard, as an optax wrapper around the whole optimizer.

float16 has 5 exponent bits: gradients below 2^-24 flush to zero. Loss scaling trains on
``S * loss``, so every backward value is ``S`` times larger, and divides the gradients by ``S``
before the optimizer sees them (``g = grad(S * loss) / S``, exact for powers of two). The dynamic
rule (Micikevicius et al. 2018, "Mixed Precision Training")::

    finite  = all(isfinite(g))                                   over ALL gradient leaves
    finite:      apply inner update; good += 1;
                 if good == period: S = min(S * factor, ceiling); good = 0
    not finite:  updates = 0, inner state untouched; S = max(S / factor, floor); good = 0

The skip is atomic: params, moments and the inner step count are all left as they were (the
inner update runs under ``lax.cond`` and the skip branch returns the old inner state).

The same wrapper with ``mode="none"`` (``S = 1``, never changed) is the non-finite guard for every
precision, and ``mode="static"`` keeps ``S`` fixed. Unlike ``optax.apply_if_finite``, which
gives up after ``max_consecutive_errors`` and applies the non-finite update, this never applies a
non-finite update; the trainer stops after ``max_nonfinite_steps`` (:func:`raise_if_diverged`).

Distributed use: the finiteness test must see the same gradients on every replica. In our jit
setup (Mesh + NamedSharding) the gradients reaching ``tx.update`` are global arrays, already
reduced across the data axis by XLA, so ``all(isfinite)`` is one global value. Under
pmap/shard_map, either ``lax.pmean`` the gradients before ``tx.update`` (then a non-finite value on
one replica is non-finite everywhere) or pass ``axis_name`` so the flag itself is reduced.

Checkpointing: the state holds only jnp arrays (no static aux data), so it survives an orbax
StandardSave/StandardRestore round trip; floor, ceiling, period and factor are constructor
constants, rebuilt from the config, never stored (jmp keeps them as pytree aux data and loses
them on a round trip).

The inner optimizer always runs in float32: gradients and params are upcast before it and the
updates cast back to the params' dtype, so a float16 model cannot hit Adam's ``0 / (0 + eps)``
with eps=1e-8 flushed to zero in float16.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

if TYPE_CHECKING:  # annotations only: config.py imports the models, which import this package
    from jaxaccel.config import PrecisionConfig

__all__ = ["LossScaleState", "NonFiniteError", "loss_scaling", "dynamic_loss_scale", "static_loss_scale",
           "nonfinite_guard", "with_precision", "resolve_mode", "current_scale", "nonfinite_steps",
           "scale_loss", "raise_if_diverged", "all_finite"]

Mode = Literal["none", "static", "dynamic"]


class LossScaleState(NamedTuple):
    """Every field is a jnp array (checkpoint-safe)."""
    scale: jax.Array            # float32 []: the current loss scale S
    good_steps: jax.Array       # int32 []: finite steps since S last changed
    nonfinite_steps: jax.Array  # int32 []: consecutive non-finite (skipped) steps
    total_nonfinite: jax.Array  # int32 []: skipped steps over the whole run
    inner_state: optax.OptState


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had non-finite gradients; the trainer stops with this."""


def all_finite(tree: Any) -> jax.Array:
    """Scalar bool: every element of every floating leaf is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if not leaves:
        return jnp.array(True)
    return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


def _f32(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def loss_scaling(inner: optax.GradientTransformation, mode: Mode = "dynamic", *, init: float = 2.0 ** 15,
                 floor: float = 1.0, ceiling: float = 2.0 ** 24, period: int = 2000, factor: float = 2.0,
                 axis_name: Optional[str] = None, assume_finite: bool = False) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` with loss scaling (``mode``) and the non-finite skip.

    ``update(grads, state, params)`` expects ``grads = d(S * loss)/dparams`` with ``S =
    current_scale(state)``. ``axis_name``: reduce the finiteness flag over this pmap/shard_map
    axis (not needed when gradients are already reduced, as under jit).

    ``assume_finite``: the fast half of the rollback guard (``precision.guard=rollback``). Same
    state, but every update is applied as a finite one (no test, no select: the guard's selects
    over the optimizer state cost ~20% of an MLP step on CPU). Only correct when the caller checks
    the result and redoes any step group that met a non-finite value with the ordinary wrapper,
    as the trainer does. On finite steps both compute the same updates (XLA fuses the two programs
    differently, so results may differ in the last bits).
    """
    if mode not in ("none", "static", "dynamic"):
        raise ValueError(f"loss scaling mode must be none, static or dynamic, got {mode!r}")
    if mode == "none":
        init = 1.0
    if not 0 < floor <= init <= ceiling:
        raise ValueError(f"need 0 < floor <= init <= ceiling, got floor={floor} init={init} ceiling={ceiling}")
    if mode == "dynamic" and (factor <= 1 or period < 1):
        raise ValueError(f"need factor > 1 and period >= 1, got factor={factor} period={period}")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        # A fresh buffer per field: one shared array would be donated twice by a jitted step.
        zero = lambda: jnp.zeros([], jnp.int32)
        return LossScaleState(scale=jnp.asarray(init, jnp.float32), good_steps=zero(), nonfinite_steps=zero(),
                              total_nonfinite=zero(), inner_state=inner.init(_f32(params)))

    def update_fn(updates, state, params=None, **extra):
        dtypes = jax.tree.map(lambda x: x.dtype, updates)
        grads = _f32(updates)
        if mode != "none":  # S is a power of two by default, so this division is exact
            grads = jax.tree.map(lambda g: g / state.scale, grads)
        finite = jnp.array(True) if assume_finite else all_finite(grads)
        if axis_name is not None and not assume_finite:  # one replica's inf makes every replica skip
            finite = lax.pmin(finite.astype(jnp.int32), axis_name).astype(bool)

        # Always compute the update, then select: a skipped step keeps the old inner state bit for
        # bit (the non-finite candidate is discarded). Unlike lax.cond, the select fuses into the
        # optimizer's elementwise update, so the guard costs almost nothing on a finite step.
        new, new_inner = inner.update(grads, state.inner_state, _f32(params), **extra)
        keep = lambda fresh, old: jnp.where(finite, fresh, old)
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), _f32(new))
        inner_state = jax.tree.map(keep, new_inner, state.inner_state)
        new_updates = jax.tree.map(lambda u, d: u.astype(d), new_updates, dtypes)

        scale, good = state.scale, state.good_steps
        if mode == "dynamic":
            good = jnp.where(finite, good + 1, 0)
            grow = good >= period
            scale = jnp.where(finite, jnp.where(grow, jnp.minimum(scale * factor, ceiling), scale),
                              jnp.maximum(scale / factor, floor)).astype(jnp.float32)
            good = jnp.where(grow, 0, good).astype(jnp.int32)
        else:
            good = jnp.where(finite, good + 1, 0).astype(jnp.int32)
        bad = (~finite).astype(jnp.int32)
        return new_updates, LossScaleState(
            scale=scale, good_steps=good,
            nonfinite_steps=jnp.where(finite, 0, state.nonfinite_steps + 1).astype(jnp.int32),
            total_nonfinite=(state.total_nonfinite + bad).astype(jnp.int32), inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dynamic_loss_scale(inner: optax.GradientTransformation, **kw: Any) -> optax.GradientTransformationExtraArgs:
    """:func:`loss_scaling` with ``mode="dynamic"``."""
    return loss_scaling(inner, "dynamic", **kw)


def static_loss_scale(inner: optax.GradientTransformation, scale: float, **kw: Any) -> optax.GradientTransformationExtraArgs:
    """A fixed loss scale ``scale`` (non-finite steps are still skipped)."""
    return loss_scaling(inner, "static", init=scale, floor=min(scale, 1.0), ceiling=max(scale, 1.0), **kw)


def nonfinite_guard(inner: optax.GradientTransformation, **kw: Any) -> optax.GradientTransformationExtraArgs:
    """No scaling (S = 1); only the atomic skip of non-finite steps and the counters."""
    return loss_scaling(inner, "none", **kw)


def resolve_mode(cfg: PrecisionConfig) -> Mode:
    """``auto``: dynamic when any of params/compute is float16 (bf16 and f32 need no scaling)."""
    if cfg.loss_scale != "auto":
        return cfg.loss_scale
    return "dynamic" if "float16" in (cfg.params, cfg.compute) else "none"


def with_precision(inner: optax.GradientTransformation, cfg: PrecisionConfig,
                   axis_name: Optional[str] = None, assume_finite: bool = False) -> optax.GradientTransformationExtraArgs:
    """Wrap the whole optimizer (outermost, so clipping etc. never see a non-finite gradient).
    ``assume_finite``: see :func:`loss_scaling`."""
    mode = resolve_mode(cfg)
    kw = dict(axis_name=axis_name, assume_finite=assume_finite)
    if mode == "static":
        return static_loss_scale(inner, cfg.loss_scale_init, **kw)
    if mode == "none":
        return nonfinite_guard(inner, **kw)
    return loss_scaling(inner, "dynamic", init=cfg.loss_scale_init, floor=cfg.loss_scale_min,
                        ceiling=cfg.loss_scale_max, period=cfg.loss_scale_period,
                        factor=cfg.loss_scale_factor, **kw)


def _get(opt_state: Any, field: str) -> Any:
    # Filter on the tuple name so an unrelated optax state with a field called "scale" never matches.
    is_ours = lambda path, _: getattr(path[-1], "tuple_name", None) == "LossScaleState"
    return optax.tree_utils.tree_get(opt_state, field, filtering=is_ours)


def current_scale(opt_state: Any) -> jax.Array:
    """The loss scale S in any (nested, chained) optimizer state; 1.0 if it has none."""
    s = _get(opt_state, "scale")
    return jnp.asarray(1.0, jnp.float32) if s is None else s


def nonfinite_steps(opt_state: Any) -> jax.Array:
    """Consecutive non-finite steps so far (0 if the optimizer is not wrapped)."""
    n = _get(opt_state, "nonfinite_steps")
    return jnp.zeros([], jnp.int32) if n is None else n


def scale_loss(loss: jax.Array, opt_state: Any) -> jax.Array:
    """``S * loss`` in float32: what the train step differentiates."""
    return loss.astype(jnp.float32) * current_scale(opt_state)


def raise_if_diverged(opt_state: Any, max_nonfinite_steps: int, step: Optional[int] = None) -> None:
    """Host-side check (it syncs): raise :class:`NonFiniteError` after ``max_nonfinite_steps`` skips in a row."""
    n = int(np.asarray(jax.device_get(nonfinite_steps(opt_state))))
    if n >= max_nonfinite_steps:
        where = f" at step {step}" if step is not None else ""
        s = float(np.asarray(jax.device_get(current_scale(opt_state))))
        raise NonFiniteError(
            f"{n} consecutive steps{where} had non-finite (inf/NaN) gradients and were skipped "
            f"(limit precision.max_nonfinite_steps={max_nonfinite_steps}; loss scale now {s:g}). The model "
            "has diverged or the precision is too narrow: lower optim.learning_rate, set "
            "optim.grad_clip_norm, or use precision.compute=bfloat16/float32.")

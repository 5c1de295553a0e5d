"""Mixed-precision policy: which dtype parameters, activations, accumulators and logits use.

A :class:`~jaxaccel.config.PrecisionConfig` maps onto Flax as follows::

    nn.Dense(..., dtype=compute, param_dtype=float32, dot_general=dot_general(cfg))
    nn.Conv(...,  dtype=compute, param_dtype=float32, conv_general_dilated=conv_general_dilated(cfg))
    logits = cast_output(logits, cfg)                       # cfg.output
    apply_fn({"params": cast_params(params, cfg)}, images)  # cfg.params, master weights stay f32

Dots and convolutions compute ``y = cast_c(sum_k cast_c(x)_k * cast_c(w)_k)`` where ``cast_c`` is a
cast to ``compute`` and the sum is accumulated in ``accumulation`` (``preferred_element_type``).
Accumulating in float32 is the fast path on CPU as well as the accurate one: XLA:CPU runs a
bf16 x bf16 -> f32 dot natively (2.5x faster than f32 here), but a bf16 x bf16 -> bf16 dot is
converted to f32 and back, which is slower than plain f32.

The backward pass of a low-precision dot is written out (``_dot_bwd``) because JAX's transpose of
``dot_general(bf16, bf16, preferred_element_type=f32)`` receives an f32 cotangent and promotes both
operands of the two gradient dots to f32, losing the speed-up on 2/3 of the FLOPs. Here the
cotangent is cast to ``compute`` and the gradient dots are again ``compute x compute -> accumulation``.

Loss, softmax and normalisation statistics are never computed here: they stay float32 (the loss
casts logits to f32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxaccel.paths import map_with_names, matches

if TYPE_CHECKING:  # annotations only: config.py imports the models, which import this module
    from jaxaccel.config import PrecisionConfig

__all__ = ["DTYPES", "Policy", "dot_general", "conv_general_dilated", "cast_params", "cast_output",
           "dense_kwargs", "conv_kwargs", "check_backend"]

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclass(frozen=True)
class Policy:
    """The dtypes of a :class:`PrecisionConfig` as numpy dtypes."""
    params: np.dtype
    compute: np.dtype
    output: np.dtype
    accumulation: np.dtype

    @classmethod
    def from_config(cls, cfg: PrecisionConfig) -> "Policy":
        return cls(*(np.dtype(DTYPES[getattr(cfg, f)]) for f in ("params", "compute", "output", "accumulation")))

    @property
    def mixed(self) -> bool:
        """True when dots take narrower inputs than they accumulate in (the custom-gradient path)."""
        return self.compute.itemsize < self.accumulation.itemsize


# ---------------------------------------------------------------------------------------------
# Dot: forward in compute dtype with f32 accumulation, and the matching backward.

def _remaining(n: int, *removed: Sequence[int]) -> list[int]:
    drop = {i for r in removed for i in r}
    return [i for i in range(n) if i not in drop]


def _ranges_like(*xs: Sequence[int]) -> list[tuple[int, ...]]:
    out, start = [], 0
    for x in xs:
        out.append(tuple(range(start, start + len(x))))
        start += len(x)
    return out


def _transpose_lhs(g, x_ndim: int, y, dims, precision, acc, swap_ans: bool = False):
    """d(lhs) of ``dot_general(x, y, dims)`` given output cotangent ``g`` (as jax's own transpose
    rule, jax/_src/lax/lax.py ``_dot_general_transpose_lhs``, minus sharding, with our dtypes)."""
    (xc, yc), (xb, yb) = dims
    x_kept = _remaining(x_ndim, xc, xb)
    y_kept = _remaining(y.ndim, yc, yb)
    if swap_ans:
        ans_batch, ans_y, _ = _ranges_like(xb, y_kept, x_kept)
    else:
        ans_batch, _, ans_y = _ranges_like(xb, x_kept, y_kept)
    out = lax.dot_general(g, y, ((ans_y, tuple(y_kept)), (ans_batch, tuple(yb))),
                          precision=precision, preferred_element_type=acc)
    unsorted = list(xb) + x_kept + list(np.take(xc, np.argsort(yc)))
    return lax.transpose(out, tuple(int(i) for i in np.argsort(unsorted)))


def _mixed_dot(lhs, rhs, dims, precision, compute, acc):
    """``cast_c(dot(lhs, rhs))`` accumulated in ``acc``; gradients: dots in compute dtype, acc ``acc``."""
    @jax.custom_vjp
    def f(x, y):
        return lax.dot_general(x, y, dims, precision=precision, preferred_element_type=acc).astype(compute)

    def fwd(x, y):
        return f(x, y), (x, y)

    def bwd(res, g):
        x, y = res
        g = g.astype(compute)  # the cotangent of a compute-dtype output: keep the gradient dots narrow
        (xc, yc), (xb, yb) = dims
        dx = _transpose_lhs(g, x.ndim, y, dims, precision, acc)
        dy = _transpose_lhs(g, y.ndim, x, ((yc, xc), (yb, xb)), precision, acc, swap_ans=True)
        return dx.astype(x.dtype), dy.astype(y.dtype)

    f.defvjp(fwd, bwd)
    return f(lhs.astype(compute), rhs.astype(compute))


def dot_general(cfg: PrecisionConfig) -> Callable:
    """A ``lax.dot_general`` replacement for ``nn.Dense(dot_general=...)`` following ``cfg``.

    ``y = cast_compute(dot_general(cast_compute(lhs), cast_compute(rhs), preferred_element_type=acc))``.
    A ``preferred_element_type`` passed by the caller is ignored: the policy decides.
    """
    pol = Policy.from_config(cfg)

    def dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        del preferred_element_type, kw  # out_sharding etc.: not used by our single-program models
        if pol.mixed:
            return _mixed_dot(lhs, rhs, dimension_numbers, precision, pol.compute, pol.accumulation)
        y = lax.dot_general(lhs.astype(pol.compute), rhs.astype(pol.compute), dimension_numbers,
                            precision=precision, preferred_element_type=pol.accumulation)
        return y.astype(pol.compute)

    return dot


def conv_general_dilated(cfg: PrecisionConfig) -> Callable:
    """A ``lax.conv_general_dilated`` replacement for ``nn.Conv(conv_general_dilated=...)``.

    ``y = cast_compute(conv(cast_compute(lhs), cast_compute(rhs), preferred_element_type=acc))``.
    The backward pass is jax's transpose rule (gradient convs with float32 operands). Unlike the
    dot, a hand-written narrow backward does not pay here: on this CPU bf16 convolutions (either
    result dtype) measured no faster than f32 ones, forward or transposed (see NOTES.md).
    """
    pol = Policy.from_config(cfg)

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
             preferred_element_type=None, **kw):
        del preferred_element_type, kw
        y = lax.conv_general_dilated(
            lhs.astype(pol.compute), rhs.astype(pol.compute), window_strides, padding,
            lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=pol.accumulation)
        return y.astype(pol.compute)

    return conv


# ---------------------------------------------------------------------------------------------
# Params, outputs, module arguments.

def cast_params(params: Any, cfg: PrecisionConfig) -> Any:
    """Cast the floating leaves whose name (:mod:`jaxaccel.paths`) matches ``cfg.include`` to ``cfg.params``.

    Call it inside the loss function on the float32 master weights: the cast is differentiable,
    so gradients come back through it as float32 (``d cast(w) / dw`` is the identity, in f32).
    """
    dtype = DTYPES[cfg.params]
    if dtype == jnp.float32:
        return params

    def cast(name, leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and matches(name, cfg.include):
            return leaf.astype(dtype)
        return leaf

    return map_with_names(cast, params)


def cast_output(logits: jax.Array, cfg: PrecisionConfig) -> jax.Array:
    """Logits in ``cfg.output``; the loss casts them to float32 before the softmax."""
    return logits.astype(DTYPES[cfg.output])


def dense_kwargs(cfg: PrecisionConfig, layer: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``nn.Dense`` (``{}`` if ``layer``'s kernel path is not in ``cfg.include``)."""
    if layer is not None and not matches(f"{layer}/kernel", cfg.include):
        return {}
    return dict(dtype=DTYPES[cfg.compute], param_dtype=jnp.float32, dot_general=dot_general(cfg))


def conv_kwargs(cfg: PrecisionConfig, layer: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``nn.Conv`` (``{}`` if ``layer``'s kernel path is not in ``cfg.include``)."""
    if layer is not None and not matches(f"{layer}/kernel", cfg.include):
        return {}
    return dict(dtype=DTYPES[cfg.compute], param_dtype=jnp.float32,
                conv_general_dilated=conv_general_dilated(cfg))


# ---------------------------------------------------------------------------------------------
# Backend advice.

def check_backend(cfg: PrecisionConfig, backend: str | None = None) -> list[str]:
    """Warnings (with the advice) for settings that are slow or pointless on ``backend``.

    ``backend`` defaults to ``jax.default_backend()`` ("cpu", "gpu"/"cuda"/"rocm", "tpu").
    """
    backend = (backend or jax.default_backend()).lower()
    pol = Policy.from_config(cfg)
    f16, f32 = np.dtype(jnp.float16), np.dtype(jnp.float32)
    used = {pol.params, pol.compute, pol.accumulation}
    out = []
    if backend == "cpu" and f16 in used:
        out.append("precision: float16 on CPU has no native arithmetic (XLA:CPU converts to float32 and "
                   "back around each op) and is slower than float32; use precision.compute=bfloat16 "
                   "precision.params=bfloat16, which is native on AVX512-BF16 CPUs and needs no loss scaling.")
    if backend == "tpu" and f16 in used:
        out.append("precision: TPUs have no float16 matmul units; use bfloat16.")
    if pol.compute != f32 and pol.accumulation != f32:
        why = ("XLA:CPU converts such dots to float32 and back, slower than plain float32"
               if backend == "cpu" else "low-precision accumulation loses accuracy on long sums")
        out.append(f"precision: accumulation={cfg.accumulation} with compute={cfg.compute}: {why}; "
                   "use precision.accumulation=float32 (the fast path: narrow inputs, f32 accumulators).")
    if pol.accumulation.itemsize < pol.compute.itemsize:
        out.append(f"precision: accumulation={cfg.accumulation} is narrower than compute={cfg.compute}: "
                   "rounds every dot without any speed-up; use precision.accumulation=float32.")
    if pol.compute == f16 and cfg.loss_scale == "none":
        out.append("precision: float16 compute without loss scaling: small gradients underflow to zero; "
                   "use precision.loss_scale=dynamic (or auto).")
    if f16 not in used and cfg.loss_scale in ("static", "dynamic"):
        out.append(f"precision: loss_scale={cfg.loss_scale} without float16: bfloat16/float32 have float32's "
                   "exponent range, so scaling only costs a multiply; precision.loss_scale=auto turns it off.")
    if pol.params.itemsize < pol.compute.itemsize:
        out.append(f"precision: params={cfg.params} narrower than compute={cfg.compute}: weights are rounded "
                   "but the arithmetic is not faster; set precision.compute to the same dtype.")
    return out

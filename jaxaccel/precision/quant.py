"""int8 quantization: fake quantization for QAT, post-training quantization, int8 inference.

Symmetric absmax quantization with ``b`` bits, ``Q = 2^(b-1) - 1`` (127 for int8)::

    s = max|x| / Q            over the whole tensor (per-tensor) or all axes but the channel axis
    q = clip(round(x / s), -Q, Q)          (an integer, stored as int8)
    x_hat = q * s                          |x - x_hat| <= s / 2 elementwise

There is no zero point, so 0 maps to exactly 0 and pruned weights stay exactly zero. Weights are
quantized per output channel (the kernel's last axis in flax's Dense (in, out) and Conv HWIO
layouts), activations per tensor with a dynamic (per-batch) scale.

QAT (``fake_quant``) trains through ``x_hat`` with the straight-through estimator:
``d x_hat / d x = 1`` where ``|round(x / s)| <= Q`` and 0 where clipping happened (only possible
with a given, e.g. calibrated, scale; an absmax scale never clips). Scales get no gradient.

int8 inference computes ``y = (q_x . q_w) * s_x * s_w + b`` with the dot (or conv) accumulated in
int32 (``preferred_element_type=jnp.int32``): ``|q_x q_w| <= Q^2``, so int32 holds any realistic
contraction exactly. An int8 x int8 -> int8 dot is both wrong (overflows) and, on XLA:CPU, ~500x
slower. Because ``sum_k (q_x s_x)(q_w s_w) = s_x s_w sum_k q_x q_w``, the int8 model computes the
fake-quant model's logits up to float32 rounding of the accumulation order.

Convolutions are the one int8 op whose lowering depends on the backend (:data:`INT8_CONV_RESULT`,
resolved per platform at lowering time by ``lax.platform_dependent``): XLA:CPU and XLA:TPU compile
s8 x s8 -> s32 convolutions; XLA:GPU lowers integer convolutions only to cuDNN's int8 kernels,
which accumulate in int32 and write s8 or f32. There an s32 result compiles only when XLA folds the
conversion to f32 that follows it into cuDNN's f32 form (it did for every model here; a bare s32
result is UNIMPLEMENTED), so the GPU form asks for f32 itself: cuDNN's int32 sum converted once,
as the CPU form converts it afterwards.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from jaxaccel.paths import matches
from jaxaccel.precision import policy

if TYPE_CHECKING:  # annotations only: config.py imports the models, which import this module
    from jaxaccel.config import PrecisionConfig, QuantConfig

__all__ = ["qmax", "absmax_scale", "quantize", "dequantize", "fake_quant", "fake_quant_operands",
           "quant_dot_general", "quant_conv_general_dilated", "layer_kwargs", "quantize_params", "dequantize_params",
           "int8_dot_general", "int8_conv_general_dilated", "int8_dense", "int8_conv",
           "fake_quant_apply", "int8_apply", "INT8_CONV_RESULT", "int8_conv_accumulate"]

Axis = Union[int, Sequence[int], None]


def qmax(bits: int) -> int:
    """Largest code of the symmetric ``bits``-bit range [-Q, Q] (-128 is unused: symmetric)."""
    return 2 ** (bits - 1) - 1


def _kept(axis: Axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return ()
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def absmax_scale(x: jax.Array, bits: int = 8, axis: Axis = None) -> jax.Array:
    """``max|x| / Q`` in float32, reduced over all axes except ``axis`` (kept with size 1 elsewhere).

    An all-zero tensor/channel gets scale 1 (any scale maps zeros to zero; this avoids 0/0).
    """
    kept = _kept(axis, x.ndim)
    reduce = tuple(i for i in range(x.ndim) if i not in kept)
    m = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=reduce, keepdims=True)
    # m * (1/Q), not m / Q: XLA rewrites division by a constant into this multiply under jit, so
    # writing it so gives bit-identical scales in eager and compiled code.
    return lax.stop_gradient(jnp.where(m > 0, m * (1.0 / qmax(bits)), 1.0))


def _codes(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    """``round(x / s)`` before clipping, in float32 (round half to even, like jnp.round)."""
    return jnp.round(x.astype(jnp.float32) / scale)


def quantize(x: jax.Array, bits: int = 8, axis: Axis = None,
             scale: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """``(q int8, s float32)`` with ``x ~= q * s``; ``s`` keeps dims (broadcasts against ``q``)."""
    s = absmax_scale(x, bits, axis) if scale is None else jnp.asarray(scale, jnp.float32)
    q = jnp.clip(_codes(x, s, bits), -qmax(bits), qmax(bits))
    return q.astype(jnp.int8), s


def dequantize(q: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    return (q.astype(jnp.float32) * scale).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fake_quant(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    q = jnp.clip(_codes(x, scale, bits), -qmax(bits), qmax(bits))
    return (q * scale).astype(x.dtype)


def _fake_quant_fwd(x, scale, bits):
    return _fake_quant(x, scale, bits), (x, scale)


def _fake_quant_bwd(bits, res, g):
    x, scale = res
    inside = jnp.abs(_codes(x, scale, bits)) <= qmax(bits)  # clipped STE
    return jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(scale)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x: jax.Array, bits: int = 8, axis: Axis = None, scale: Optional[jax.Array] = None) -> jax.Array:
    """``x_hat = clip(round(x / s), -Q, Q) * s`` with a straight-through gradient, in ``x.dtype``.

    ``axis``: the channel axis (or axes) that keep their own scale; None = one per-tensor scale.
    ``scale``: a fixed (e.g. calibrated) scale instead of the dynamic absmax one.
    """
    s = absmax_scale(x, bits, axis) if scale is None else lax.stop_gradient(jnp.asarray(scale, jnp.float32))
    return _fake_quant(x, s, bits)


# ---------------------------------------------------------------------------------------------
# QAT ops for flax: nn.Dense(dot_general=...), nn.Conv(conv_general_dilated=...).

def _gate(enabled: Union[bool, jax.Array], quantized: jax.Array, x: jax.Array) -> jax.Array:
    if enabled is True:
        return quantized
    if enabled is False:
        return x
    return jnp.where(enabled, quantized, x)  # a traced flag (step >= start_step): no recompilation


def fake_quant_operands(cfg: QuantConfig, lhs: jax.Array, rhs: jax.Array, w_channels: tuple[int, ...],
                        enabled: Union[bool, jax.Array] = True) -> tuple[jax.Array, jax.Array]:
    """QAT's two operands of a dot or convolution: the weight (``rhs``) fake-quantized per channel
    over the axes ``w_channels`` (or per tensor), the activation (``lhs``) per tensor (or left
    alone with ``activations: none``); ``enabled`` gates both (see :func:`quant_dot_general`)."""
    w_axis = w_channels if cfg.weights == "per_channel" else None
    rhs = _gate(enabled, fake_quant(rhs, cfg.bits, w_axis), rhs)
    if cfg.activations == "per_tensor":
        lhs = _gate(enabled, fake_quant(lhs, cfg.bits, None), lhs)
    return lhs, rhs


def quant_dot_general(cfg: QuantConfig, base: Optional[Callable] = None,
                      enabled: Union[bool, jax.Array] = True) -> Callable:
    """``dot_general`` that fake-quantizes the weight (rhs, per output channel: every axis not
    contracted) and the activation (lhs, per tensor or not at all), then calls ``base``
    (``lax.dot_general``, or e.g. ``policy.dot_general(precision_cfg)`` to compose with bf16).
    ``enabled``: bool, or a traced bool such as ``step >= cfg.start_step``."""
    base = base or lax.dot_general

    def dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        (_, rc), _ = dimension_numbers
        w_channels = tuple(i for i in range(rhs.ndim) if i not in rc)
        lhs, rhs = fake_quant_operands(cfg, lhs, rhs, w_channels, enabled)
        return base(lhs, rhs, dimension_numbers, precision=precision,
                    preferred_element_type=preferred_element_type, **kw)

    return dot


def quant_conv_general_dilated(cfg: QuantConfig, base: Optional[Callable] = None,
                               enabled: Union[bool, jax.Array] = True) -> Callable:
    """``conv_general_dilated`` that fake-quantizes the kernel per output feature (the rhs_spec
    'O' axis) and the input per tensor, then calls ``base`` (see :func:`quant_dot_general`)."""
    base = base or lax.conv_general_dilated

    def conv(lhs, rhs, window_strides, padding, *args, dimension_numbers=None, **kw):
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        lhs, rhs = fake_quant_operands(cfg, lhs, rhs, (dn.rhs_spec[0],), enabled)
        return base(lhs, rhs, window_strides, padding, *args, dimension_numbers=dimension_numbers, **kw)

    return conv


def layer_kwargs(kind: str, layer: Optional[str] = None, precision: Optional[PrecisionConfig] = None,
                 quant: Optional[QuantConfig] = None, enabled: Union[bool, jax.Array] = True) -> dict[str, Any]:
    """nn.Dense (``kind="dense"``) / nn.Conv (``"conv"``) keyword arguments for one layer.

    Precision applies if ``layer + "/kernel"`` matches ``precision.include``; fake quantization if
    ``quant.mode == "qat"`` and ``layer`` matches ``quant.include``. Both compose (quantize, then cast).
    """
    if kind not in ("dense", "conv"):
        raise ValueError(f"kind must be 'dense' or 'conv', got {kind!r}")
    kw: dict[str, Any] = {}
    if precision is not None:
        kw = (policy.dense_kwargs if kind == "dense" else policy.conv_kwargs)(precision, layer)
    if quant is not None and quant.mode == "qat" and (layer is None or matches(layer, quant.include)):
        op = "dot_general" if kind == "dense" else "conv_general_dilated"
        make = quant_dot_general if kind == "dense" else quant_conv_general_dilated
        kw[op] = make(quant, kw.get(op), enabled)
    return kw


# ---------------------------------------------------------------------------------------------
# Post-training quantization.

def _is_quantized_kernel(path: tuple[str, ...], leaf: Any, cfg: QuantConfig) -> bool:
    return (path[-1] == "kernel" and getattr(leaf, "ndim", 0) >= 2
            and matches("/".join(path[:-1]), cfg.include))


def quantize_params(params: Any, cfg: QuantConfig) -> tuple[Any, Any]:
    """``(qparams, scales)``: kernels of the layers matching ``cfg.include`` as int8 (per output
    channel = last axis, or per tensor), everything else (biases, ...) unchanged in float32;
    ``scales`` mirrors the quantized kernels' paths with float32 scales (dims kept)."""
    flat = traverse_util.flatten_dict(params)
    qflat, sflat = {}, {}
    for path, leaf in flat.items():
        if _is_quantized_kernel(path, leaf, cfg):
            axis = -1 if cfg.weights == "per_channel" else None
            qflat[path], sflat[path] = quantize(leaf, cfg.bits, axis)
        else:
            qflat[path] = leaf
    return traverse_util.unflatten_dict(qflat), traverse_util.unflatten_dict(sflat)


def dequantize_params(qparams: Any, scales: Any) -> Any:
    """Float32 params ``q * s`` (what the fake-quant model's weights are, exactly)."""
    sflat = traverse_util.flatten_dict(scales)
    flat = {p: dequantize(v, sflat[p]) if p in sflat else v for p, v in traverse_util.flatten_dict(qparams).items()}
    return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------
# int8 inference (int32 accumulation).

# The result type of an int8 x int8 convolution on each platform (the one place that decides it).
# "int32": the exact integer sum, converted to float32 afterwards (XLA:CPU, XLA:TPU).
# "float32": XLA:GPU (cuDNN) cannot write an s32 convolution result ("Can't lower one or more
# integer convolutions to idioms supported by CuDNN ... s8 or f32 output") unless it can fold the
# conversion after it; cuDNN's int8 kernels accumulate in int32 and convert once to f32, the same
# numbers. Other platforms get float32 too.
INT8_CONV_RESULT: dict[str, str] = {"cpu": "int32", "tpu": "int32", "cuda": "float32", "rocm": "float32"}
_INT8_CONV_DEFAULT = "float32"


def _int8_dot_accumulate(x_q, w_q, *args, **kw) -> jax.Array:
    """int8 x int8 -> int32 ``dot_general`` as float32 (every backend compiles int8 dots)."""
    return lax.dot_general(x_q, w_q, *args, preferred_element_type=jnp.int32, **kw).astype(jnp.float32)


def int8_conv_accumulate(x_q: jax.Array, w_q: jax.Array, *args: Any, **kw: Any) -> jax.Array:
    """``lax.conv_general_dilated(x_q, w_q, *args, **kw)`` of int8 operands as a float32 array, in
    the result type :data:`INT8_CONV_RESULT` gives the platform it is lowered for."""
    def conv(result):
        def run(x, w):
            return lax.conv_general_dilated(x, w, *args, preferred_element_type=result, **kw).astype(jnp.float32)
        return run

    branches = {"int32": conv(jnp.int32), "float32": conv(jnp.float32)}
    per_platform = {platform: branches[result] for platform, result in INT8_CONV_RESULT.items()}
    return lax.platform_dependent(x_q, w_q, default=branches[_INT8_CONV_DEFAULT], **per_platform)


def int8_dense(x_q: jax.Array, w_q: jax.Array, x_scale: jax.Array, w_scale: jax.Array,
               bias: Optional[jax.Array] = None) -> jax.Array:
    """``(x_q . w_q)_int32 * s_x * s_w + b`` for x_q [..., K], w_q [K, N] int8; float32 result."""
    acc = _int8_dot_accumulate(x_q, w_q, (((x_q.ndim - 1,), (0,)), ((), ())))
    y = acc * (x_scale.reshape(()) * w_scale.reshape(-1))
    return y if bias is None else y + bias


def int8_conv(x_q: jax.Array, w_q: jax.Array, x_scale: jax.Array, w_scale: jax.Array,
              bias: Optional[jax.Array] = None, *, strides: Sequence[int] = (1, 1),
              padding: Any = "SAME", dimension_numbers: Any = ("NHWC", "HWIO", "NHWC")) -> jax.Array:
    """int8 NHWC x HWIO convolution accumulated in int32, rescaled by ``s_x * s_w`` (per 'O')."""
    acc = int8_conv_accumulate(x_q, w_q, tuple(strides), padding, dimension_numbers=dimension_numbers)
    y = acc * (x_scale.reshape(()) * w_scale.reshape(-1))
    return y if bias is None else y + bias


def _int8_op(op: Callable, accumulate: Callable, w_scale: jax.Array, bits: int, activations: str) -> Callable:
    """Wrap ``op`` (lax.dot_general or lax.conv_general_dilated, output features last) for a layer
    whose kernel holds int8 codes. activations="per_tensor": quantize the input (dynamic absmax),
    ``accumulate`` the int8 op (int32 sums as float32), rescale by ``s_x * s_w``. "none"
    (weight-only): float32 op on ``q_w * s_w``."""
    def run(lhs, rhs, *args, preferred_element_type=None, precision=None, **kw):
        if activations == "none":
            return op(lhs.astype(jnp.float32), dequantize(rhs.astype(jnp.int8), w_scale), *args, **kw)
        x_q, x_s = quantize(lhs, bits)
        acc = accumulate(x_q, rhs.astype(jnp.int8), *args, **kw)
        return acc * (x_s.reshape(()) * w_scale.reshape(-1))
    return run


def int8_dot_general(w_scale: jax.Array, bits: int = 8, activations: str = "per_tensor") -> Callable:
    """A ``dot_general`` for an ``nn.Dense`` whose kernel holds int8 codes (``w_scale``: [..., N])."""
    return _int8_op(lax.dot_general, _int8_dot_accumulate, w_scale, bits, activations)


def int8_conv_general_dilated(w_scale: jax.Array, bits: int = 8, activations: str = "per_tensor") -> Callable:
    """The ``nn.Conv`` counterpart of :func:`int8_dot_general` (NHWC: output features last); the
    convolution's result type is the platform's (:data:`INT8_CONV_RESULT`)."""
    return _int8_op(lax.conv_general_dilated, int8_conv_accumulate, w_scale, bits, activations)


# ---------------------------------------------------------------------------------------------
# Whole-model forwards for an unmodified flax model (MLP, CNN, any nn.Dense/nn.Conv model).

def _swap_ops(make: Callable[[nn.Module, str], Optional[dict[str, Any]]]) -> Callable:
    """A flax method interceptor that re-runs each nn.Dense/nn.Conv ``__call__`` as a clone with
    the ops ``make(module, layer_path)`` returns (None: leave the layer alone), on the layer's own
    variables. Reusing the layer's own __call__ keeps flax's padding/batch-dim handling."""
    depth = [0]

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if depth[0] or context.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.Conv)):
            return next_fun(*args, **kwargs)
        ops = make(mod, "/".join(mod.scope.path))
        if ops is None:
            return next_fun(*args, **kwargs)
        depth[0] += 1  # the clone's own __call__ must not be intercepted again
        try:
            return mod.clone(parent=None, **ops).apply(dict(mod.variables), *args, **kwargs)
        finally:
            depth[0] -= 1

    return interceptor


def fake_quant_apply(model: nn.Module, variables: Any, *args: Any, cfg: QuantConfig,
                     enabled: Union[bool, jax.Array] = True, **kwargs: Any) -> Any:
    """``model.apply`` with every included Dense/Conv fake-quantized (differentiable: usable as the
    QAT ``apply_fn`` without changing the model)."""
    def make(mod, layer):
        if not matches(layer, cfg.include):
            return None
        if isinstance(mod, nn.Dense):
            return {"dot_general": quant_dot_general(cfg, mod.dot_general, enabled)}
        return {"conv_general_dilated": quant_conv_general_dilated(cfg, mod.conv_general_dilated, enabled)}

    with nn.intercept_methods(_swap_ops(make)):
        return model.apply(variables, *args, **kwargs)


def int8_apply(model: nn.Module, qparams: Any, scales: Any, *args: Any, cfg: QuantConfig, **kwargs: Any) -> Any:
    """Run ``model`` on PTQ params from :func:`quantize_params`: included layers compute in int8
    with int32 accumulation (activations quantized per tensor on the fly), the rest in float32.
    Layers kept in float (not in ``scales``) use their float kernels as stored in ``qparams``."""
    sflat = {"/".join(p[:-1]): s for p, s in traverse_util.flatten_dict(scales).items()}

    def make(mod, layer):
        if layer not in sflat:
            return None
        # dtype=None: flax promotes the int8 kernel to float32 (exact: |q| <= 127); the op casts it back.
        if isinstance(mod, nn.Dense):
            return {"dtype": None, "dot_general": int8_dot_general(sflat[layer], cfg.bits, cfg.activations)}
        return {"dtype": None,
                "conv_general_dilated": int8_conv_general_dilated(sflat[layer], cfg.bits, cfg.activations)}

    with nn.intercept_methods(_swap_ops(make)):
        return model.apply({"params": qparams}, *args, **kwargs)

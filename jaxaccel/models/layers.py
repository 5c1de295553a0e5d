"""Building blocks the models share: input scaling, per-layer precision/QAT arguments, the im2col
convolution, pooling, cropping, the low-rank factorized Dense and Conv layers and the classifier
base of the application models.

Inputs are uint8 images [N, H, W, C] (int32 tokens [N, L] for text_cnn, int16 audio [N, T] for
kws_cnn); scaling to floats happens inside the model, so the dataset stays in its compact integer
form on the device (4x less memory and host-to-device traffic).

Every Dense/Conv takes its dtype, dot/conv op and fake quantization from the precision policy
and the QAT config (:func:`jaxaccel.precision.layer_kwargs`); with neither set it is plain fp32.

Convolutions are ``nn.Conv`` layers (same parameter names and shapes whatever the lowering); with
``conv="im2col"`` their ``conv_general_dilated`` is :func:`im2col_conv`: the kh*kw shifted slices
of the padded input concatenated on the channel axis, times the kernel reshaped to a matrix, in one
dot. XLA:CPU runs that dot with its fast matmul kernels also inside a device loop, where its own
convolution loses them (benchmarks/README.md).
"""
from __future__ import annotations

import functools
import itertools
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxaccel import precision as prec

if TYPE_CHECKING:  # annotations only: config.py imports the models
    from jaxaccel.config import PrecisionConfig, QuantConfig

__all__ = ["to_float", "layer_kw", "conv_kw", "im2col_conv", "pool2", "center_crop", "cast_logits",
           "group_norm", "Classifier", "SMALL_CONTRACTION", "FactorizedDense", "FactorizedConv", "LowRankWarning",
           "saves_flops", "dense_layer", "conv_layer"]


def to_float(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 pixels as float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def layer_kw(module: nn.Module, kind: str, name: str, quant_enabled: Any) -> dict[str, Any]:
    """Keyword arguments for one Dense/Conv from the module's precision policy and QAT config."""
    return prec.layer_kwargs(kind, name, module.precision, module.quant, quant_enabled)


def im2col_conv(dot_general: Callable = lax.dot_general) -> Callable:
    """A ``lax.conv_general_dilated`` replacement computing the convolution as one ``dot_general``.

    The patch matrix is built from kh*kw strided slices of the padded input (no gather), so its
    transpose in the backward pass is a sum of pads. Supports any layout, strides and padding;
    dilations and feature groups raise. ``dot_general`` is the dot to use (e.g. the precision
    policy's mixed bf16 dot); ``preferred_element_type`` is passed through to it.
    """
    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
             preferred_element_type=None, **unused):
        if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))) or feature_group_count != 1 \
                or batch_group_count != 1:
            raise NotImplementedError("im2col_conv: dilation and grouped convolutions are not supported; "
                                      "use model.conv=xla")
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        x = lhs.transpose(dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])  # N, spatial..., C
        w = rhs.transpose(*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])  # spatial..., I, O
        window, spatial = w.shape[:-2], x.shape[1:-1]
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(spatial, window, window_strides, padding)
        x = jnp.pad(x, ((0, 0), *[tuple(p) for p in padding], (0, 0)))
        out = [(x.shape[1 + d] - window[d]) // window_strides[d] + 1 for d in range(len(window))]
        slices_of = [((0, *offset, 0),
                      (x.shape[0], *(o + (n - 1) * s + 1 for o, n, s in zip(offset, out, window_strides)), x.shape[-1]),
                      (1, *window_strides, 1))
                     for offset in itertools.product(*(range(k) for k in window))]
        w2d = w.reshape(-1, w.shape[-1])
        if (dot_general is lax.dot_general and preferred_element_type is None
                and w2d.shape[0] <= SMALL_CONTRACTION):
            y = _small_contraction_conv(x, w2d, tuple(slices_of))
        else:
            patches = _patches(x, slices_of)  # [N, out..., prod(window) * C], window-major
            # A 2-D matrix product (XLA:CPU runs bf16 x bf16 -> f32 only as a plain 2-D dot).
            y = dot_general(patches.reshape(-1, patches.shape[-1]), w2d,
                            (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=preferred_element_type)
            y = y.reshape(*patches.shape[:-1], w.shape[-1])
        # back from N, spatial..., O to the requested output layout
        order = (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1])
        return y.transpose(tuple(int(i) for i in np.argsort(order)))

    return conv


# A convolution whose contraction (kh*kw*in_channels) is at most this small (the first layer of an
# MNIST CNN: 9) runs its forward pass as that many broadcast multiply-adds in one elementwise
# fusion instead of a patch matrix and a dot with a 9-long contraction (measured on XLA:CPU,
# [128,28,28,1] -> 32 channels: 1.2 vs 8.3 ms). Its backward pass stays the im2col one.
SMALL_CONTRACTION = 16


def _patches(x, slices_of):
    return jnp.concatenate([lax.slice(x, *where) for where in slices_of], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _small_contraction_conv(x, w2d, slices_of):
    """``patches(x) @ w2d`` for a short contraction, as broadcast multiply-adds (see SMALL_CONTRACTION)."""
    channels = x.shape[-1]
    y = None
    for i, where in enumerate(slices_of):
        part = lax.slice(x, *where)
        for c in range(channels):
            term = part[..., c:c + 1] * w2d[i * channels + c]
            y = term if y is None else y + term
    return y


def _small_contraction_fwd(x, w2d, slices_of):
    return _small_contraction_conv(x, w2d, slices_of), (x, w2d)


def _small_contraction_bwd(slices_of, residuals, g):
    x, w2d = residuals
    def as_dot(x, w2d):
        patches = _patches(x, slices_of)
        return (patches.reshape(-1, patches.shape[-1]) @ w2d).reshape(*patches.shape[:-1], w2d.shape[-1])
    return jax.vjp(as_dot, x, w2d)[1](g)


_small_contraction_conv.defvjp(_small_contraction_fwd, _small_contraction_bwd)


def conv_kw(module: nn.Module, name: str, quant_enabled: Any) -> dict[str, Any]:
    """nn.Conv keyword arguments: the precision/QAT ones, with the module's conv lowering."""
    if module.conv == "xla":
        return dict(name=name, **layer_kw(module, "conv", name, quant_enabled))
    # im2col: the precision policy's dot (and dtype) applied to the patch matrix, QAT around it.
    kw = prec.layer_kwargs("dense", name, module.precision, None)
    kw["conv_general_dilated"] = im2col_conv(kw.pop("dot_general", lax.dot_general))
    if "conv_general_dilated" in prec.layer_kwargs("conv", name, None, module.quant, quant_enabled):
        kw["conv_general_dilated"] = prec.quant_conv_general_dilated(module.quant, kw["conv_general_dilated"],
                                                                     quant_enabled)
    return dict(name=name, **kw)


def pool2(x: jnp.ndarray, kind: str) -> jnp.ndarray:
    """2x2 pooling, stride 2, VALID (as nn.avg_pool / nn.max_pool) of a ReLU's output. Max pooling
    as a max over a reshape: XLA:CPU's select-and-scatter (the gradient of nn.max_pool) was 12x
    slower (measured fwd+bwd on [256,28,28,16]: 377 vs 32 ms); average pooling is fastest as
    nn.avg_pool."""
    if kind == "avg":
        return nn.avg_pool(x, (2, 2), strides=(2, 2))
    n, h, w, c = x.shape
    return _relu_max_pool2(x[:, :h - h % 2, :w - w % 2])


def _windows(x: jnp.ndarray) -> jnp.ndarray:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def _relu_max_pool2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 max pooling of an even-sized [N, H, W, C] ReLU output. Its gradient goes to every input
    equal to its window's maximum. Autodiff's splits it among tied inputs, which needs a count per
    window (XLA:CPU recomputed the first conv four times for it: mnist_fast's step at batch 64 took
    3.9 ms against 4.5 ms, medians of 15 alternating rounds). The two agree for pool(relu(z)): a
    ReLU output ties only at 0 (barring exactly equal positive floats), where relu's gradient is 0."""
    return _windows(x).max(axis=(2, 4))


def _relu_max_pool2_fwd(x):
    y = _relu_max_pool2(x)
    return y, (x, y)


def _relu_max_pool2_bwd(residuals, g):
    x, y = residuals
    at_max = _windows(x) == y[:, :, None, :, None, :]
    return (jnp.where(at_max, g[:, :, None, :, None, :], 0).reshape(x.shape),)


_relu_max_pool2.defvjp(_relu_max_pool2_fwd, _relu_max_pool2_bwd)


def center_crop(images: jnp.ndarray, size: int) -> jnp.ndarray:
    """The central size x size pixels of a [N, H, W, C] batch (a static slice: no copy in XLA's eyes)."""
    height, width = images.shape[1:3]
    if size > min(height, width):
        raise ValueError(f"model.crop={size} is larger than the {height}x{width} images; "
                         f"use model.crop <= {min(height, width)} or leave it unset")
    top, left = (height - size) // 2, (width - size) // 2
    return images[:, top:top + size, left:left + size]


def cast_logits(module: nn.Module, logits: jnp.ndarray) -> jnp.ndarray:
    """The logits in the module's precision policy's output dtype (unchanged without a policy)."""
    return prec.cast_output(logits, module.precision) if module.precision else logits


def group_norm(channels: int, name: str) -> nn.GroupNorm:
    # Group norm instead of batch norm: the train state holds parameters only, no batch statistics.
    return nn.GroupNorm(num_groups=min(8, channels), name=name)


class Classifier(nn.Module):
    """The fields and the classifier head the application models (resnet, text_cnn, kws_cnn) share.
    Every layer is a named top-level nn.Dense/nn.Conv, so precision, QAT, int8 export and sparsity
    treat them like the MNIST models'."""
    num_classes: int = 10
    width: int = 16
    depth: int = 3
    precision: Optional[PrecisionConfig] = None
    quant: Optional[QuantConfig] = None

    def _head(self, x: jnp.ndarray, quant_enabled: Any) -> jnp.ndarray:
        return cast_logits(self, nn.Dense(self.num_classes, name="Dense_0",
                                          **layer_kw(self, "dense", "Dense_0", quant_enabled))(x))


# ---------------------------------------------------------------------------------------------
# Low-rank factorized layers (jaxaccel.lowrank).

class LowRankWarning(UserWarning):
    """A layer given a rank that would not save FLOPs, left dense."""


def saves_flops(m: int, n: int, rank: int) -> bool:
    """Whether ``x @ U @ V`` (U: m x r, V: r x n) costs fewer multiply-adds (and parameters) than
    ``x @ W`` (W: m x n): r (m + n) < m n, i.e. r < mn / (m + n)."""
    return rank * (m + n) < m * n


class FactorizedDense(nn.Module):
    """``x @ U @ V + b``: a Dense whose kernel is the product of U (m x rank) and V (rank x features).

    Two plain nn.Dense layers, ``U`` (no bias) and ``V``, so precision, QAT, int8 export
    (per output channel of each factor) and the compression report treat each factor as the
    Dense layers they are; parameters ``<name>/U/kernel``, ``<name>/V/kernel``, ``<name>/V/bias``.
    Initialised from scratch (lowrank.from_start), U and V are LeCun-normal, so U @ V has the
    variance (1/m) of the dense kernel it replaces."""
    features: int
    rank: int
    precision: Optional[PrecisionConfig] = None
    quant: Optional[QuantConfig] = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        name = "/".join(self.scope.path)  # precision/QAT regexes see each factor's full layer name
        x = nn.Dense(self.rank, use_bias=False, name="U", **layer_kw(self, "dense", f"{name}/U", quant_enabled))(x)
        return nn.Dense(self.features, name="V", **layer_kw(self, "dense", f"{name}/V", quant_enabled))(x)


def _paying_rank(module: nn.Module, name: str, m: int, n: int) -> int | None:
    """The rank ``module.ranks`` gives the layer ``name`` (an m x n kernel as a matrix) when it saves
    FLOPs; None when it gives none, or one that would not pay (with a :class:`LowRankWarning`)."""
    rank = dict(getattr(module, "ranks", ())).get(name)
    if rank is None or saves_flops(m, n, rank):
        return rank
    warnings.warn(f"{name} ({m} x {n}) left dense: rank {rank} would not save FLOPs "
                  f"(needs rank < {m * n / (m + n):.1f})", LowRankWarning, stacklevel=3)
    return None


def dense_layer(module: nn.Module, name: str, features: int, in_features: int, quant_enabled: Any) -> Callable:
    """The layer ``name`` of ``module`` applied to inputs of width ``in_features``: a plain nn.Dense,
    or a :class:`FactorizedDense` when ``module.ranks`` gives ``name`` a rank that saves FLOPs (a
    rank that would not leaves it dense, with a :class:`LowRankWarning`)."""
    rank = _paying_rank(module, name, in_features, features)
    if rank is not None:
        layer = FactorizedDense(features, rank, module.precision, module.quant, name=name)
        return functools.partial(layer, quant_enabled=quant_enabled)
    return nn.Dense(features, name=name, **layer_kw(module, "dense", name, quant_enabled))


class FactorizedConv(nn.Module):
    """A convolution whose kernel (kh, kw, cin, features) is the product of U and V as matrices:
    ``U`` a convolution with ``rank`` output channels and the layer's window, strides and padding
    (no bias), then ``V`` a 1x1 convolution from ``rank`` to ``features`` channels with the bias.

    Parameters ``<name>/U/kernel`` (kh, kw, cin, rank), ``<name>/V/kernel`` (1, 1, rank, features),
    ``<name>/V/bias``; U reshaped to (kh*kw*cin, rank) times V reshaped to (rank, features) is the
    dense kernel as a matrix (jaxaccel.lowrank.product_form). Each factor is a plain nn.Conv lowered
    as the model lowers its convolutions (``conv``: im2col or xla, :func:`conv_kw`), so precision,
    QAT and int8 export treat it like any conv layer (regexes see ``<name>/U``, ``<name>/V``).
    LeCun-normal factors from scratch give U V the variance, 1/(kh kw cin), of the kernel it replaces."""
    features: int
    kernel_size: tuple[int, ...]
    rank: int
    strides: Any = 1
    padding: Any = "SAME"
    conv: str = "xla"
    precision: Optional[PrecisionConfig] = None
    quant: Optional[QuantConfig] = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        name = "/".join(self.scope.path)
        # conv_kw names the layer by its full path (for the regexes); the factor's own name is U or V.
        u_kw = {**conv_kw(self, f"{name}/U", quant_enabled), "name": "U"}
        v_kw = {**conv_kw(self, f"{name}/V", quant_enabled), "name": "V"}
        x = nn.Conv(self.rank, self.kernel_size, strides=self.strides, padding=self.padding, use_bias=False,
                    **u_kw)(x)
        return nn.Conv(self.features, (1,) * len(self.kernel_size), **v_kw)(x)


def conv_layer(module: nn.Module, name: str, features: int, kernel: Sequence[int], in_channels: int,
               quant_enabled: Any, strides: Any = 1, padding: Any = "SAME") -> Callable:
    """The convolution ``name`` of ``module`` (window ``kernel``, ``in_channels`` inputs): a plain
    nn.Conv lowered as ``module.conv`` says, or a :class:`FactorizedConv` when ``module.ranks`` gives
    ``name`` a rank that saves FLOPs as a (kh*kw*in_channels) x features matrix (a rank that would
    not leaves it dense, with a :class:`LowRankWarning`)."""
    kernel = tuple(kernel)
    rank = _paying_rank(module, name, int(np.prod(kernel)) * in_channels, features)
    if rank is not None:
        layer = FactorizedConv(features, kernel, rank, strides, padding, module.conv, module.precision,
                               module.quant, name=name)
        return functools.partial(layer, quant_enabled=quant_enabled)
    return nn.Conv(features, kernel, strides=strides, padding=padding, **conv_kw(module, name, quant_enabled))

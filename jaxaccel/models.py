"""Flax models. Inputs are uint8 images [N, H, W, C] (int32 tokens [N, L] for text_cnn, int16 audio
[N, T] for kws_cnn); scaling to floats happens inside the model, so the dataset stays in its compact
integer form on the device (4x less memory and host-to-device traffic).

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
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxaccel import audio
from jaxaccel import precision as prec
from jaxaccel.config import ModelConfig, PrecisionConfig, QuantConfig

__all__ = ["MLP", "CNN", "SmallCNN", "ResNet", "TextCNN", "KWSCNN", "build_model", "im2col_conv"]


def _to_float(images: jnp.ndarray) -> jnp.ndarray:
    return images.astype(jnp.float32) / 255.0


def _layer_kw(module: nn.Module, kind: str, name: str, quant_enabled: Any) -> dict[str, Any]:
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


def _conv_kw(module: nn.Module, name: str, quant_enabled: Any) -> dict[str, Any]:
    """nn.Conv keyword arguments: the precision/QAT ones, with the module's conv lowering."""
    if module.conv == "xla":
        return dict(name=name, **_layer_kw(module, "conv", name, quant_enabled))
    # im2col: the precision policy's dot (and dtype) applied to the patch matrix, QAT around it.
    kw = prec.layer_kwargs("dense", name, module.precision, None)
    kw["conv_general_dilated"] = im2col_conv(kw.pop("dot_general", lax.dot_general))
    if "conv_general_dilated" in prec.layer_kwargs("conv", name, None, module.quant, quant_enabled):
        kw["conv_general_dilated"] = prec.quant_conv_general_dilated(module.quant, kw["conv_general_dilated"],
                                                                     quant_enabled)
    return dict(name=name, **kw)


def _pool2(x: jnp.ndarray, kind: str) -> jnp.ndarray:
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


def _center_crop(images: jnp.ndarray, size: int) -> jnp.ndarray:
    """The central size x size pixels of a [N, H, W, C] batch (a static slice: no copy in XLA's eyes)."""
    height, width = images.shape[1:3]
    if size > min(height, width):
        raise ValueError(f"model.crop={size} is larger than the {height}x{width} images; "
                         f"use model.crop <= {min(height, width)} or leave it unset")
    top, left = (height - size) // 2, (width - size) // 2
    return images[:, top:top + size, left:left + size]


def _output(module: nn.Module, logits: jnp.ndarray) -> jnp.ndarray:
    return prec.cast_output(logits, module.precision) if module.precision else logits


class MLP(nn.Module):
    """Fully connected ReLU net; features=(300, 100) is LeNet-300-100."""
    features: Sequence[int] = (300, 100)
    num_classes: int = 10
    precision: Optional[PrecisionConfig] = None  # dtype policy of every layer (None: fp32)
    quant: Optional[QuantConfig] = None          # QAT fake quantization (None: off)

    @nn.compact
    def __call__(self, images: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        x = _to_float(images).reshape(images.shape[0], -1)
        for i, width in enumerate(self.features):
            x = nn.relu(nn.Dense(width, name=f"Dense_{i}", **_layer_kw(self, "dense", f"Dense_{i}", quant_enabled))(x))
        n = len(self.features)
        return _output(self, nn.Dense(self.num_classes, name=f"Dense_{n}",
                                      **_layer_kw(self, "dense", f"Dense_{n}", quant_enabled))(x))


class CNN(nn.Module):
    """Exactly the flax-example MNIST CNN: the reference workload for speed comparisons."""
    num_classes: int = 10
    precision: Optional[PrecisionConfig] = None
    quant: Optional[QuantConfig] = None
    conv: str = "xla"  # lowering of the convolutions: "xla" or "im2col" (same parameters)

    @nn.compact
    def __call__(self, images: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        kw = lambda kind, name: dict(name=name, **_layer_kw(self, kind, name, quant_enabled))
        x = _to_float(images)
        conv = lambda width, name: nn.Conv(width, (3, 3), **_conv_kw(self, name, quant_enabled))
        x = nn.avg_pool(nn.relu(conv(32, "Conv_0")(x)), (2, 2), strides=(2, 2))
        x = nn.avg_pool(nn.relu(conv(64, "Conv_1")(x)), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256, **kw("dense", "Dense_0"))(x))
        return _output(self, nn.Dense(self.num_classes, **kw("dense", "Dense_1"))(x))


class SmallCNN(nn.Module):
    """A small CNN for time-to-accuracy: per width in ``channels`` a 3x3 conv, relu and 2x2 pool
    (``pool``: average or max); then a relu dense layer per width in ``features``, and the logits."""
    channels: Sequence[int] = (16, 32)
    features: Sequence[int] = ()
    pool: str = "avg"  # "avg" or "max"
    crop: Optional[int] = None  # central crop x crop pixels of the image are the input (None: all)
    num_classes: int = 10
    precision: Optional[PrecisionConfig] = None
    quant: Optional[QuantConfig] = None
    conv: str = "im2col"

    @nn.compact
    def __call__(self, images: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        x = _to_float(_center_crop(images, self.crop) if self.crop else images)
        for i, width in enumerate(self.channels):
            conv = nn.Conv(width, (3, 3), **_conv_kw(self, f"Conv_{i}", quant_enabled))
            x = _pool2(nn.relu(conv(x)), self.pool)
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate((*self.features, self.num_classes)):
            x = nn.Dense(width, name=f"Dense_{i}", **_layer_kw(self, "dense", f"Dense_{i}", quant_enabled))(x)
            x = nn.relu(x) if i < len(self.features) else x
        return _output(self, x)


def build_model(cfg: ModelConfig, num_classes: int, precision: PrecisionConfig | None = None,
                quant: QuantConfig | None = None) -> nn.Module:
    """The flax module a model config describes, with an optional precision policy and QAT."""
    if quant is not None and quant.mode != "qat":
        quant = None  # PTQ quantizes after training; training itself is unchanged
    if precision is not None and precision == PrecisionConfig():
        precision = None  # the default policy is plain fp32: keep the plain flax layers
    if cfg.name == "mlp":
        return MLP(features=tuple(cfg.features), num_classes=num_classes, precision=precision, quant=quant)
    if cfg.name == "cnn":
        return CNN(num_classes=num_classes, precision=precision, quant=quant, conv=cfg.conv)
    if cfg.name == "small_cnn":
        return SmallCNN(channels=tuple(cfg.channels), features=tuple(cfg.features), pool=cfg.pool, crop=cfg.crop,
                        num_classes=num_classes, precision=precision, quant=quant, conv=cfg.conv)
    if cfg.name in _APPLICATION_MODELS:
        return _APPLICATION_MODELS[cfg.name](num_classes=num_classes, width=cfg.width, depth=cfg.depth,
                                             precision=precision, quant=quant,
                                             **({"vocab_size": cfg.vocab_size} if cfg.name == "text_cnn" else {}))
    raise ValueError(f"unknown model {cfg.name!r}")  # unreachable: the schema restricts the name


# ---------------------------------------------------------------------------------------------
# Models of the other applications: CIFAR images, text, keyword spotting. Every layer is a named
# top-level nn.Dense/nn.Conv, so precision, QAT, int8 export and sparsity treat them like the above.

def _group_norm(channels: int, name: str) -> nn.GroupNorm:
    # Group norm instead of batch norm: the train state holds parameters only, no batch statistics.
    return nn.GroupNorm(num_groups=min(8, channels), name=name)


class _Application(nn.Module):
    """The fields and the classifier head the application models share."""
    num_classes: int = 10
    width: int = 16
    depth: int = 3
    precision: Optional[PrecisionConfig] = None
    quant: Optional[QuantConfig] = None

    def _head(self, x: jnp.ndarray, quant_enabled: Any) -> jnp.ndarray:
        return _output(self, nn.Dense(self.num_classes, name="Dense_0",
                                      **_layer_kw(self, "dense", "Dense_0", quant_enabled))(x))


class ResNet(_Application):
    """CIFAR ResNet-(6n+2) (He et al. 2016, section 4.2): a 3x3 conv, three stages of ``depth``
    basic blocks with ``width``, 2x and 4x channels (stride 2 into stages 2 and 3, 1x1 projection
    shortcuts), global average pool, Dense. depth=3 is ResNet-20. Group norm, not batch norm."""

    @nn.compact
    def __call__(self, images: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        conv = lambda c, name, k=(3, 3), s=1: nn.Conv(c, k, strides=s, use_bias=False, name=name,
                                                      **_layer_kw(self, "conv", name, quant_enabled))
        x = _to_float(images) - 0.5
        x = nn.relu(_group_norm(self.width, "Norm_0")(conv(self.width, "Conv_0")(x)))
        for stage in range(3):
            channels = self.width * 2 ** stage
            for block in range(self.depth):
                name, stride = f"Stage{stage}_Block{block}", 2 if stage and not block else 1
                y = nn.relu(_group_norm(channels, f"{name}_Norm_0")(conv(channels, f"{name}_Conv_0", s=stride)(x)))
                y = _group_norm(channels, f"{name}_Norm_1")(conv(channels, f"{name}_Conv_1")(y))
                if stride != 1 or x.shape[-1] != channels:
                    x = conv(channels, f"{name}_Shortcut", k=(1, 1), s=stride)(x)
                x = nn.relu(x + y)
        x = jnp.mean(x, axis=(1, 2))
        return self._head(x, quant_enabled)


class TextCNN(_Application):
    """Token ids [N, L] (0 = padding) -> embedding (``width``) -> ``depth`` 1-D convolutions of
    width 5 with ReLU -> max over the real tokens -> Dense."""
    vocab_size: int = 32768

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        dtype = prec.DTYPES[self.precision.compute] if self.precision else jnp.float32
        x = nn.Embed(self.vocab_size, self.width, dtype=dtype, name="Embed_0")(tokens)
        for i in range(self.depth):
            name = f"Conv_{i}"
            x = nn.relu(nn.Conv(self.width, (5,), name=name, **_layer_kw(self, "conv", name, quant_enabled))(x))
        # ReLU outputs are >= 0, so zeroing the padding positions leaves the max over real tokens.
        x = jnp.max(jnp.where((tokens != 0)[..., None], x, 0), axis=1)
        return self._head(x, quant_enabled)


class KWSCNN(_Application):
    """Keyword spotting: int16 audio [N, T] -> log-mel features (:func:`jaxaccel.audio.log_mel`,
    float32, normalised per clip) -> ``depth`` x (3x3 conv + ReLU + 2x2 max pool), channels
    ``width`` doubling up to 4x -> global average pool -> Dense."""

    @nn.compact
    def __call__(self, clips: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        feats = audio.log_mel(clips)
        mean, std = feats.mean(axis=(1, 2), keepdims=True), feats.std(axis=(1, 2), keepdims=True)
        x = ((feats - mean) / (std + 1e-5))[..., None]
        for i in range(self.depth):
            name = f"Conv_{i}"
            x = nn.Conv(self.width * 2 ** min(i, 2), (3, 3), name=name, **_layer_kw(self, "conv", name, quant_enabled))(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return self._head(x, quant_enabled)


_APPLICATION_MODELS = {"resnet": ResNet, "text_cnn": TextCNN, "kws_cnn": KWSCNN}
# What each model takes (every other model: uint8 images [N, H, W, C]).
INPUT_KINDS = {"text_cnn": ("int32", 1, "tokens [N, L]"), "kws_cnn": ("int16", 1, "audio [N, T]")}


def input_problem(model_name: str, dtype: str, shape: tuple[int, ...]) -> str | None:
    """Why ``model_name`` cannot take inputs of ``dtype`` and per-example ``shape`` (None: it can)."""
    want_dtype, want_rank, what = INPUT_KINDS.get(model_name, ("uint8", 3, "images [N, H, W, C]"))
    if dtype == want_dtype and len(shape) == want_rank:
        return None
    return f"model.name={model_name} takes {want_dtype} {what}, but the dataset gives {dtype} {list(shape)} per example"

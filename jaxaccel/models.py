"""Flax models. Inputs are uint8 images [N, H, W, C]; scaling to [0, 1] happens inside the model,
so the dataset stays uint8 on the device (4x less memory and host-to-device traffic).

Every Dense/Conv takes its dtype, dot/conv op and fake quantization from the precision policy
and the QAT config (:func:`jaxaccel.precision.layer_kwargs`); with neither set it is plain fp32.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxaccel import precision as prec
from jaxaccel.config import ModelConfig, PrecisionConfig, QuantConfig

__all__ = ["MLP", "CNN", "build_model"]


def _to_float(images: jnp.ndarray) -> jnp.ndarray:
    return images.astype(jnp.float32) / 255.0


def _layer_kw(module: nn.Module, kind: str, name: str, quant_enabled: Any) -> dict[str, Any]:
    """Keyword arguments for one Dense/Conv from the module's precision policy and QAT config."""
    return prec.layer_kwargs(kind, name, module.precision, module.quant, quant_enabled)


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

    @nn.compact
    def __call__(self, images: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        kw = lambda kind, name: dict(name=name, **_layer_kw(self, kind, name, quant_enabled))
        x = _to_float(images)
        x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3), **kw("conv", "Conv_0"))(x)), (2, 2), strides=(2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(64, (3, 3), **kw("conv", "Conv_1"))(x)), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256, **kw("dense", "Dense_0"))(x))
        return _output(self, nn.Dense(self.num_classes, **kw("dense", "Dense_1"))(x))


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
        return CNN(num_classes=num_classes, precision=precision, quant=quant)
    raise ValueError(f"unknown model {cfg.name!r}")  # unreachable: the schema restricts the name

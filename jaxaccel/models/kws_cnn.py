"""Keyword spotting: ``model.name=kws_cnn``, log-mel features computed inside the model."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import flax.linen as nn
import jax.numpy as jnp
from pydantic import Field

from jaxaccel import audio
from jaxaccel.models.base import ModelConfig
from jaxaccel.models.layers import Classifier, layer_kw
from jaxaccel.schema import PositiveInt

__all__ = ["KWSCNNConfig", "KWSCNN"]


class KWSCNNConfig(ModelConfig):
    """Log-mel features and a small CNN over them."""
    name: Literal["kws_cnn"] = "kws_cnn"
    inputs: ClassVar[tuple[str, int, str]] = ("int16", 1, "audio [N, T]")
    width: PositiveInt = Field(16, description="Channels of the first conv (doubling up to 4x).")
    depth: PositiveInt = Field(3, description="Conv layers.")

    def build(self, num_classes: int, precision: Any = None, quant: Any = None) -> nn.Module:
        return KWSCNN(num_classes=num_classes, width=self.width, depth=self.depth, precision=precision, quant=quant)


class KWSCNN(Classifier):
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
            x = nn.Conv(self.width * 2 ** min(i, 2), (3, 3), name=name, **layer_kw(self, "conv", name, quant_enabled))(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return self._head(x, quant_enabled)

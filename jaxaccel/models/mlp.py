"""The multi-layer perceptron: ``model.name=mlp`` (LeNet-300-100 with the default widths)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
from pydantic import Field

from jaxaccel.models.base import ModelConfig
from jaxaccel.models.layers import cast_logits, layer_kw, to_float
from jaxaccel.schema import PositiveInt

if TYPE_CHECKING:
    from jaxaccel.config import PrecisionConfig, QuantConfig

__all__ = ["MLPConfig", "MLP"]


class MLPConfig(ModelConfig):
    """Fully connected ReLU layers on the flattened input."""
    name: Literal["mlp"] = "mlp"
    features: list[PositiveInt] = Field([300, 100], description="Hidden dense widths (300, 100: LeNet-300-100).")

    def build(self, num_classes: int, precision: Any = None, quant: Any = None) -> nn.Module:
        return MLP(features=tuple(self.features), num_classes=num_classes, precision=precision, quant=quant)


class MLP(nn.Module):
    """Fully connected ReLU net; features=(300, 100) is LeNet-300-100."""
    features: Sequence[int] = (300, 100)
    num_classes: int = 10
    precision: Optional[PrecisionConfig] = None  # dtype policy of every layer (None: fp32)
    quant: Optional[QuantConfig] = None          # QAT fake quantization (None: off)

    @nn.compact
    def __call__(self, images: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        x = to_float(images).reshape(images.shape[0], -1)
        for i, width in enumerate(self.features):
            x = nn.relu(nn.Dense(width, name=f"Dense_{i}", **layer_kw(self, "dense", f"Dense_{i}", quant_enabled))(x))
        n = len(self.features)
        return cast_logits(self, nn.Dense(self.num_classes, name=f"Dense_{n}",
                                          **layer_kw(self, "dense", f"Dense_{n}", quant_enabled))(x))

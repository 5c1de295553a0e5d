"""The multi-layer perceptron: ``model.name=mlp`` (LeNet-300-100 with the default widths)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
from pydantic import Field

from jaxaccel.models.base import ModelConfig
from jaxaccel.models.layers import cast_logits, dense_layer, to_float
from jaxaccel.schema import PositiveInt

if TYPE_CHECKING:
    from jaxaccel.config import PrecisionConfig, QuantConfig

__all__ = ["MLPConfig", "MLP"]


class MLPConfig(ModelConfig):
    """Fully connected ReLU layers on the flattened input."""
    name: Literal["mlp"] = "mlp"
    features: list[PositiveInt] = Field([300, 100], description="Hidden dense widths (300, 100: LeNet-300-100).")
    # Low-rank factorization (jaxaccel.lowrank) writes it; empty: every layer dense.
    ranks: dict[str, PositiveInt] = Field(
        {}, description="Layer name (Dense_0, ...) -> rank r: that layer's kernel is U (m x r) @ V (r x n) "
                        "(jaxaccel.lowrank; a rank that would not save FLOPs leaves the layer dense).")

    def build(self, num_classes: int, precision: Any = None, quant: Any = None) -> nn.Module:
        return MLP(features=tuple(self.features), num_classes=num_classes, precision=precision, quant=quant,
                   ranks=tuple(sorted(self.ranks.items())))

    def kernel_names(self) -> list[str]:
        """The parameter names of the kernels low-rank factorization may replace (``Dense_i/kernel``)."""
        return [f"Dense_{i}/kernel" for i in range(len(self.features) + 1)]


class MLP(nn.Module):
    """Fully connected ReLU net; features=(300, 100) is LeNet-300-100."""
    features: Sequence[int] = (300, 100)
    num_classes: int = 10
    precision: Optional[PrecisionConfig] = None  # dtype policy of every layer (None: fp32)
    quant: Optional[QuantConfig] = None          # QAT fake quantization (None: off)
    ranks: tuple[tuple[str, int], ...] = ()      # (layer name, rank) of the low-rank factorized layers

    @nn.compact
    def __call__(self, images: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        x = to_float(images).reshape(images.shape[0], -1)
        for i, width in enumerate(self.features):
            x = nn.relu(dense_layer(self, f"Dense_{i}", width, x.shape[-1], quant_enabled)(x))
        n = len(self.features)
        return cast_logits(self, dense_layer(self, f"Dense_{n}", self.num_classes, x.shape[-1], quant_enabled)(x))

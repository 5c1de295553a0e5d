"""The CIFAR ResNet: ``model.name=resnet``."""
from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp
from pydantic import Field

from jaxaccel.models.base import ModelConfig
from jaxaccel.models.layers import Classifier, group_norm, layer_kw, to_float
from jaxaccel.schema import PositiveInt

__all__ = ["ResNetConfig", "ResNet"]


class ResNetConfig(ModelConfig):
    """CIFAR ResNet-(6n+2) with group norm."""
    name: Literal["resnet"] = "resnet"
    width: PositiveInt = Field(16, description="Channels of the first stage (the others: 2x and 4x).")
    depth: PositiveInt = Field(3, description="Residual blocks per stage (3: ResNet-20).")

    def build(self, num_classes: int, precision: Any = None, quant: Any = None) -> nn.Module:
        return ResNet(num_classes=num_classes, width=self.width, depth=self.depth, precision=precision, quant=quant)


class ResNet(Classifier):
    """CIFAR ResNet-(6n+2) (He et al. 2016, section 4.2): a 3x3 conv, three stages of ``depth``
    basic blocks with ``width``, 2x and 4x channels (stride 2 into stages 2 and 3, 1x1 projection
    shortcuts), global average pool, Dense. depth=3 is ResNet-20. Group norm, not batch norm."""

    @nn.compact
    def __call__(self, images: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        conv = lambda c, name, k=(3, 3), s=1: nn.Conv(c, k, strides=s, use_bias=False, name=name,
                                                      **layer_kw(self, "conv", name, quant_enabled))
        x = to_float(images) - 0.5
        x = nn.relu(group_norm(self.width, "Norm_0")(conv(self.width, "Conv_0")(x)))
        for stage in range(3):
            channels = self.width * 2 ** stage
            for block in range(self.depth):
                name, stride = f"Stage{stage}_Block{block}", 2 if stage and not block else 1
                y = nn.relu(group_norm(channels, f"{name}_Norm_0")(conv(channels, f"{name}_Conv_0", s=stride)(x)))
                y = group_norm(channels, f"{name}_Norm_1")(conv(channels, f"{name}_Conv_1")(y))
                if stride != 1 or x.shape[-1] != channels:
                    x = conv(channels, f"{name}_Shortcut", k=(1, 1), s=stride)(x)
                x = nn.relu(x + y)
        x = jnp.mean(x, axis=(1, 2))
        return self._head(x, quant_enabled)

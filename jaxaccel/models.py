"""Flax models. Inputs are uint8 images [N, H, W, C]; scaling to [0, 1] happens inside the model,
so the dataset stays uint8 on the device (4x less memory and host-to-device traffic)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxaccel.config import ModelConfig

__all__ = ["MLP", "CNN", "build_model"]


def _to_float(images: jnp.ndarray) -> jnp.ndarray:
    return images.astype(jnp.float32) / 255.0


class MLP(nn.Module):
    """Fully connected ReLU net; features=(300, 100) is LeNet-300-100."""
    features: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        x = _to_float(images).reshape(images.shape[0], -1)
        for width in self.features:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Exactly the flax-example MNIST CNN: the reference workload for speed comparisons."""
    num_classes: int

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        x = _to_float(images)
        x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(self.num_classes)(x)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The flax module a model config describes."""
    if cfg.name == "mlp":
        return MLP(features=tuple(cfg.features), num_classes=num_classes)
    if cfg.name == "cnn":
        return CNN(num_classes=num_classes)
    raise ValueError(f"unknown model {cfg.name!r}")  # unreachable: the schema restricts the name

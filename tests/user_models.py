"""Models this project does not define, written as a user would (plain Flax, no jaxaccel imports):
the tests train them by import path (``model.name=tests.user_models:LinenCNN``) and by object."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx


class LinenCNN(nn.Module):
    """The Flax example's MNIST CNN (plain nn.Conv / nn.avg_pool / nn.Dense), narrower by default."""
    num_classes: int = 10
    width: int = 8

    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(self.width, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(2 * self.width, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(x)


class FlaxExampleCNN(nn.Module):
    """Exactly ``mnist_cnn``'s architecture (conv32-conv64 3x3, relu, 2x2 average pool, dense 256,
    logits) in plain linen: the speed comparison of benchmarks/user_model.py."""
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(x)


class LinenBNNet(nn.Module):
    """BatchNorm and dropout: state besides parameters, and a ``train`` switch."""
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(32)(x)))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


class NNXMLP(nnx.Module):
    """An MLP in the style of Flax's NNX tutorial."""

    def __init__(self, num_classes: int = 10, hidden: int = 64, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(784, hidden, rngs=rngs), nnx.Linear(hidden, num_classes, rngs=rngs)])

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.layers[1](nnx.relu(self.layers[0](x)))


class NNXBNMLP(nnx.Module):
    """NNX with BatchNorm and dropout (``.train()``/``.eval()`` switch them)."""

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(784, 32, rngs=rngs)
        self.bn = nnx.BatchNorm(32, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.linear2 = nnx.Linear(32, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.linear1(x.reshape(x.shape[0], -1))))
        return self.linear2(self.dropout(x))


class NNXCNN(nnx.Module):
    """A small NNX CNN (for the conv lowering)."""

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.linear = nnx.Linear(4 * 14 * 14, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.conv(x)), (2, 2), strides=(2, 2))
        return self.linear(x.reshape(x.shape[0], -1))


class RawInputs(nn.Module):
    """Asks for the raw uint8 pixels."""
    num_classes: int = 10
    raw_inputs: bool = True

    @nn.compact
    def __call__(self, x):
        assert x.dtype == jnp.uint8, x.dtype
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0)


def make_cnn(num_classes: int = 10):
    """A factory."""
    return LinenCNN(num_classes=num_classes, width=4)

"""The CIFAR ResNet: ``model.name=resnet``."""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import pydantic
from pydantic import Field

from jaxaccel.models.base import ModelConfig
from jaxaccel.models.layers import Classifier, group_norm, layer_kw, to_float
from jaxaccel.schema import PositiveInt

__all__ = ["ResNetConfig", "ResNet", "block_names"]

# BatchNorm as in the ResNet papers' (PyTorch's) defaults: flax's momentum 0.99 averages over
# ~100 steps, too slow for the short runs here.
BATCH_NORM_MOMENTUM, BATCH_NORM_EPSILON = 0.9, 1e-5


def block_names(depth: int) -> list[str]:
    """``StageS_BlockB`` of every residual block, in forward order (3 stages of ``depth``)."""
    return [f"Stage{stage}_Block{block}" for stage in range(3) for block in range(depth)]


class ResNetConfig(ModelConfig):
    """CIFAR ResNet-(6n+2) with group or batch norm."""
    name: Literal["resnet"] = "resnet"
    width: PositiveInt = Field(16, description="Channels of the first stage (the others: 2x and 4x).")
    depth: PositiveInt = Field(3, description="Residual blocks per stage (3: ResNet-20).")
    norm: Literal["group", "batch"] = Field(
        "group", description="Normalization after every conv: group (8 groups, no model state) or batch "
                             "(per channel, running statistics in the batch_stats collection; needed by "
                             "sparsity.shrink).")
    inner: Optional[list[PositiveInt]] = Field(
        None, description="Channels of each block's first conv (one per block, 3*depth, in forward order); "
                          "null: the stage's width. Channel shrinking narrows them.")

    @pydantic.model_validator(mode="after")
    def _check_inner(self) -> "ResNetConfig":
        if self.inner is not None and len(self.inner) != 3 * self.depth:
            raise ValueError(f"model.inner has {len(self.inner)} widths; it needs one per residual block, "
                             f"3 * model.depth = {3 * self.depth} (or null for the stage widths)")
        odd = [w for w in self.inner or [] if w % min(8, w)]
        if self.norm == "group" and odd:
            raise ValueError(f"model.inner={list(self.inner)}: group norm splits a conv's channels into "
                             f"min(8, width) groups, so {odd} do not divide; use model.norm=batch")
        return self

    def inner_widths(self) -> list[int]:
        """The first conv's channels of every block (``inner``, or the stage widths)."""
        return list(self.inner) if self.inner is not None else [
            self.width * 2 ** stage for stage in range(3) for _ in range(self.depth)]

    def build(self, num_classes: int, precision: Any = None, quant: Any = None) -> nn.Module:
        return ResNet(num_classes=num_classes, width=self.width, depth=self.depth, precision=precision, quant=quant,
                      norm=self.norm, inner=tuple(self.inner_widths()))

    def unit_norms(self) -> dict[str, str]:
        """With batch norm, every conv but the 1x1 shortcuts is followed by its own norm."""
        if self.norm != "batch":
            return {}  # group norm mixes the channels of a group: not a per-unit normalization
        out = {"Conv_0": "Norm_0"}
        for block in block_names(self.depth):
            out.update({f"{block}_Conv_{k}": f"{block}_Norm_{k}" for k in (0, 1)})
        return out


class ResNet(Classifier):
    """CIFAR ResNet-(6n+2) (He et al. 2016, section 4.2): a 3x3 conv, three stages of ``depth``
    basic blocks with ``width``, 2x and 4x channels (stride 2 into stages 2 and 3, 1x1 projection
    shortcuts), global average pool, Dense. depth=3 is ResNet-20. ``norm``: group norm (default)
    or batch norm, in training mode exactly when the ``batch_stats`` collection is mutable (the
    train step; evaluation and export use the running statistics). ``inner``: each block's first
    conv width (empty: the stage width)."""
    norm: str = "group"
    inner: Sequence[int] = ()

    def _norm(self, channels: int, name: str) -> nn.Module:
        if self.norm == "batch":
            return nn.BatchNorm(use_running_average=not self.is_mutable_collection("batch_stats"),
                                momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, name=name)
        return group_norm(channels, name)

    @nn.compact
    def __call__(self, images: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        conv = lambda c, name, k=(3, 3), s=1: nn.Conv(c, k, strides=s, use_bias=False, name=name,
                                                      **layer_kw(self, "conv", name, quant_enabled))
        x = to_float(images) - 0.5
        x = nn.relu(self._norm(self.width, "Norm_0")(conv(self.width, "Conv_0")(x)))
        for i, name in enumerate(block_names(self.depth)):
            stage, block = divmod(i, self.depth)
            channels, stride = self.width * 2 ** stage, 2 if stage and not block else 1
            inner = self.inner[i] if self.inner else channels
            y = nn.relu(self._norm(inner, f"{name}_Norm_0")(conv(inner, f"{name}_Conv_0", s=stride)(x)))
            y = self._norm(channels, f"{name}_Norm_1")(conv(channels, f"{name}_Conv_1")(y))
            if stride != 1 or x.shape[-1] != channels:
                x = conv(channels, f"{name}_Shortcut", k=(1, 1), s=stride)(x)
            x = nn.relu(x + y)
        x = jnp.mean(x, axis=(1, 2))
        return self._head(x, quant_enabled)

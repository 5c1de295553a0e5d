"""The MNIST CNNs: ``model.name=cnn`` (the flax example, the speed reference) and ``small_cnn``
(the time-to-accuracy model). Both choose how their convolutions are lowered (``model.conv``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
from pydantic import Field

from jaxaccel.models.base import ModelConfig
from jaxaccel.models.layers import cast_logits, center_crop, conv_layer, dense_layer, pool2, to_float
from jaxaccel.schema import PositiveInt

if TYPE_CHECKING:
    from jaxaccel.config import PrecisionConfig, QuantConfig

__all__ = ["CNNConfig", "SmallCNNConfig", "CNN", "SmallCNN"]


class _ConvLowering(ModelConfig):
    conv: Literal["auto", "im2col", "xla"] = Field(
        "auto", description="How convolutions are lowered: im2col (patches as shifted slices + one dot; measured "
                            "fastest on XLA:CPU, also inside a device loop), xla (lax.conv: cuDNN/MXU convolutions "
                            "on accelerators) or auto (im2col on CPU, xla elsewhere).")
    # Low-rank factorization (jaxaccel.lowrank) of the convolutions and the dense layers after them.
    ranks: dict[str, PositiveInt] = Field(
        {}, description="Layer name (Conv_0, ..., Dense_0, ...) -> rank r: a Dense kernel is U (m x r) @ V (r x n); "
                        "a conv kernel (kh, kw, cin, cout) is a conv with r outputs, then a 1x1 conv to cout "
                        "(jaxaccel.lowrank; a rank that would not save FLOPs leaves the layer dense).")

    def _conv_count(self) -> int:
        raise NotImplementedError

    def _dense_count(self) -> int:
        raise NotImplementedError

    def kernel_names(self) -> list[str]:
        """The parameter names of the kernels low-rank factorization may replace, in the model's
        order: the convolutions' (``Conv_i/kernel``), then the dense layers' (``Dense_i/kernel``)."""
        return ([f"Conv_{i}/kernel" for i in range(self._conv_count())]
                + [f"Dense_{i}/kernel" for i in range(self._dense_count())])


class CNNConfig(_ConvLowering):
    """The flax-example CNN: conv32-conv64 (3x3, relu, 2x2 average pool), dense 256, logits."""
    name: Literal["cnn"] = "cnn"
    # A field so that channel shrinking (jaxaccel.sparsity.shrink) can narrow the model; the default is
    # the flax example's. Its own name: a ``features`` or ``channels`` of another model, kept when
    # model.name switches to cnn, would otherwise change this one.
    widths: list[PositiveInt] = Field([32, 64, 256], min_length=3, max_length=3,
                                      description="Widths of the two convs and the hidden dense layer.")

    def build(self, num_classes: int, precision: Any = None, quant: Any = None) -> nn.Module:
        return CNN(num_classes=num_classes, precision=precision, quant=quant, conv=self.conv,
                   ranks=tuple(sorted(self.ranks.items())), widths=tuple(self.widths))

    def _conv_count(self) -> int:
        return 2

    def _dense_count(self) -> int:
        return 2


class SmallCNNConfig(_ConvLowering):
    """3x3 convs of the channels widths, each relu + 2x2 pool, then dense layers of the features widths."""
    name: Literal["small_cnn"] = "small_cnn"
    channels: list[PositiveInt] = Field([16, 32], min_length=1, description="Conv widths.")
    features: list[PositiveInt] = Field([300, 100], description="Hidden dense widths after the convolutions.")
    pool: Literal["avg", "max"] = Field("avg", description="2x2 pooling after each conv.")
    crop: Optional[PositiveInt] = Field(
        None, description="The central crop x crop pixels of each image are the input (part of the model, so it "
                          "still takes full images; MNIST digits lie in the central ~20x20).")

    def build(self, num_classes: int, precision: Any = None, quant: Any = None) -> nn.Module:
        return SmallCNN(channels=tuple(self.channels), features=tuple(self.features), pool=self.pool, crop=self.crop,
                        num_classes=num_classes, precision=precision, quant=quant, conv=self.conv,
                        ranks=tuple(sorted(self.ranks.items())))

    def _conv_count(self) -> int:
        return len(self.channels)

    def _dense_count(self) -> int:
        return len(self.features) + 1

    def input_problem(self, dtype: str, shape: tuple[int, ...], data: str = "the dataset") -> str | None:
        problem = super().input_problem(dtype, shape, data)
        if problem is None and self.crop and self.crop > min(shape[:2]):
            return (f"model.crop={self.crop} is larger than {data}'s {shape[0]}x{shape[1]} images: use model.crop <= "
                    f"{min(shape[:2])} or leave it unset")
        return problem


class CNN(nn.Module):
    """Exactly the flax-example MNIST CNN: the reference workload for speed comparisons."""
    num_classes: int = 10
    precision: Optional[PrecisionConfig] = None
    quant: Optional[QuantConfig] = None
    conv: str = "xla"  # lowering of the convolutions: "xla" or "im2col" (same parameters)
    ranks: tuple[tuple[str, int], ...] = ()  # (layer name, rank) of the low-rank factorized layers
    widths: Sequence[int] = (32, 64, 256)  # the two convs, the hidden dense layer

    @nn.compact
    def __call__(self, images: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        x = to_float(images)
        for i in range(2):
            x = conv_layer(self, f"Conv_{i}", self.widths[i], (3, 3), x.shape[-1], quant_enabled)(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(dense_layer(self, "Dense_0", self.widths[2], x.shape[-1], quant_enabled)(x))
        return cast_logits(self, dense_layer(self, "Dense_1", self.num_classes, x.shape[-1], quant_enabled)(x))


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
    ranks: tuple[tuple[str, int], ...] = ()  # (layer name, rank) of the low-rank factorized layers

    @nn.compact
    def __call__(self, images: jnp.ndarray, quant_enabled: Any = True) -> jnp.ndarray:
        x = to_float(center_crop(images, self.crop) if self.crop else images)
        for i, width in enumerate(self.channels):
            x = conv_layer(self, f"Conv_{i}", width, (3, 3), x.shape[-1], quant_enabled)(x)
            x = pool2(nn.relu(x), self.pool)
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate((*self.features, self.num_classes)):
            x = dense_layer(self, f"Dense_{i}", width, x.shape[-1], quant_enabled)(x)
            x = nn.relu(x) if i < len(self.features) else x
        return cast_logits(self, x)

"""Models: one module per family, each holding its config classes and its Flax modules.

    mlp.py       model.name=mlp         LeNet-300-100 style MLP
    cnn.py       model.name=cnn         the flax-example CNN (the speed reference)
                 model.name=small_cnn   the time-to-accuracy CNN
    resnet.py    model.name=resnet      CIFAR ResNet-(6n+2), group norm
    text_cnn.py  model.name=text_cnn    token embedding + 1-D convolutions
    kws_cnn.py   model.name=kws_cnn     log-mel + CNN keyword spotting
    custom.py    model.name=package.module:Attribute   your own linen or NNX model (or
                 jaxaccel.train(cfg, model=...)), behind the same init/apply interface
    layers.py    what they share (precision/QAT layer arguments, im2col convolution, pooling)

A model's config class (:class:`~jaxaccel.models.base.ModelConfig`) declares the ``model.*``
fields it reads and builds its module; declaring it registers it, and the config's ``model``
section is the union of the registered classes keyed on ``model.name``. Every module of this
package is imported here, so adding a model is adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

# In the order --help and error messages list the models.
from jaxaccel.models.base import IMPORT_PATH, REGISTRY, ModelConfig, registry_key  # isort: skip
from jaxaccel.models.mlp import MLP, MLPConfig  # isort: skip
from jaxaccel.models.cnn import CNN, CNNConfig, SmallCNN, SmallCNNConfig  # isort: skip
from jaxaccel.models.resnet import ResNet, ResNetConfig  # isort: skip
from jaxaccel.models.text_cnn import TextCNN, TextCNNConfig  # isort: skip
from jaxaccel.models.kws_cnn import KWSCNN, KWSCNNConfig  # isort: skip
from jaxaccel.models.layers import im2col_conv
from jaxaccel.models.custom import ImportedModelConfig, UserModel, is_user_model, object_config  # isort: skip

# Any other module of the package (a new model family) registers its models by being imported.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "ModelConfig", "build_model", "input_problem", "im2col_conv", "IMPORT_PATH", "registry_key",
           "ImportedModelConfig", "UserModel", "is_user_model", "object_config",
           "MLP", "CNN", "SmallCNN", "ResNet", "TextCNN", "KWSCNN",
           "MLPConfig", "CNNConfig", "SmallCNNConfig", "ResNetConfig", "TextCNNConfig", "KWSCNNConfig"]


def build_model(cfg: ModelConfig, num_classes: int, precision: Any = None, quant: Any = None) -> Any:
    """The Flax module the model config ``cfg`` describes, with an optional precision policy
    (a PrecisionConfig) and QAT (a QuantConfig)."""
    if quant is not None and quant.mode != "qat":
        quant = None  # PTQ quantizes after training; training itself is unchanged
    if precision is not None and precision == type(precision)():
        precision = None  # the default policy is plain fp32: keep the plain flax layers
    return cfg.build(num_classes, precision, quant)


def input_problem(cfg: ModelConfig, dtype: str, shape: tuple[int, ...], data: str = "the dataset") -> str | None:
    """Why the model ``cfg`` cannot take the inputs of dataset ``data`` (``dtype``, per-example
    ``shape``), with what to do; None when it can."""
    return cfg.input_problem(dtype, shape, data)

"""The model registry: each model's config class, declared next to its Flax module, is the config."""
from __future__ import annotations

import subprocess
import sys

import jaxaccel
from jaxaccel.config import from_saved, model_config
from jaxaccel.models import REGISTRY, MLPConfig, SmallCNNConfig


def test_a_model_declared_in_one_module_becomes_a_model_name():
    # What a new file in jaxaccel/models/ does: declare a config class (its fields are its keys)
    # with a build method. Nothing else is edited: the config's union, --help and errors follow.
    code = """
import typing
import flax.linen as nn
from jaxaccel.models.base import ModelConfig

class ToyConfig(ModelConfig):
    '''A toy.'''
    name: typing.Literal["toy"] = "toy"
    width: int = 3

    def build(self, num_classes, precision=None, quant=None):
        return nn.Dense(num_classes)

from jaxaccel import config, experiments
cfg = experiments.override(experiments.get("mnist_mlp"), ["model.name=toy", "model.width=5"])
assert type(cfg.model) is ToyConfig and cfg.model.width == 5, cfg.model
assert "model.name=toy: A toy." in config.field_help()
try:
    experiments.override(experiments.get("mnist_mlp"), ["model.name=toy", "model.features=[3]"])
except config.ConfigError as e:
    assert "model.features does nothing for model.name=toy (it reads width)" in str(e), e
else:
    raise AssertionError("model.features accepted for the toy model")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_registry_maps_each_name_to_the_class_that_reads_its_fields():
    assert REGISTRY["mlp"] is MLPConfig and REGISTRY["small_cnn"] is SmallCNNConfig
    assert set(SmallCNNConfig.model_fields) == {"name", "conv", "ranks", "channels", "features", "pool", "crop"}
    assert type(model_config(name="small_cnn", crop=20)) is SmallCNNConfig


def test_exports_written_before_the_model_union_still_load():
    # Earlier versions stored every model field and quant.start_step in an export's model.json.
    old_model = {"name": "mlp", "features": [64, 32], "channels": [16, 32], "pool": "avg", "crop": None,
                 "conv": "im2col", "width": 16, "depth": 3, "vocab_size": 32768}
    assert from_saved("model", old_model) == MLPConfig(features=[64, 32])
    old_quant = {"mode": "qat", "bits": 8, "weights": "per_channel", "activations": "per_tensor",
                 "include": [".*"], "start_step": 5}
    assert from_saved("quant", old_quant).start == 5


def test_input_problems_name_the_model_the_data_and_the_fix():
    mlp, text = model_config(name="mlp"), model_config(name="text_cnn")
    assert mlp.input_problem("uint8", (28, 28, 1), "mnist") is None
    assert "model.name=text_cnn takes int32 tokens [N, L], but mnist gives uint8 [28, 28, 1]" in \
        text.input_problem("uint8", (28, 28, 1), "mnist")
    assert "model.crop=30 is larger than mnist's 28x28 images" in \
        model_config(name="small_cnn", crop=30).input_problem("uint8", (28, 28, 1), "mnist")
    assert jaxaccel.models.input_problem(mlp, "int32", (128,), "ag_news_subset").endswith("choose a model for this data")

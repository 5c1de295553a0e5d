"""jaxaccel: a JAX/XLA training pipeline for cheaper deep learning.

    import jaxaccel
    cfg = jaxaccel.experiments.get("mnist_mlp")
    cfg = jaxaccel.experiments.override(cfg, ["train.epochs=1"])
    summary = jaxaccel.train(cfg)

Importing the package touches neither devices nor data: submodules load on first use.
"""
import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["train", "experiments", "export", "config", "data", "models", "sparsity", "precision"]

_SUBMODULES = {"aot", "experiments", "export", "config", "data", "models", "trainer", "pipeline", "checkpoint", "optim",
               "sparsity", "precision", "parallel", "compression", "step", "metrics"}


def __getattr__(name: str) -> Any:
    if name == "train":
        from jaxaccel.pipeline import train
        return train
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxaccel.{name}")
    raise AttributeError(f"module 'jaxaccel' has no attribute {name!r}")

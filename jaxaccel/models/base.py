"""The base of every model's config class, and the registry the config's ``model`` union is built from.

A model family is one module in ``jaxaccel/models/`` holding, for each model, a config class
(a subclass of :class:`ModelConfig` whose ``name`` is a one-value ``Literal``: the fields it
declares are the ``model.*`` keys that model reads) and the Flax module its :meth:`build` returns.
Declaring the class registers it; ``jaxaccel.models`` imports every module of the package, so a
new model touches one file.
"""
from __future__ import annotations

import typing
from typing import Any, ClassVar

from jaxaccel.schema import Section

__all__ = ["ModelConfig", "REGISTRY", "IMPORT_PATH", "registry_key"]

# model.name -> its config class, in the order the classes were declared.
REGISTRY: dict[str, type["ModelConfig"]] = {}
# The REGISTRY key of every model named by its import path (jaxaccel.models.custom).
IMPORT_PATH = "package.module:Attribute"


def registry_key(name: Any) -> Any:
    """The REGISTRY key a ``model.name`` selects: itself, or :data:`IMPORT_PATH` for ``pkg.mod:Attr``."""
    return IMPORT_PATH if isinstance(name, str) and ":" in name else name


class ModelConfig(Section):
    """The ``model`` section of one architecture: ``name`` plus the fields that model reads."""
    name: str
    # What the model takes: (dtype, rank per example, words). Images unless a model says otherwise.
    inputs: ClassVar[tuple[str, int, str]] = ("uint8", 3, "images [N, H, W, C]")

    def __init__(self, **data: Any) -> None:
        if type(self) is ModelConfig:
            raise TypeError("ModelConfig is the base of the models' config classes: build one with "
                            "jaxaccel.config.model_config(name=..., ...)")
        super().__init__(**data)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        names = typing.get_args(cls.model_fields["name"].annotation)
        if typing.get_origin(cls.model_fields["name"].annotation) is typing.Literal and len(names) == 1:
            if names[0] in REGISTRY and REGISTRY[names[0]].__qualname__ != cls.__qualname__:
                raise TypeError(f"model name {names[0]!r} is declared twice: {REGISTRY[names[0]]} and {cls}")
            REGISTRY[names[0]] = cls

    def build(self, num_classes: int, precision: Any = None, quant: Any = None) -> Any:
        """The Flax module (precision: a PrecisionConfig or None for fp32; quant: a QAT QuantConfig or None)."""
        raise NotImplementedError(f"{type(self).__name__}.build")

    def input_problem(self, dtype: str, shape: tuple[int, ...], data: str = "the dataset") -> str | None:
        """Why this model cannot take the inputs of the dataset ``data`` (``dtype``, per-example
        ``shape``), with what to do; None when it can."""
        want_dtype, want_rank, what = self.inputs
        if dtype == want_dtype and len(shape) == want_rank:
            return None
        return (f"model.name={self.name} takes {want_dtype} {what}, but {data} gives {dtype} {list(shape)} per "
                "example: choose a model for this data")

    def unit_norms(self) -> dict[str, str]:
        """Layer name -> the name of the normalization layer (its ``scale``/``bias`` per channel) that
        normalizes that layer's output units, for the layers that have one. Channel pruning reads it:
        a pruned unit's normalization scale and bias are masked with it (so the unit outputs exactly
        0 and shrinking can remove it), and ``sparsity.importance=norm_scale`` ranks units by |scale|
        (network slimming). Empty: no layer is followed by a per-channel normalization."""
        return {}

"""Export of a trained model, and :func:`load` to use it without the training code.

An export directory holds ``model.json`` (format, model config, number of classes, input shape)
and ``params.npz`` (the parameters, keyed by their '/'-joined paths). ``load(path)`` returns an
:class:`ExportedModel`: ``.params`` is a nested dict of NumPy arrays and calling it on uint8 images
``[N, H, W, C]`` returns logits ``[N, num_classes]``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["save", "load", "ExportedModel", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def _flatten(params: Any) -> dict[str, np.ndarray]:
    from flax import traverse_util
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def save(directory: str | Path, params: Any, model_config: dict[str, Any], num_classes: int,
         image_shape: tuple[int, ...]) -> int:
    """Write the export; returns its size in bytes (the parameter arrays as stored)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = _flatten(params)
    tmp = directory / "params.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, directory / "params.npz")
    (directory / "model.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "form": "dense", "model": model_config,
        "num_classes": num_classes, "image_shape": list(image_shape)}, indent=2))
    return sum(a.nbytes for a in arrays.values())


class ExportedModel:
    """A loaded export: ``.params`` (NumPy pytree), ``.meta``, and ``__call__(images) -> logits``."""

    def __init__(self, params: dict[str, Any], meta: dict[str, Any]):
        import jax

        from jaxaccel.config import ModelConfig
        from jaxaccel.models import build_model

        self.params = params
        self.meta = meta
        module = build_model(ModelConfig.model_validate(meta["model"]), meta["num_classes"])
        self._apply = jax.jit(lambda p, x: module.apply({"params": p}, x))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != tuple(self.meta["image_shape"]):
            raise ValueError(f"expected uint8 images of shape [N, {', '.join(map(str, self.meta['image_shape']))}], "
                             f"got {images.dtype} {images.shape}")
        return np.asarray(self._apply(self.params, images))


def load(path: str | Path) -> ExportedModel:
    """Load an export directory written by :func:`save` (or a run's workdir, which holds export/)."""
    from flax import traverse_util

    path = Path(path)
    if not (path / "model.json").exists() and (path / "export" / "model.json").exists():
        path = path / "export"
    if not (path / "model.json").exists():
        raise FileNotFoundError(f"no export at {path}: expected {path / 'model.json'}")
    meta = json.loads((path / "model.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"export {path} has format_version {meta.get('format_version')}; "
                         f"this jaxaccel reads {FORMAT_VERSION}")
    with np.load(path / "params.npz") as npz:
        params = traverse_util.unflatten_dict({k: npz[k] for k in npz.files}, sep="/")
    return ExportedModel(params, meta)

"""Export of a trained model, and :func:`load` to use it without the training code.

An export directory holds:

``model.json``      format, form (``dense``, ``sparse``, ``int8`` or ``sparse+int8``), model,
                    precision and quantization configs, classes, input shape, and the description
                    of every stored tensor.
``params.npz``      the float32 parameters as trained, pruned weights as exact zeros
                    ("dense-with-zeros"), keyed by their '/'-joined paths.
``compressed.npz``  the compressed model: each kernel in its smallest exact form (dense, CSR or
                    packed N:M, see :mod:`jaxaccel.sparsity.export`), as int8 values plus float32
                    scales when the run quantizes. Its size is ``compressed_bytes``.

``state.npz``       the model state besides parameters (batch statistics), when the model has one.

``load(path)`` reads the compressed form. It returns an :class:`ExportedModel`: ``.params`` is a
nested dict of NumPy arrays (int8 kernels for a quantized export, ``.scales`` beside them) and
calling it on inputs of the model's dtype and shape (``input_dtype`` and ``image_shape`` in
model.json: uint8 images ``[N, H, W, C]``, int32 tokens ``[N, L]`` or int16 audio ``[N, T]``)
returns logits ``[N, num_classes]``, computed with int32 accumulation for int8 exports.

Loading never imports code a file names. An export of a model this project does not define
(``model.name=package.module:Attribute``, or an object given to ``jaxaccel.train``) is served with
the model the caller passes (``load(path, model=MyCNN)``); it is rebuilt from its import path only
when the caller opts in with ``trust_import=True`` (as ``trust_remote_code``). ``load_params(path)``
returns the float parameters of any export without building a model.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from jaxaccel import storage

__all__ = ["save", "load", "load_params", "load_variables", "ExportedModel", "FORMAT_VERSION", "compress_params",
           "flatten_params", "bind_state"]

FORMAT_VERSION = 2
_SCALE = "scale:"  # key prefix of the int8 scales in compressed.npz


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """``{"Dense_0/kernel": array, ...}``: the flat NumPy form every stored file uses."""
    from flax import traverse_util
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    from flax import traverse_util
    return traverse_util.unflatten_dict(flat, sep="/")


def compress_params(params: Any, quant: dict[str, Any] | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The compressed arrays and their description: each kernel in its smallest exact form, as int8
    plus float32 scales when ``quant`` (a QuantConfig dict) asks for quantization."""
    from jaxaccel.sparsity import export as sparse_export

    flat, scales = flatten_params(params), {}
    if quant and quant["mode"] != "none":
        from jaxaccel.config import QuantConfig
        from jaxaccel.precision import quantize_params
        qparams, qscales = quantize_params(params, QuantConfig.model_validate(quant))
        flat, scales = flatten_params(qparams), flatten_params(qscales)
    arrays, meta = sparse_export.compress(flat)
    arrays.update({_SCALE + k: np.asarray(v, np.float32) for k, v in scales.items()})
    return arrays, meta


def _form(meta: dict[str, Any], quantized: bool) -> str:
    sparse = any(t["form"] != "dense" for t in meta["tensors"].values())
    return "+".join(f for f, on in (("sparse", sparse), ("int8", quantized)) if on) or "dense"


def _check_savable(tree: Any, what: str) -> None:
    """Refuse a tree :func:`load` could not give back: keys that are not strings or hold '/'
    (stored paths are '/'-joined), leaves that are not numeric arrays."""
    def walk(node, path):
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str) or "/" in key or not key:
                    raise ValueError(f"cannot export {what}: key {key!r} at {'/'.join(path) or 'the top'} is not a "
                                     "non-empty string without '/' (load could not give the tree back)")
                walk(child, (*path, key))
            return
        if not hasattr(node, "shape") or not np.issubdtype(np.asarray(node).dtype, np.number):
            raise ValueError(f"cannot export {what}: {'/'.join(path)} is {type(node).__name__}, not a numeric array")
    if hasattr(tree, "items") and not isinstance(tree, dict):
        tree = dict(tree)
    walk(tree, ())


def _check_model(model: dict[str, Any]) -> None:
    from jaxaccel.config import ConfigError, from_saved
    try:
        json.dumps(model)
        from_saved("model", model)
    except (TypeError, ValueError, ConfigError) as e:
        raise ValueError(f"cannot export model={model!r}: load could not read it back ({e})") from None


def save(directory: str | storage.StoragePath, params: Any, *, model: dict[str, Any], num_classes: int,
         image_shape: tuple[int, ...], input_dtype: str = "uint8", precision: dict[str, Any] | None = None,
         quant: dict[str, Any] | None = None, model_state: dict[str, Any] | None = None) -> tuple[int, str]:
    """Write the export; returns (``compressed_bytes``, the size of the compressed arrays; the form).
    ``model_state``: the model's variables besides params (batch statistics), if any. Raises
    ValueError, writing nothing, for what :func:`load` could not read back."""
    from jaxaccel.sparsity import export as sparse_export

    _check_model(model)
    _check_savable(params, "params")
    if model_state:
        _check_savable(model_state, "model_state")
    directory = storage.path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays, tensors = compress_params(params, quant)
    quantized = bool(quant and quant["mode"] != "none")
    storage.write_npz(directory / "params.npz", flatten_params(params))
    storage.write_npz(directory / "compressed.npz", arrays)
    if model_state:
        storage.write_npz(directory / "state.npz", flatten_params(model_state))
    form = _form(tensors, quantized)
    (directory / "model.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "form": form, "model": model,
        "precision": precision, "quant": quant if quantized else None, "num_classes": num_classes,
        "image_shape": list(image_shape), "input_dtype": input_dtype, "tensors": tensors,
        "model_state": bool(model_state)}, indent=1))
    return sparse_export.nbytes(arrays), form


class _StateBound:
    """A built-in flax module whose ``apply``, given params alone, uses ``model_state`` with them."""

    def __init__(self, module: Any, model_state: dict[str, Any]):
        self.module, self.model_state = module, model_state

    def apply(self, variables: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return self.module.apply({**self.model_state, **variables}, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


def bind_state(module: Any, model_state: dict[str, Any] | None) -> Any:
    """``module`` applying with ``model_state`` (batch statistics) where it is given params alone
    (inference, the compression report): a user model's ``bind_state``, or a thin wrapper."""
    from jaxaccel.models import UserModel
    if isinstance(module, UserModel):
        return module.bind_state(model_state or {})
    return _StateBound(module, dict(model_state)) if model_state else module


class ExportedModel:
    """A loaded export: ``.params`` (NumPy pytree), ``.scales`` (int8 exports), ``.meta``,
    and ``__call__(images) -> logits``."""

    def __init__(self, params: dict[str, Any], meta: dict[str, Any], scales: dict[str, Any] | None = None,
                 arrays: dict[str, np.ndarray] | None = None, *, model_state: dict[str, Any] | None = None,
                 module: Any = None):
        import jax

        from jaxaccel import precision as prec
        from jaxaccel.config import from_saved
        from jaxaccel.models import UserModel, build_model

        self.params, self.scales, self.meta, self._arrays = params, scales, meta, arrays
        self.model_state = model_state or {}
        precision = from_saved("precision", meta["precision"]) if meta.get("precision") else None
        if module is None:
            module = build_model(from_saved("model", meta["model"]), meta["num_classes"], precision)
        module = bind_state(module, self.model_state)
        self.module = module
        if scales and isinstance(module, UserModel) and module.kind == "nnx":
            # An NNX layer holds its op as an attribute, out of reach of flax's method interception
            # (int8_apply): the int8 weights run dequantized through the QAT forward the model was
            # evaluated with (activations fake-quantized by the op interception), so the export
            # predicts what the trained model predicts; the integer arithmetic is emulated in float.
            qat = module.with_quant(from_saved("quant", meta["quant"]))
            self._apply = jax.jit(lambda p, s, x: qat.apply({"params": prec.dequantize_params(p, s)}, x))
        elif scales:
            quant = from_saved("quant", meta["quant"])
            self._apply = jax.jit(lambda p, s, x: prec.int8_apply(module, p, s, x, cfg=quant))
        else:
            self._apply = jax.jit(lambda p, s, x: module.apply({"params": p}, x))

    @property
    def form(self) -> str:
        return self.meta["form"]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        dtype = self.meta.get("input_dtype", "uint8")  # exports from before text and audio: images
        if images.dtype != np.dtype(dtype) or images.shape[1:] != tuple(self.meta["image_shape"]):
            what = "images" if dtype == "uint8" else "inputs"
            raise ValueError(f"expected {dtype} {what} of shape [N, {', '.join(map(str, self.meta['image_shape']))}], "
                             f"got {images.dtype} {images.shape}")
        return np.asarray(self._apply(self.params, self.scales, images))

    def sparse_mlp(self, route: str = "scipy"):
        """The fast sparse CPU inference path (MLP, float exports): see jaxaccel.sparsity.inference."""
        from jaxaccel.sparsity.inference import SparseMLP
        if self.scales or self.meta["model"]["name"] != "mlp":
            raise ValueError("the sparse inference path serves float MLP exports")
        if self.meta["model"].get("ranks"):  # its Dense_i/kernel list would miss the U/V layers
            raise ValueError("the sparse inference path serves unfactorized MLPs: call the model itself")
        return SparseMLP(self._arrays, self.meta["tensors"], route=route)


def _read(path: str | storage.StoragePath) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, Any] | None,
                                                      dict[str, Any]]:
    """``(directory, model.json, params, scales or None, arrays)`` of the export at ``path``."""
    from jaxaccel.sparsity import export as sparse_export

    path = storage.path(path)
    if not (path / "model.json").exists() and (path / "export" / "model.json").exists():
        path = path / "export"
    if not (path / "model.json").exists():
        raise FileNotFoundError(f"no export at {path}: expected {path / 'model.json'}")
    meta = json.loads((path / "model.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"export {path} has format_version {meta.get('format_version')}; "
                         f"this jaxaccel reads {FORMAT_VERSION}: export it again with this version")
    arrays = storage.read_npz(path / "compressed.npz")
    scales = {k[len(_SCALE):]: v for k, v in arrays.items() if k.startswith(_SCALE)}
    params = sparse_export.decompress({k: v for k, v in arrays.items() if not k.startswith(_SCALE)},
                                      meta["tensors"])
    return path, meta, _unflatten(params), _unflatten(scales) if scales else None, arrays


def _model_state(path: Any, meta: dict[str, Any]) -> dict[str, Any]:
    if not meta.get("model_state"):
        return {}
    return _unflatten(storage.read_npz(path / "state.npz"))


def load_params(path: str | storage.StoragePath) -> dict[str, Any]:
    """The float32 parameters of any export (nested dict of NumPy arrays, pruned weights as exact
    zeros, int8 kernels dequantized), decompressed from its stored form; builds no model and
    imports nothing."""
    return load_variables(path)[0]


def load_variables(path: str | storage.StoragePath) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`load_params`'s parameters and the model's other variables (``{"batch_stats": ...}``
    for a model with batch norm, else empty), as NumPy arrays."""
    from jaxaccel import precision as prec

    directory, meta, params, scales, _ = _read(path)
    if scales:
        params = prec.dequantize_params(params, scales)
    return _unflatten(flatten_params(params)), _model_state(directory, meta)


def _user_module(path: Any, meta: dict[str, Any], model: Any, trust_import: bool) -> Any:
    """The model serving an export of a model this project does not define (None for ours,
    unless the caller passes one)."""
    import flax.linen as nn
    from flax import nnx

    from jaxaccel.config import from_saved
    from jaxaccel.models import IMPORT_PATH, UserModel, registry_key

    saved = meta["model"]
    # The run's precision policy, intercepted in the model's ops as in training (same predictions).
    precision = from_saved("precision", meta["precision"]) if meta.get("precision") else None
    if model is not None:
        instance = isinstance(model, (nn.Module, nnx.Module))
        return UserModel(model, meta["num_classes"], kwargs=None if instance else saved.get("kwargs"),
                         conv="xla", precision=precision, what=f"model= given to load({str(path)!r})")
    if registry_key(saved["name"]) != IMPORT_PATH:
        return None
    if not trust_import or saved.get("source") == "object":
        how = ("or trust_import=True to import it (this runs that module's code)"
               if saved.get("source") != "object" else "(it was given to jaxaccel.train as an object)")
        raise ValueError(f"export {path} holds model {saved['name']}, which jaxaccel does not define: pass the "
                         f"model to serve it with, load({str(path)!r}, model=...), {how}; "
                         "jaxaccel.export.load_params(path) returns its parameters alone")
    return from_saved("model", {**saved, "conv": "xla"}).build(meta["num_classes"], precision)


def load(path: str | storage.StoragePath, model: Any = None, *, trust_import: bool = False) -> ExportedModel:
    """Load an export directory written by :func:`save` (or a run's workdir, which holds export/).

    ``model``: the linen or NNX model (class, instance or factory) to serve it with, for an export
    of your own model (or to run ours differently). An export naming a model by import path is
    rebuilt by importing it only with ``trust_import=True``; by default nothing is imported.
    """
    path, meta, params, scales, arrays = _read(path)
    module = _user_module(path, meta, model, trust_import)
    return ExportedModel(params, meta, scales, arrays, model_state=_model_state(path, meta), module=module)

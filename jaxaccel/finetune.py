"""Starting a run from another model's parameters: ``init.from`` and ``init.include``.

``init.from`` names a run directory, a checkpoint directory or an export. The parameters whose
'/'-joined path matches an ``init.include`` regex and whose shape matches this model are copied
from it; every other parameter keeps its fresh initialisation (a head for another number of
classes, say). The model's other variables (batch norm's running statistics) come with the
parameters of their layer: a layer loaded is loaded whole, else its statistics start fresh too.
``init.freeze`` (see :func:`jaxaccel.optim.freeze`) then keeps chosen ones fixed.

``init.pretrain`` (train another run first, then start from it) is orchestrated above single runs,
in :mod:`jaxaccel.pipeline`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxaccel import export as export_lib
from jaxaccel import paths
from jaxaccel import storage
from jaxaccel.config import ConfigError

__all__ = ["load_init_variables"]


def _source_variables(path: str) -> tuple[Any, Any]:
    """The parameter tree and model state (batch statistics, or ``{}``) stored at ``path``: an export
    (its float parameters: no model is built, nothing it names is imported), or the latest
    checkpoint of a run."""
    src = storage.path(path)
    if (src / "model.json").exists() or (src / "export" / "model.json").exists():
        return export_lib.load_variables(src)
    if not src.exists():
        raise ConfigError(f"init.from={path}: no such file or directory")
    ckpt_dir = src / "checkpoints" if (src / "checkpoints").exists() else src
    with ocp.CheckpointManager(ckpt_dir if storage.is_url(ckpt_dir) else ckpt_dir.absolute()) as mngr:
        if mngr.latest_step() is None:
            raise ConfigError(f"init.from={path}: no checkpoint or export found there")
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["params"], restored["state"].get("model_state") or {}


def _layer(name: str) -> str:
    """The layer a variable belongs to: its path without the variable's own name."""
    return name.rpartition("/")[0]


def _shape(x: Any) -> str:
    return "x".join(map(str, x.shape)) or "scalar"


def load_init_variables(path: str, include: list[str], params: Any, model_state: Any,
                        message: Callable[[str], None]) -> tuple[Any, Any]:
    """``params`` with every parameter that matches an ``include`` regex and has the same path and
    shape in the model at ``path`` replaced by the stored one, and ``model_state`` (``{collection:
    tree}``) with the stored variables of the layers loaded (same path and shape); ``message``
    says what starts fresh, and why."""
    src_params, src_state = _source_variables(path)
    src_flat, src_state_flat = dict(paths.named_leaves(src_params)), dict(paths.named_leaves(src_state))
    paths.require_matches(params, include, "init.include", ConfigError)
    kept, fresh = [], {}  # fresh: reason -> names

    def load(key, value, source, skipped):
        if skipped:
            reason = skipped
        elif key not in source and f"{_layer(key)}/U/kernel" in source:
            reason = "factorized there: give model.ranks as the source's summary.json has them"
        elif key not in source:
            reason = "not in the source"
        elif tuple(source[key].shape) != tuple(value.shape):
            reason = f"{_shape(source[key])} there, {_shape(value)} here"
        else:
            kept.append(key)
            return jnp.asarray(source[key], value.dtype)
        fresh.setdefault(reason, []).append(key)
        return value

    params = paths.map_with_names(
        lambda k, v: load(k, v, src_flat, None if paths.matches(k, include) else "not in init.include"), params)
    if not kept:
        raise ConfigError(f"init.from={path}: no parameter matches init.include={include} with the same "
                          f"path and shape in this model ({', '.join(src_flat)} there)")
    layers = {_layer(key) for key in kept}
    # A state path is "<collection>/<layer>/<name>": loaded with its layer's parameters.
    model_state = paths.map_with_names(
        lambda k, v: load(k, v, src_state_flat, None if _layer(k.partition("/")[2]) in layers
                          else "its layer's parameters are not loaded"), model_state)
    if fresh:
        message(f"init.from: {len(kept)} tensors loaded; re-initialized: "
                + "; ".join(f"{', '.join(names)} ({reason})" for reason, names in fresh.items()))
    return params, model_state

"""Starting a run from another model's parameters: ``init.from`` and ``init.include``.

``init.from`` names a run directory, a checkpoint directory or an export. The parameters whose
'/'-joined path matches an ``init.include`` regex and whose shape matches this model are copied
from it; every other parameter keeps its fresh initialisation (a head for another number of
classes, say). ``init.freeze`` (see :func:`jaxaccel.optim.freeze`) then keeps chosen ones fixed.

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

__all__ = ["load_init_params"]


def _source_params(path: str) -> Any:
    """The parameter tree stored at ``path``: an export (its float parameters: no model is built,
    nothing it names is imported), or the latest checkpoint of a run."""
    src = storage.path(path)
    if (src / "model.json").exists() or (src / "export" / "model.json").exists():
        return export_lib.load_params(src)
    if not src.exists():
        raise ConfigError(f"init.from={path}: no such file or directory")
    ckpt_dir = src / "checkpoints" if (src / "checkpoints").exists() else src
    with ocp.CheckpointManager(ckpt_dir if storage.is_url(ckpt_dir) else ckpt_dir.absolute()) as mngr:
        if mngr.latest_step() is None:
            raise ConfigError(f"init.from={path}: no checkpoint or export found there")
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["params"]


def load_init_params(path: str, include: list[str], target: Any, message: Callable[[str], None]) -> Any:
    """``target`` with every parameter that matches an ``include`` regex and has the same path and
    shape in the model at ``path`` replaced by the stored one; ``message`` reports the rest."""
    src_flat = dict(paths.named_leaves(_source_params(path)))
    paths.require_matches(target, include, "init.include", ConfigError)
    kept, fresh = [], []

    def load(key, value):
        if paths.matches(key, include) and key in src_flat and tuple(src_flat[key].shape) == tuple(value.shape):
            kept.append(key)
            return jnp.asarray(src_flat[key], value.dtype)
        fresh.append(key)
        return value

    out = paths.map_with_names(load, target)
    if not kept:
        raise ConfigError(f"init.from={path}: no parameter matches init.include={include} with the same "
                          f"path and shape in this model ({', '.join(src_flat)} there)")
    if fresh:
        message(f"init.from: {len(kept)} tensors loaded; re-initialized (not in init.include, or path or "
                f"shape differs): {', '.join(fresh)}")
    return out

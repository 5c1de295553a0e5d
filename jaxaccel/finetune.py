"""Starting a run from another model: ``init.from``, ``init.include`` and ``init.pretrain``.

``init.from`` names a run directory, a checkpoint directory or an export. The parameters whose
'/'-joined path matches an ``init.include`` regex and whose shape matches this model are copied
from it; every other parameter keeps its fresh initialisation (a head for another number of
classes, say). ``init.freeze`` (see :func:`jaxaccel.optim.freeze`) then keeps chosen ones fixed.

``init.pretrain`` makes an experiment self-contained: with ``init.from`` unset, the experiment it
names is trained first into ``<workdir>/pretrained`` (reused when its summary is already there)
and the run starts from it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from jaxaccel import paths
from jaxaccel.config import Config, ConfigError

__all__ = ["load_init_params", "pretrain"]


def _source_params(path: str) -> Any:
    """The parameter tree stored at ``path``: an export, or the latest checkpoint of a run."""
    from jaxaccel import export as export_lib
    src = Path(path)
    if (src / "model.json").exists() or (src / "export" / "model.json").exists():
        return export_lib.load(src).params
    if not src.exists():
        raise ConfigError(f"init.from={path}: no such file or directory")
    import orbax.checkpoint as ocp
    ckpt_dir = src / "checkpoints" if (src / "checkpoints").exists() else src
    with ocp.CheckpointManager(ckpt_dir.absolute()) as mngr:
        if mngr.latest_step() is None:
            raise ConfigError(f"init.from={path}: no checkpoint or export found there")
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]["params"]


def load_init_params(path: str, include: list[str], target: Any, message: Callable[[str], None]) -> Any:
    """``target`` with every parameter that matches an ``include`` regex and has the same path and
    shape in the model at ``path`` replaced by the stored one; ``message`` reports the rest."""
    import jax.numpy as jnp
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


def pretrain(cfg: Config, workdir: Path, message: Callable[[str], None]) -> Config:
    """``cfg`` with ``init.from`` set to the run ``init.pretrain`` describes, trained first into
    ``workdir/pretrained`` unless its summary is already there. The pretraining run shares the
    seed, data directories, parallel and distributed settings of ``cfg``."""
    from jaxaccel import experiments
    from jaxaccel.trainer import train
    name, *overrides = cfg.init.pretrain.split()
    target = workdir / "pretrained"
    try:
        sub = experiments.get(name).model_copy(update={
            "seed": cfg.seed, "parallel": cfg.parallel, "distributed": cfg.distributed, "workdir": str(target)})
        sub.data = sub.data.model_copy(update={"dir": cfg.data.dir, "cache_dir": cfg.data.cache_dir})
        sub = experiments.override(sub, overrides)
    except ConfigError as e:
        raise ConfigError(f"init.pretrain={cfg.init.pretrain!r}: {e}") from None
    # A run that resumes from its own checkpoint does not read init.from: nothing to pretrain.
    resuming = any((workdir / "checkpoints").glob("[0-9]*"))
    if not resuming and not (target / "summary.json").exists():
        message(f"init.from is unset: training `{cfg.init.pretrain}` into {target} first (init.pretrain)")
        train(sub, [f"exp={name}", *overrides])
    return cfg.model_copy(update={"init": cfg.init.model_copy(update={"from_": str(target)})})

"""Runs made of runs: ``train(cfg)`` trains the run ``init.pretrain`` names first, when asked.

``init.pretrain`` makes an experiment self-contained: with ``init.from`` unset, the experiment it
names is trained first into ``<workdir>/pretrained`` (reused when its summary is already there)
and the run starts from it. Everything else is one run of :func:`jaxaccel.trainer.train`.
"""
from __future__ import annotations

from typing import Any, Callable

from jaxaccel import experiments
from jaxaccel import trainer
from jaxaccel.config import Config, ConfigError
from jaxaccel.setup import workdir_of
from jaxaccel.storage import StoragePath

__all__ = ["train", "with_pretraining", "with_model"]


def with_pretraining(cfg: Config, workdir: StoragePath, message: Callable[[str], None]) -> Config:
    """``cfg`` with ``init.from`` set to the run ``init.pretrain`` describes, trained first into
    ``workdir/pretrained`` unless its summary is already there. The pretraining run shares the
    seed, data directories, parallel and distributed settings of ``cfg``."""
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
        trainer.train(sub, [f"exp={name}", *overrides])
    return cfg.model_copy(update={"init": cfg.init.model_copy(update={"from_": str(target)})})


def with_model(cfg: Config, model: Any) -> Config:
    """``cfg`` training ``model`` (a linen module class, instance or factory, or an NNX module class,
    instance or factory) instead of its ``model`` section's. config.json and model.json name it by
    its qualified name; ``model.kwargs`` and ``model.conv`` of an import-path section carry over."""
    from jaxaccel.models import ImportedModelConfig, object_config
    section = cfg.model if isinstance(cfg.model, ImportedModelConfig) else None
    chosen = object_config(model, section.kwargs if section else None, section.conv if section else "auto")
    return cfg.model_copy(update={"model": chosen})


def train(cfg: Config, overrides: list[str] | None = None, *, model: Any = None) -> dict[str, Any]:
    """Train the run ``cfg`` describes (after its ``init.pretrain`` run, if any); returns the summary.

    ``overrides`` (the command-line ``key=value`` strings, if any) are recorded in config.json.
    ``model``: your own model instead of ``cfg.model`` (see :func:`with_model`).
    A run whose workdir already has checkpoints resumes from the latest one.
    """
    if model is not None:
        cfg = with_model(cfg, model)
    if cfg.init.pretrain and not cfg.init.from_:
        cfg = with_pretraining(cfg, workdir_of(cfg),
                               lambda text: print(text, flush=True))
    return trainer.train(cfg, overrides)

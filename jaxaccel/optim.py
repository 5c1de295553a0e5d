"""Optimizers and learning-rate schedules from the config, all plain optax."""
from __future__ import annotations

import optax

from jaxaccel.config import OptimConfig

__all__ = ["make_schedule", "make_optimizer"]


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule over ``total_steps`` steps, peaking at ``cfg.learning_rate``."""
    lr = cfg.learning_rate
    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=total_steps)
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, cfg.warmup_steps, max(total_steps, cfg.warmup_steps + 1))
    if cfg.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, lr)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")  # unreachable: the schema restricts it


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer the config names, with its schedule, weight decay and gradient clipping."""
    lr = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    else:
        opt = {
            "sgd": lambda: optax.sgd(lr),
            "momentum": lambda: optax.sgd(lr, momentum=cfg.momentum),
            "nesterov": lambda: optax.sgd(lr, momentum=cfg.momentum, nesterov=True),
            "adam": lambda: optax.adam(lr, b1=cfg.b1, b2=cfg.b2),
        }[cfg.name]()
        if cfg.weight_decay:
            # Coupled L2: the decay joins the gradient before the optimizer's own scaling.
            opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
    if cfg.grad_clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
    return opt

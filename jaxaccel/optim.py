"""Optimizers and learning-rate schedules from the config, all plain optax, and the one place
where a run's whole optimizer chain is assembled (:func:`build_optimizer`)."""
from __future__ import annotations

import jax
import optax

from jaxaccel import paths
from jaxaccel import precision as prec
from jaxaccel import sparsity
from jaxaccel.config import Config, ConfigError, OptimConfig

__all__ = ["make_schedule", "make_optimizer", "freeze", "build_optimizer"]


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule over ``total_steps`` steps, peaking at ``cfg.learning_rate``
    (``cfg.warmup`` resolved to steps: :func:`jaxaccel.durations.resolve`)."""
    lr = cfg.learning_rate
    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=total_steps)
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, cfg.warmup, max(total_steps, cfg.warmup + 1))
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


def freeze(tx: optax.GradientTransformation, patterns: list[str] | tuple[str, ...]) -> optax.GradientTransformation:
    """``tx`` for the parameters whose name (:mod:`jaxaccel.paths`) matches none of ``patterns``;
    zero updates for the rest, which training therefore leaves bit-identical.

    Built with ``optax.multi_transform``: ``tx`` sees only the trainable parameters (so gradient
    clipping, weight decay and moments ignore the frozen ones), and the frozen ones get
    ``optax.set_to_zero`` and no optimizer state. A pattern that matches nothing is an error.
    """
    if not patterns:
        return tx

    def labels(params):
        paths.require_matches(params, patterns, "init.freeze", ConfigError)
        frozen = paths.select(params, patterns)
        if all(jax.tree.leaves(frozen)):
            raise ConfigError(f"init.freeze={list(patterns)} freezes every parameter: nothing would train")
        return jax.tree.map(lambda f: "frozen" if f else "train", frozen)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def build_optimizer(cfg: Config, total_steps: int, *, assume_finite: bool = False,
                    refresh: bool = True) -> optax.GradientTransformation:
    """The run's optimizer, wrapped in this order, innermost first:

    1. the optimizer ``cfg.optim`` names (schedule, weight decay, clipping);
    2. sparsity masking (nothing may rescale updates after the masks are applied);
    3. freezing (a frozen weight is not even pruned);
    4. loss scaling and the non-finite guard (they skip whole steps, so they see everything).

    ``assume_finite`` builds the guard without its per-step test (the rollback guard's fast half);
    ``refresh=False`` builds the sparsity transform without its mask-update branch (for step groups
    in which no mask update is due). Both keep the same state structure as the default.
    """
    inner = make_optimizer(cfg.optim, total_steps)
    masked = sparsity.make_sparsity(cfg.sparsity, inner, total_steps, seed=cfg.seed, refresh=refresh,
                                    norms=cfg.model.unit_norms())
    return prec.with_precision(freeze(masked, cfg.init.freeze), cfg.precision, assume_finite=assume_finite)

"""Low-rank (spectral) factorization: a kernel W (m x n) replaced by U (m x r) @ V (r x n).

The ``lowrank`` config section (:class:`jaxaccel.config.LowRankConfig`) picks kernels by regexes
over parameter names (``include``/``exclude``, e.g. ``Dense_0/kernel``, ``Conv_1/kernel``; by
default the Dense kernels) and their rank: ``rank`` (one integer, or ``{regex: rank}``) or
``energy``, the smallest r whose singular values keep that fraction of ``sum(s_i^2)`` (the squared
Frobenius norm: ||W - W_r||_F^2 / ||W||_F^2 = 1 - energy at most). Then either

``lowrank.at``          a duration: the trained kernels are factored there by truncated SVD,
                        W ~ U_r S_r V_r^T, with the singular values split evenly,
                        U = U_r sqrt(S_r), V = sqrt(S_r) V_r^T (the best rank-r approximation in
                        the Frobenius and spectral norms, Eckart-Young; balanced factors keep the
                        gradients of U and V on the same scale); the model is rebuilt with
                        factorized layers and training continues (:class:`LowRankSurgeon`,
                        run by :mod:`jaxaccel.surgery`);
``lowrank.from_start``  the factors are the model from initialisation (``model.ranks`` set when
                        the config is built).

A factorized layer costs r (m + n) multiply-adds per example (per output position for a conv)
instead of m n, so a rank r >= mn / (m + n) saves nothing: such a layer is left dense, with a
:class:`LowRankWarning` (:func:`jaxaccel.models.layers.saves_flops`). A conv kernel (kh, kw, cin,
cout) factors as the matrix (kh*kw*cin, cout): U (kh, kw, cin, r) is a conv with r output channels
and the layer's window, V (1, 1, r, cout) a 1x1 conv (:class:`jaxaccel.models.layers.FactorizedConv`).
``model.ranks`` of ``mlp`` (Dense layers), ``cnn`` and ``small_cnn`` (convolutions and Dense
layers: in the CNNs the dense layers hold most parameters, the convolutions most FLOPs) says which
layers are factored.

**The optimizer state is re-initialised** for the new parameters (``tx.init``): moments of W say
nothing about U and V. The learning-rate schedule's step count is carried over (the schedule
continues where it was instead of restarting); so are the train step and the model state. A
dynamic loss scale restarts from ``precision.loss_scale_init``.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxaccel import paths
from jaxaccel.models.layers import LowRankWarning, saves_flops
from jaxaccel.schema import ConfigError
from jaxaccel.surgery import Change, param_count

if TYPE_CHECKING:
    from jaxaccel import step as step_lib  # annotations only: the config imports this module
    from jaxaccel.config import Config, LowRankConfig, ModelConfig

__all__ = ["factor", "energy_rank", "saves_flops", "LowRankWarning", "factor_params", "product_form",
           "factorize", "LowRankSurgeon", "surgeon", "check_config", "from_start_model", "param_count"]


# ---------------------------------------------------------------------------------------------
# The linear algebra.

def _as_matrix(kernel: Any) -> np.ndarray:
    """The kernel as the (fan_in, fan_out) matrix it multiplies (a conv's (kh*kw*cin, cout)), float64."""
    kernel = np.asarray(kernel, np.float64)
    return kernel.reshape(-1, kernel.shape[-1])


def factor(kernel: Any, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(u, v)`` with ``u.reshape(-1, rank) @ v.reshape(rank, -1)`` the best rank-``rank``
    approximation of the kernel (as its matrix), singular values split evenly:
    ``u = U_r sqrt(S_r)`` shaped ``kernel.shape[:-1] + (rank,)``, ``v = sqrt(S_r) V_r^T`` shaped
    (rank, n), or (1, 1, rank, n) for a conv kernel: the factors of a conv are the kernels of a
    conv with ``rank`` outputs and of a 1x1 conv. Computed in float64, returned in the kernel's dtype."""
    dtype, shape = np.asarray(kernel).dtype, np.shape(kernel)
    w = _as_matrix(kernel)
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank {rank} is outside [1, {min(w.shape)}] for a {w.shape[0]} x {w.shape[1]} kernel")
    left, s, right = np.linalg.svd(w, full_matrices=False)
    root = np.sqrt(s[:rank])
    u = (left[:, :rank] * root).reshape(*shape[:-1], rank)
    v = (root[:, None] * right[:rank]).reshape(*(1,) * (len(shape) - 2), rank, shape[-1])
    return u.astype(dtype), v.astype(dtype)


def energy_rank(singular_values: Any, energy: float) -> int:
    """The smallest r whose first r singular values (in decreasing order) hold at least ``energy``
    of the sum of all squared singular values (1 for an all-zero kernel)."""
    squares = np.sort(np.asarray(singular_values, np.float64))[::-1] ** 2
    total = squares.sum()
    if total == 0.0:
        return 1
    kept = np.cumsum(squares) / total
    # A relative tolerance: energy=1.0 must not need more than every value because of rounding.
    return int(np.searchsorted(kept, energy - 1e-12) + 1)


# ---------------------------------------------------------------------------------------------
# Parameters and state.

def _selected(model: "ModelConfig", lowrank: "LowRankConfig") -> list[str]:
    """The kernel names of ``model`` the section selects, in the model's order."""
    return [n for n in model.kernel_names() if paths.matches(n, lowrank.include, lowrank.exclude)]


def _plan_layer(name: str, kernel: Any, lowrank: "LowRankConfig") -> tuple[int, float, np.ndarray]:
    """``(rank, energy kept, singular values)`` of one kernel."""
    s = np.linalg.svd(_as_matrix(kernel), compute_uv=False)
    given = lowrank.rank_of(name)
    rank = min(given if given is not None else energy_rank(s, lowrank.energy), len(s))
    return rank, float((s[:rank] ** 2).sum() / max((s ** 2).sum(), 1e-300)), s


def factor_params(params: Any, model: "ModelConfig",
                  lowrank: "LowRankConfig") -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
    """``(new_params, ranks, notes)``: the selected kernels of ``model`` (Dense or conv layers not
    factored yet) replaced by their factors (``<layer>/U/kernel``, ``<layer>/V/kernel``, shaped as
    :func:`factor` gives them; the bias moves to ``<layer>/V/bias``); ``ranks`` maps each factored
    layer to its rank, ``notes`` holds ``energy_kept`` per factored layer and ``left_dense`` (why)
    per layer factoring would not pay."""
    flat = {k: v for k, v in traverse_util.flatten_dict(dict(params), sep="/").items()}
    ranks, kept, left_dense = {}, {}, {}
    for name in _selected(model, lowrank):
        layer = name.removesuffix("/kernel")
        if layer in model.ranks or name not in flat:  # factored already (or left dense by the model)
            continue
        kernel = flat[name]
        m, n = int(np.prod(np.shape(kernel)[:-1])), np.shape(kernel)[-1]
        rank, energy, _ = _plan_layer(name, kernel, lowrank)
        if not saves_flops(m, n, rank):
            left_dense[layer] = f"rank {rank} would not save FLOPs ({m} x {n} needs rank < {m * n / (m + n):.1f})"
            warnings.warn(f"lowrank: {layer} left dense: {left_dense[layer]}", LowRankWarning, stacklevel=2)
            continue
        u, v = factor(kernel, rank)
        del flat[name]
        flat[f"{layer}/U/kernel"], flat[f"{layer}/V/kernel"] = jnp.asarray(u), jnp.asarray(v)
        if f"{layer}/bias" in flat:
            flat[f"{layer}/V/bias"] = flat.pop(f"{layer}/bias")
        ranks[layer], kept[layer] = rank, energy
    new = traverse_util.unflatten_dict(flat, sep="/")
    return new, ranks, {"energy_kept": kept, "left_dense": left_dense}


def product_form(params: Any) -> dict[str, Any]:
    """``params`` with every factorized layer (``U``/``V`` sub-layers) as the unfactorized layer of
    kernel ``U @ V`` (the factors as matrices, the product reshaped to U's window: a Dense kernel
    (m, n) or a conv kernel (kh, kw, cin, cout)) under the dense model's parameter names: the same
    function, for comparison and tests."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    out = {}
    for name, value in flat.items():
        layer, _, leaf = name.rpartition("/")
        if layer.endswith("/U"):
            base = layer.removesuffix("/U")
            v = flat[f"{base}/V/kernel"]
            matrix = jnp.reshape(value, (-1, value.shape[-1])) @ jnp.reshape(v, (-1, v.shape[-1]))
            out[f"{base}/kernel"] = jnp.reshape(matrix, (*value.shape[:-1], v.shape[-1]))
        elif layer.endswith("/V"):
            if leaf == "bias":
                out[f"{layer.removesuffix('/V')}/bias"] = value
        else:
            out[name] = value
    return traverse_util.unflatten_dict(out, sep="/")


def _keep_schedule_counts(old_opt_state: Any, new_opt_state: Any) -> Any:
    """``new_opt_state`` with the learning-rate schedules' step counts of ``old_opt_state``: both
    trees come from the same ``tx`` and differ only in their parameter-shaped parts."""
    def is_schedule(x: Any) -> bool:
        return isinstance(x, optax.ScaleByScheduleState)
    old = iter([x for x in jax.tree.leaves(old_opt_state, is_leaf=is_schedule) if is_schedule(x)])
    leaves, treedef = jax.tree.flatten(new_opt_state, is_leaf=is_schedule)
    return treedef.unflatten([next(old) if is_schedule(x) else x for x in leaves])


def factorize(state: step_lib.TrainState, model: "ModelConfig", tx: optax.GradientTransformation,
              lowrank: "LowRankConfig") -> Change:
    """The factorized model's config and state from a single-copy ``state`` of ``model``:
    parameters factored (:func:`factor_params`), the optimizer state re-initialised with
    ``tx.init`` (schedule counts carried over), step and model state kept."""
    params, ranks, notes = factor_params(state.params, model, lowrank)
    opt_state = _keep_schedule_counts(state.opt_state, tx.init(params))
    new_model = model.model_copy(update={"ranks": {**model.ranks, **ranks}})
    record = {"kind": "lowrank", "ranks": ranks, **notes,
              "param_count": {"before": param_count(state.params), "after": param_count(params)}}
    return Change(model=new_model, state=state.replace(params=params, opt_state=opt_state), record=record)


class LowRankSurgeon:
    """Factors the selected kernels once, after step ``lowrank.at`` (a resolved config's steps)."""
    name = "lowrank"

    def __init__(self, lowrank: "LowRankConfig"):
        if not isinstance(lowrank.at, int):
            raise ValueError(f"lowrank.at={lowrank.at!r}: resolve the config's durations first "
                             "(jaxaccel.durations.resolve)")
        self.lowrank, self.at = lowrank, lowrank.at

    def due(self, step: int) -> bool:
        return step == self.at

    def points(self, total_steps: int) -> list[int]:
        return [self.at] if 0 < self.at < total_steps else []

    def operate(self, step: int, state: step_lib.TrainState, model: "ModelConfig",
                tx: optax.GradientTransformation) -> Change | None:
        if not self.due(step):
            return None
        change = factorize(state, model, tx, self.lowrank)
        return change if change.record["ranks"] else None


def surgeon(cfg: "Config") -> LowRankSurgeon | None:
    """The run's low-rank surgeon (None unless ``lowrank.at`` is set)."""
    return LowRankSurgeon(cfg.lowrank) if cfg.lowrank.enabled and cfg.lowrank.at is not None else None


# ---------------------------------------------------------------------------------------------
# Config checks (called by jaxaccel.config.Config's validation).

def check_config(cfg: "Config") -> None:
    """ConfigError (exit 2) for a ``lowrank`` section the run cannot carry out."""
    lowrank = cfg.lowrank
    if not lowrank.enabled:
        return
    if "ranks" not in type(cfg.model).model_fields:
        raise ConfigError(f"lowrank factors the Dense and conv layers of model.name=mlp, cnn or small_cnn; model.name="
                          f"{cfg.model.name} has no factorized form: remove the lowrank section or use one of those")
    if cfg.sparsity.method != "none":
        raise ConfigError(f"lowrank with sparsity.method={cfg.sparsity.method}: the factorization re-initialises "
                          "the optimizer state that holds the pruning masks; use one of them")
    names = cfg.model.kernel_names()
    selected = _selected(cfg.model, lowrank)
    if not selected:
        raise ConfigError(f"lowrank.include={lowrank.include} / lowrank.exclude={lowrank.exclude} select none of "
                          f"the model's kernels ({', '.join(names)})")
    for pattern in lowrank.exclude:
        if not any(paths.matches(n, [pattern]) for n in names):
            raise ConfigError(f"lowrank.exclude: {pattern!r} matches none of the model's kernels "
                              f"({', '.join(names)}): a typo?")
    unranked = [n for n in selected if lowrank.energy is None and lowrank.rank_of(n) is None]
    if unranked:
        raise ConfigError(f"lowrank.rank={lowrank.rank} gives no rank to {', '.join(unranked)}: add a regex for "
                          "them or leave them out with lowrank.exclude")


def from_start_model(model: "ModelConfig", lowrank: "LowRankConfig") -> "ModelConfig":
    """``model`` with ``ranks`` for the selected layers (lowrank.from_start); unchanged when it has
    them already (a saved config read back). ConfigError when ``model.ranks`` says otherwise."""
    ranks = {n.removesuffix("/kernel"): lowrank.rank_of(n) for n in _selected(model, lowrank)}
    clash = {k: (model.ranks[k], r) for k, r in ranks.items() if k in model.ranks and model.ranks[k] != r}
    if clash:
        layer, (given, wanted) = next(iter(clash.items()))
        raise ConfigError(f"model.ranks gives {layer} rank {given}, lowrank.rank gives it {wanted} "
                          "(lowrank.from_start=true): set the rank in one place")
    if all(k in model.ranks for k in ranks):
        return model
    return model.model_copy(update={"ranks": {**model.ranks, **ranks}})

"""Channel shrinking: remove the units channel pruning has pruned, so the rest of the run trains a
narrower dense model (``sparsity.structure=channel`` with ``sparsity.shrink=true``; issue 19).

Masks keep the dense shapes, so a masked model costs what the dense one costs. Once every weight of
an output unit (a Dense column, a conv filter) is pruned, and its bias with it (the sparsity
transform masks the biases of shrinking runs: :func:`jaxaccel.sparsity.transform.unit_masks`), the
unit outputs exactly 0 and can be removed with everything that reads or stores it:

    layer l, kept units K      kernel[..., K], bias[K]
    next layer (reads l)       kernel[..., K, :]         (a Dense after a conv and a flatten: the rows
                                                          of the kept channels at every position, the
                                                          flatten being (h, w, c) row-major)
    optimizer state            every param-shaped leaf (Adam moments, masks, ...) cut as its param,
                               found as the mask reset finds them (:func:`~jaxaccel.sparsity.map_param_trees`)
    model state                leaves at a param's path with its shape, cut as the param

and the model config gets the new widths. The narrower model computes the same logits as the
masked wide one (tests/test_shrink.py). The surgeon shrinks after every scheduled mask update
(one_shot: once; polynomial/periodic: each time, the transformation pruning at each update the
fraction of the shrunk layer that leaves the schedule's share of the original units).
``sparsity.min_width`` units stay in every layer (pruned ones, lowest index first, when fewer are
kept: they stay masked, at zero), so no layer vanishes.

Models: ``mlp``, ``cnn`` and ``small_cnn`` (a chain of layers, each read by the next). Not yet
``resnet``: its group norm normalises over groups of channels, so removing one channel changes the
others' statistics; that needs group-wise masks.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
import optax

from jaxaccel import paths
from jaxaccel import step as step_lib
from jaxaccel.schema import ConfigError
from jaxaccel.sparsity import transform
from jaxaccel.surgery import Change

__all__ = ["SHRINKABLE", "layer_chain", "kept_units", "shrink", "ShrinkSurgeon", "surgeon"]

SHRINKABLE = ("mlp", "cnn", "small_cnn")

Cut = Callable[[jax.Array], jax.Array]


def layer_chain(model: Any) -> list[tuple[str, str]]:
    """``(name, "conv" | "dense")`` of the model's layers in forward order, each read by the next;
    the last one gives the logits (never shrunk)."""
    dense = lambda n: [(f"Dense_{i}", "dense") for i in range(n)]
    if model.name == "mlp":
        return dense(len(model.features) + 1)
    if model.name == "cnn":
        return [("Conv_0", "conv"), ("Conv_1", "conv"), *dense(2)]
    if model.name == "small_cnn":
        convs = [(f"Conv_{i}", "conv") for i in range(len(model.channels))]
        return convs + dense(len(model.features) + 1)
    raise ConfigError(f"sparsity.shrink works for model.name in {', '.join(SHRINKABLE)}, not {model.name}"
                      + (" (its group norm mixes channels: removing one changes the others)"
                         if model.name == "resnet" else ""))


def new_model(model: Any, widths: dict[str, int]) -> Any:
    """``model`` (a model config) with the hidden widths ``widths`` (layer name -> units)."""
    chain = layer_chain(model)[:-1]
    convs = [widths[n] for n, kind in chain if kind == "conv"]
    dense = [widths[n] for n, kind in chain if kind == "dense"]
    update = {"mlp": {"features": dense}, "cnn": {"widths": convs + dense},
              "small_cnn": {"channels": convs, "features": dense}}[model.name]
    return model.model_copy(update=update)


def kept_units(masks: Any, chain: list[tuple[str, str]], min_width: int = 1) -> dict[str, np.ndarray]:
    """Indices of the output units each hidden layer keeps: those whose kernel column has a kept
    weight; at least ``min_width`` (pruned units, lowest index first, fill up). A layer without a
    mask (not prunable) keeps all its units."""
    out = {}
    for name, _ in chain[:-1]:
        mask = (masks.get(name) or {}).get("kernel")
        if mask is None:
            continue
        mask = np.asarray(mask)
        alive = mask.reshape(-1, mask.shape[-1]).any(axis=0)
        keep = np.flatnonzero(alive)
        if keep.size < min_width:
            keep = np.sort(np.concatenate([keep, np.flatnonzero(~alive)[:min_width - keep.size]]))
        out[name] = keep
    return out


# The cuts run in NumPy on the host copy of the state: an eager jnp.take compiles one small XLA
# program per leaf shape, at every shrink, inside the timed training loop.
def _take(idx: np.ndarray, axis: int) -> Cut:
    return lambda x: np.take(np.asarray(x), idx, axis=axis)


def _flat_rows(idx: np.ndarray, channels: int) -> Cut:
    """The rows of a Dense kernel [h*w*c, out] after a flatten that belong to channels ``idx``."""
    def cut(x):
        rows = np.asarray(x).reshape(-1, channels, x.shape[-1])
        return np.take(rows, idx, axis=1).reshape(-1, x.shape[-1])
    return cut


def cuts(chain: list[tuple[str, str]], keep: dict[str, np.ndarray], params: Any) -> dict[str, list[Cut]]:
    """Parameter path -> the cuts to apply to it (in order), for the units ``keep`` keeps."""
    out: dict[str, list[Cut]] = {}
    for (name, kind), (after, after_kind) in zip(chain, chain[1:]):
        width = params[name]["kernel"].shape[-1]
        if name not in keep or keep[name].size == width:
            continue
        idx = keep[name]
        out.setdefault(f"{name}/kernel", []).append(_take(idx, -1))
        if "bias" in params[name]:
            out.setdefault(f"{name}/bias", []).append(_take(idx, -1))
        reads = _flat_rows(idx, width) if kind == "conv" and after_kind == "dense" else _take(idx, -2)
        out.setdefault(f"{after}/kernel", []).append(reads)
    return out


def _cutter(table: dict[str, list[Cut]], shapes: dict[str, tuple[int, ...]]) -> Callable[[Any, str], Any]:
    """``cut(leaf, path)``: the leaf cut as the param at ``path`` if it has that param's shape (so a
    leaf already cut, or one that is not param-shaped, passes through)."""
    def cut(leaf, path):
        if leaf is None or path not in table or np.shape(leaf) != shapes[path]:
            return leaf
        for fn in table[path]:
            leaf = fn(leaf)
        return leaf
    return cut


def _path_tree(tree: Any) -> Any:
    """``tree`` with every leaf replaced by its name (``Dense_0/kernel``)."""
    return jax.tree_util.tree_unflatten(jax.tree.structure(tree), paths.leaf_paths(tree))


def _cut_masks(opt_state: Any, cut: Callable[[Any, str], Any], names: Any) -> Any:
    """Every SparsityState's masks (trees with None for unmasked leaves) cut as the params."""
    def fix(node):
        if not isinstance(node, transform.SparsityState):
            return node
        cut_tree = lambda t: None if t is None else jax.tree.map(
            cut, t, names, is_leaf=lambda x: x is None)
        return node._replace(masks=cut_tree(node.masks), frozen=cut_tree(node.frozen))
    return jax.tree.map(fix, opt_state, is_leaf=lambda x: isinstance(x, transform.SparsityState))


def shrink(state: step_lib.TrainState, model: Any, tx: optax.GradientTransformation,
           min_width: int = 1) -> Change | None:
    """The state and model config with every fully pruned hidden unit removed (module docstring);
    None when no layer loses a unit. ``state`` is one host copy; ``tx`` the run's optimizer (the
    sparsity transformation around the user's)."""
    masks = transform.find_masks(state.opt_state)
    if masks is None:
        raise ValueError("shrink needs the sparsity transformation's masks in the optimizer state")
    chain = layer_chain(model)
    keep = kept_units(masks, chain, min_width)
    table = cuts(chain, keep, state.params)
    if not table:
        return None
    names = _path_tree(state.params)
    shapes = {p: tuple(np.shape(x)) for p, x in paths.named_leaves(state.params)}
    cut = _cutter(table, shapes)
    params = jax.tree.map(cut, state.params, names)
    opt_state = transform.map_param_trees(tx, cut, state.opt_state, state.params, names)
    opt_state = _cut_masks(opt_state, cut, names)
    model_state = {k: _cut_collection(v, cut) for k, v in state.model_state.items()}
    widths = {name: int(params[name]["kernel"].shape[-1]) for name, _ in chain[:-1]}
    record = {"kind": "shrink", "widths": widths,
              "removed": {n: int(shapes[f"{n}/kernel"][-1]) - w for n, w in widths.items()},
              "params": int(sum(np.size(x) for x in jax.tree.leaves(params)))}
    return Change(model=new_model(model, widths),
                  state=state.replace(params=params, opt_state=opt_state, model_state=model_state),
                  record=record)


def _cut_collection(tree: Any, cut: Callable[[Any, str], Any]) -> Any:
    # Model state (e.g. normalisation statistics) lives at the paths of the layers it belongs to.
    return jax.tree.map(cut, tree, _path_tree(tree))


def surgeon(cfg: Any) -> "ShrinkSurgeon | None":
    """The shrink surgeon of the resolved config ``cfg`` (None unless ``sparsity.shrink``)."""
    return ShrinkSurgeon(cfg) if getattr(cfg.sparsity, "shrink", False) else None


class ShrinkSurgeon:
    """The :class:`jaxaccel.surgery.Surgeon` of ``sparsity.shrink``: after each scheduled mask
    update, removes what it pruned. Built from the resolved config (its durations are steps), it
    decides from the step alone, so a resumed run's surgeon decides as the first run's did."""
    name = "shrink"

    def __init__(self, cfg: Any):
        self.sparsity = cfg.sparsity
        chain = layer_chain(cfg.model)
        logits = f"{chain[-1][0]}/kernel"
        if paths.matches(logits, self.sparsity.include, self.sparsity.exclude):
            raise ConfigError(f"sparsity.shrink: sparsity.include selects the output layer ({logits}), whose units "
                              f"are the classes and are never removed; add {logits!r} to sparsity.exclude")

    def points(self, total_steps: int) -> list[int]:
        """The step counts just after a mask update (the update numbered s happens in step s)."""
        due = np.asarray(transform.mask_update_due(self.sparsity, total_steps, np.arange(total_steps)))
        return [int(s) + 1 for s in np.flatnonzero(due)]

    def due(self, step: int) -> bool:
        # Resolved durations are step counts: the run's length is not needed (step + 1 stands in).
        return step >= 1 and bool(transform.mask_update_due(self.sparsity, step + 1, step - 1))

    def operate(self, step: int, state: step_lib.TrainState, model: Any,
                tx: optax.GradientTransformation) -> Change | None:
        return shrink(state, model, tx, self.sparsity.min_width)

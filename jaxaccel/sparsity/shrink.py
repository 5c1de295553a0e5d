"""Channel shrinking: remove the units channel pruning has pruned, so the rest of the run trains a
narrower dense model (``sparsity.structure=channel`` with ``sparsity.shrink=true``; issue 19).

Masks keep the dense shapes, so a masked model costs what the dense one costs. Once every weight of
an output unit (a Dense column, a conv filter) is pruned, and its bias and normalization scale and
bias with it (the sparsity transform masks those in shrinking runs:
:func:`jaxaccel.sparsity.transform.unit_masks`), the unit outputs exactly 0 (a batch norm of an
all-zero channel with scale = bias = 0 is 0, in training and in evaluation) and can be removed with
everything that reads or stores it. Units come in groups (:func:`unit_groups`): a layer l, the
normalization of its units, and the layers that read them:

    layer l, kept units K      kernel[..., K], bias[K]
    its normalization          scale[K], bias[K]; batch statistics mean[K], var[K] (model state)
    readers of l               kernel[..., K, :]         (a Dense after a conv and a flatten: the rows
                                                          of the kept channels at every position, the
                                                          flatten being (h, w, c) row-major)
    optimizer state            every param-shaped leaf (Adam moments, masks, ...) cut as its param,
                               found as the mask reset finds them (:func:`~jaxaccel.sparsity.map_param_trees`)

and the model config gets the new widths. The narrower model computes the same logits as the
masked wide one (tests/test_shrink.py). The surgeon shrinks after every scheduled mask update
(one_shot: once; polynomial/periodic: each time, the transformation pruning at each update the
fraction of the shrunk layer that leaves the schedule's share of the original units).
``sparsity.min_width`` units stay in every layer (pruned ones, lowest index first, when fewer are
kept: they stay masked, at zero), so no layer vanishes.

Models: ``mlp``, ``cnn`` and ``small_cnn`` (a chain of layers, each group a hidden layer read by
the next), and ``resnet`` with ``model.norm=batch`` (each block's first conv and its norm, read by
the block's second conv; the new widths are ``model.inner``). The residual rule: channels joined by
a residual add (the stem, each block's second conv and projection shortcut, so the stage widths)
are pruned together or not at all, and here not at all: a config whose ``sparsity.include``
selects those kernels is refused (select ``_Conv_0/kernel$``), as is the logits layer of any model.
Group norm (resnet's default) normalises over groups of channels, so removing one would change the
others' outputs: resnet with ``model.norm=group`` is refused.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
import optax

from jaxaccel import paths
from jaxaccel import step as step_lib
from jaxaccel.models.resnet import block_names
from jaxaccel.schema import ConfigError
from jaxaccel.sparsity import transform
from jaxaccel.surgery import Change

__all__ = ["SHRINKABLE", "Group", "layer_chain", "unit_groups", "fixed_layers", "new_model", "kept_units", "cuts",
           "shrink", "ShrinkSurgeon", "surgeon"]

SHRINKABLE = ("mlp", "cnn", "small_cnn", "resnet")

Cut = Callable[[jax.Array], jax.Array]


class Group(NamedTuple):
    """One prunable group of units: the output units of ``layer`` (its kernel's last axis), the
    normalization ``norm`` of those units (its scale, bias and batch statistics; None: none), and
    the layers reading them: ``(name, "in")`` a kernel whose input axis (-2) they are, ``(name,
    "flat")`` a Dense kernel after a conv and a flatten."""
    layer: str
    norm: str | None
    readers: tuple[tuple[str, str], ...]


def layer_chain(model: Any) -> list[tuple[str, str]]:
    """``(name, "conv" | "dense")`` of a chain model's layers in forward order, each read by the
    next; the last one gives the logits (never shrunk)."""
    dense = lambda n: [(f"Dense_{i}", "dense") for i in range(n)]
    if model.name == "mlp":
        return dense(len(model.features) + 1)
    if model.name == "cnn":
        return [("Conv_0", "conv"), ("Conv_1", "conv"), *dense(2)]
    if model.name == "small_cnn":
        convs = [(f"Conv_{i}", "conv") for i in range(len(model.channels))]
        return convs + dense(len(model.features) + 1)
    raise ConfigError(f"sparsity.shrink works for model.name in {', '.join(SHRINKABLE)}, not {model.name}"
                      + (" (not a chain of layers: see unit_groups)" if model.name == "resnet" else ""))


def _resnet_blocks(model: Any) -> list[str]:
    if model.norm != "batch":
        raise ConfigError("sparsity.shrink with model.name=resnet needs model.norm=batch: group norm normalises "
                          "over groups of channels, so removing one changes the others' outputs")
    return block_names(model.depth)


def unit_groups(model: Any) -> list[Group]:
    """The groups of units shrinking may remove, in forward order. A chain model: every hidden
    layer, read by the next. resnet (norm=batch): each block's first conv with its norm, read by
    the block's second conv; the residual stream is joined by adds and never shrinks."""
    if model.name == "resnet":
        return [Group(f"{b}_Conv_0", f"{b}_Norm_0", ((f"{b}_Conv_1", "in"),)) for b in _resnet_blocks(model)]
    chain = layer_chain(model)
    return [Group(name, None, ((after, "flat" if kind == "conv" and after_kind == "dense" else "in"),))
            for (name, kind), (after, after_kind) in zip(chain, chain[1:])]


def fixed_layers(model: Any) -> list[str]:
    """The layers whose output units are never removed: the logits layer, and for resnet the
    residual stream (the stem, each block's second conv and projection shortcut), whose channels
    are added together: they are pruned together or not at all, and here not at all."""
    if model.name != "resnet":
        return [layer_chain(model)[-1][0]]
    blocks = _resnet_blocks(model)
    shortcuts = [f"Stage{s}_Block0_Shortcut" for s in (1, 2)]  # where the width doubles
    return ["Conv_0", *(f"{b}_Conv_1" for b in blocks), *shortcuts, "Dense_0"]


def new_model(model: Any, widths: dict[str, int]) -> Any:
    """``model`` (a model config) with the group widths ``widths`` (layer name -> units)."""
    if model.name == "resnet":
        return model.model_copy(update={"inner": [widths[f"{b}_Conv_0"] for b in block_names(model.depth)]})
    chain = layer_chain(model)[:-1]
    convs = [widths[n] for n, kind in chain if kind == "conv"]
    dense = [widths[n] for n, kind in chain if kind == "dense"]
    update = {"mlp": {"features": dense}, "cnn": {"widths": convs + dense},
              "small_cnn": {"channels": convs, "features": dense}}[model.name]
    return model.model_copy(update=update)


def kept_units(masks: Any, groups: Sequence[Group], min_width: int = 1) -> dict[str, np.ndarray]:
    """Indices of the output units each group keeps: those whose kernel column has a kept weight;
    at least ``min_width`` (pruned units, lowest index first, fill up). A layer without a mask (not
    prunable) keeps all its units."""
    out = {}
    for name in (g.layer for g in groups):
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


def cuts(groups: Sequence[Group], keep: dict[str, np.ndarray], params: Any) -> dict[str, list[Cut]]:
    """Path -> the cuts to apply to it (in order), for the units ``keep`` keeps. Paths are those of
    params and of model state leaves (``Norm/mean`` in ``batch_stats``): one table serves both."""
    out: dict[str, list[Cut]] = {}
    for group in groups:
        width = params[group.layer]["kernel"].shape[-1]
        if group.layer not in keep or keep[group.layer].size == width:
            continue
        own = _take(keep[group.layer], -1)
        for leaf in ("kernel", "bias"):
            out.setdefault(f"{group.layer}/{leaf}", []).append(own)
        for leaf in ("scale", "bias", "mean", "var") if group.norm else ():
            out.setdefault(f"{group.norm}/{leaf}", []).append(own)
        for reader, how in group.readers:
            reads = _flat_rows(keep[group.layer], width) if how == "flat" else _take(keep[group.layer], -2)
            out.setdefault(f"{reader}/kernel", []).append(reads)
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
    groups = unit_groups(model)
    keep = kept_units(masks, groups, min_width)
    table = cuts(groups, keep, state.params)
    if not table:
        return None
    names = _path_tree(state.params)
    shapes = {p: tuple(np.shape(x)) for tree in (state.params, *state.model_state.values())
              for p, x in paths.named_leaves(tree)}
    cut = _cutter(table, shapes)
    params = jax.tree.map(cut, state.params, names)
    opt_state = transform.map_param_trees(tx, cut, state.opt_state, state.params, names)
    opt_state = _cut_masks(opt_state, cut, names)
    model_state = {k: _cut_collection(v, cut) for k, v in state.model_state.items()}
    widths = {g.layer: int(params[g.layer]["kernel"].shape[-1]) for g in groups}
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
        unit_groups(cfg.model)  # refuses what cannot shrink
        fixed = [f"{n}/kernel" for n in fixed_layers(cfg.model)
                 if paths.matches(f"{n}/kernel", self.sparsity.include, self.sparsity.exclude)]
        if fixed and cfg.model.name != "resnet":
            raise ConfigError(f"sparsity.shrink: sparsity.include selects the output layer ({fixed[0]}), whose units "
                              f"are the classes and are never removed; add {fixed[0]!r} to sparsity.exclude")
        if fixed:
            raise ConfigError(
                f"sparsity.shrink: sparsity.include selects {', '.join(fixed)}: the residual stream's channels "
                "are joined by adds (and the head's are the classes), so they are never removed; select the "
                "blocks' first convs alone with sparsity.include=['_Conv_0/kernel$'] (or add those to "
                "sparsity.exclude)")

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

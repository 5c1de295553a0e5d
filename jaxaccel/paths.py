"""Names of parameter paths, and leaves chosen by regexes over them.

Every feature that picks parameters by name (sparsity's prunable set, precision and quantization
``include``, ``init.include`` and ``init.freeze``) goes through this module, so a name means the
same everywhere. A leaf's *name* is its key path joined by '/': dict keys and attribute names as
they are, sequence indices as numbers, e.g. ``Dense_0/kernel`` or ``layers/1/kernel``. Boxes
around an array (Flax NNX ``Variable``s, linen's ``Partitioned`` metadata) are leaves here, not
nodes: a tree of ``nnx.Param`` has the names of the tree of its arrays, with no ``/value``.

:func:`select` is big_vision's ``make_mask_trees`` idea: ``include`` and ``exclude`` regexes
(``re.search``) over the names become a tree of Python bools (static: paths only, never values)
that ``optax.masked``, ``optax.multi_transform`` labels or a mask computation can use.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Callable, Sequence

import jax
from flax.core import meta

__all__ = ["name", "is_box", "named_leaves", "leaf_paths", "matches", "select", "map_with_names",
           "unmatched", "require_matches"]

PyTree = Any


class _LazyNNX:
    """``flax.nnx``, imported on first use: its import (~0.3 s, and IPython's where that is
    installed) is start-up time that runs of linen models never need."""

    def __getattr__(self, attr: str) -> Any:
        from flax import nnx
        return getattr(nnx, attr)


nnx = _LazyNNX()


def is_nnx_variable(x: Any) -> bool:
    """Whether ``x`` is an NNX Variable (without importing NNX: no Variable exists before it is)."""
    module = sys.modules.get("flax.nnx")
    return module is not None and isinstance(x, module.Variable)


def is_box(x: Any) -> bool:
    """Whether ``x`` wraps one array in a pytree node of its own (NNX Variable, linen metadata box)."""
    return isinstance(x, meta.AxisMetadata) or is_nnx_variable(x)


def name(path: Sequence[Any]) -> str:
    """'/'-joined key path: ``(DictKey('Dense_0'), DictKey('kernel'))`` -> ``'Dense_0/kernel'``;
    ``(GetAttrKey('layers'), SequenceKey(1))`` -> ``'layers/1'``."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """``(name, leaf)`` of every leaf in ``jax.tree.leaves`` order; a box is one leaf."""
    return [(name(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]]


def leaf_paths(tree: PyTree) -> list[str]:
    """The name of every leaf, in ``jax.tree.leaves`` order."""
    return [n for n, _ in named_leaves(tree)]


def matches(leaf_name: str, include: Sequence[str], exclude: Sequence[str] = ()) -> bool:
    """Whether ``leaf_name`` matches an ``include`` regex and no ``exclude`` regex (``re.search``)."""
    return any(re.search(p, leaf_name) for p in include) and not any(re.search(p, leaf_name) for p in exclude)


def map_with_names(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
    """``tree`` with every leaf (a box counts as one) replaced by ``fn(name, leaf)``."""
    return jax.tree_util.tree_map_with_path(lambda p, leaf: fn(name(p), leaf), tree, is_leaf=is_box)


def select(tree: PyTree, include: Sequence[str], exclude: Sequence[str] = ()) -> PyTree:
    """A tree of Python bools shaped like ``tree`` (a box becomes one bool): True where the leaf's
    name matches an ``include`` regex and no ``exclude`` regex."""
    inc, exc = [re.compile(p) for p in include], [re.compile(p) for p in exclude]
    return map_with_names(lambda n, _: any(r.search(n) for r in inc) and not any(r.search(n) for r in exc), tree)


def unmatched(tree: PyTree, patterns: Sequence[str]) -> list[str]:
    """The ``patterns`` that match no leaf name of ``tree``."""
    names = leaf_paths(tree)
    return [p for p in patterns if not any(re.search(p, n) for n in names)]


def require_matches(tree: PyTree, patterns: Sequence[str], key: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming the config ``key``, each pattern that selects nothing and the names
    there are: a pattern that selects nothing is a typo, never a silent no-op."""
    missing = unmatched(tree, patterns)
    if missing:
        raise error(f"{key}: {', '.join(repr(p) for p in missing)} "
                    f"{'matches' if len(missing) == 1 else 'match'} no parameter; paths: {', '.join(leaf_paths(tree))}")

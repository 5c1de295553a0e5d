"""jaxaccel.paths: leaf names and regex selection, for plain dicts, lists, attributes and NNX Variables."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxaccel import paths


class _Pair(NamedTuple):
    first: jax.Array
    second: jax.Array


def test_names_join_dict_keys_indices_and_attributes():
    tree = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
            "blocks": [jnp.ones(1), {"scale": jnp.ones(1)}],
            "pair": _Pair(jnp.ones(1), jnp.ones(2))}
    assert sorted(paths.leaf_paths(tree)) == ["Dense_0/bias", "Dense_0/kernel", "blocks/0", "blocks/1/scale",
                                              "pair/first", "pair/second"]
    # Names come in jax.tree.leaves order, so they zip with the leaves.
    for (name, leaf), plain in zip(paths.named_leaves(tree), jax.tree.leaves(tree)):
        assert leaf is plain


class _Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Linear(4, 8, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)])


def test_nnx_variables_are_named_like_their_arrays():
    net = _Net(nnx.Rngs(0))
    state = nnx.state(net, nnx.Param)            # a State of nnx.Param Variables
    arrays = nnx.to_pure_dict(state)             # the same tree of plain arrays
    names = paths.leaf_paths(state)
    assert names == paths.leaf_paths(arrays)
    assert "layers/1/kernel" in names and not any(n.endswith("value") for n in names)
    assert paths.leaf_paths(net) == names        # the module itself: attributes and list indices
    assert all(isinstance(leaf, nnx.Param) for _, leaf in paths.named_leaves(state))
    pattern = (["kernel$"], ["^layers/0/"])
    assert jax.tree.leaves(paths.select(state, *pattern)) == jax.tree.leaves(paths.select(arrays, *pattern))


def test_selection_masks_an_nnx_state_in_optax():
    # The bool tree has one bool per Variable: a prefix of the Variable tree, as optax masks need.
    state = nnx.state(_Net(nnx.Rngs(0)), nnx.Param)
    frozen = paths.select(state, [r"^embed/"])
    tx = optax.multi_transform({"train": optax.sgd(1.0), "frozen": optax.set_to_zero()},
                               jax.tree.map(lambda f: "frozen" if f else "train", frozen))
    grads = jax.tree.map(jnp.ones_like, state)
    updates, _ = tx.update(grads, tx.init(state), state)
    for name, leaf in paths.named_leaves(updates):
        assert bool(jnp.all(leaf[...] == 0)) == name.startswith("embed/"), name


def test_select_uses_search_with_include_and_exclude():
    tree = {"Conv_0": {"kernel": 1, "bias": 2}, "Dense_0": {"kernel": 3}, "head": {"Dense_9": {"kernel": 4}}}
    chosen = paths.select(tree, [r"kernel$"], [r"^Conv", r"Dense_9"])
    assert chosen == {"Conv_0": {"kernel": False, "bias": False}, "Dense_0": {"kernel": True},
                      "head": {"Dense_9": {"kernel": False}}}
    # re.search, not re.match: a pattern may match anywhere in the name.
    assert paths.select(tree, ["Dense"]) == {"Conv_0": {"kernel": False, "bias": False}, "Dense_0": {"kernel": True},
                                             "head": {"Dense_9": {"kernel": True}}}


def test_map_with_names_rebuilds_the_tree():
    tree = {"a": {"kernel": np.ones(2)}, "b": [np.zeros(1)]}
    out = paths.map_with_names(lambda name, leaf: name, tree)
    assert out == {"a": {"kernel": "a/kernel"}, "b": ["b/0"]}


def test_a_pattern_that_selects_nothing_is_named():
    tree = {"Dense_0": {"kernel": 1, "bias": 2}, "Dense_1": {"kernel": 3}}
    paths.require_matches(tree, ["Dense_0", "kernel$"], "sparsity.include")  # all match: no error
    assert paths.unmatched(tree, ["Dense_0", "Conv", "Dense_[0-9]/bias", "Dense_7"]) == ["Conv", "Dense_7"]
    with pytest.raises(KeyError) as info:
        paths.require_matches(tree, ["Conv", "Dense_1"], "init.freeze", KeyError)
    assert "init.freeze: 'Conv' matches no parameter; paths: Dense_0/bias, Dense_0/kernel, Dense_1/kernel" in str(info.value)

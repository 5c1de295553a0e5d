"""The sparsity optax transformation: exact zeros, dead moments, DST, thresholding, penalties, report."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from jaxaccel import sparsity as sp
from jaxaccel.config import sparsity_config

RNG = np.random.default_rng(1)
P0 = {"Dense_0": {"kernel": RNG.normal(size=(8, 8)), "bias": RNG.normal(size=8)},
      "Conv_0": {"kernel": RNG.normal(size=(3, 3, 4, 4)), "bias": RNG.normal(size=4)}}
P0 = jax.tree.map(lambda x: x.astype(np.float32), P0)
GRADS = [jax.tree.map(lambda x: RNG.normal(size=x.shape).astype(np.float32), P0) for _ in range(9)]
KERNELS = [("Dense_0", "kernel"), ("Conv_0", "kernel")]


def run(tx, steps, params=P0, with_init=False):
    """Yield (step, params_before, params_after, state) for ``steps`` jitted updates (one compile);
    first (-1, None, params, initial state) if ``with_init``."""
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.jit(tx.init)(params)  # jitted: eager random init runs op by op, slowly
    if with_init:
        yield -1, None, params, state
    for i in range(steps):
        new, state = step(params, state, GRADS[i])
        yield i, params, new, state
        params = new


def leaf(tree, path):
    return np.asarray(tree[path[0]][path[1]])


def moments(inner, inner_state, masks):
    """(state leaf, mask) for every param-shaped inner-state leaf of a prunable parameter."""
    out = []
    optax.tree_utils.tree_map_params(
        inner, lambda s, m: out.append((np.asarray(s), np.asarray(m))) if m is not None else None,
        inner_state, masks)
    return out


SCHEDULE = dict(schedule="polynomial", target=0.6, start=1, end=7, update_every=2)
CASES = {  # one optimizer each, and a different mask kind each, to cover both with few compiles
    "sgd": (lambda: optax.sgd(0.1), dict(method="magnitude")),
    "momentum": (lambda: optax.sgd(0.1, momentum=0.9), dict(method="saliency")),
    "adam": (lambda: optax.adam(0.05), dict(method="magnitude", structure="block", block=[2, 2])),
    "adamw": (lambda: optax.adamw(0.05, weight_decay=0.1), dict(method="magnitude", scope="global")),
    "inject_adam": (lambda: optax.inject_hyperparams(optax.adam)(learning_rate=0.05),
                    dict(method="magnitude", structure="channel", distribution="erk")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_weights_stay_exactly_zero_and_their_moments_cannot_act(name):
    make_inner, extra = CASES[name]
    inner = make_inner()
    tx = sp.make_sparsity(sparsity_config(**SCHEDULE, **extra), inner, total_steps=10)
    seen, previous = [], None
    for i, before, after, state in run(tx, 9):
        masks = sp.find_masks(state)
        assert masks["Dense_0"]["bias"] is None
        if i == 0:  # before start nothing is pruned: exactly the inner optimizer's step
            u, _ = inner.update(GRADS[0], inner.init(P0), P0)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         after, optax.apply_updates(P0, u))
        for path in KERNELS:
            m, p = leaf(masks, path), leaf(after, path)
            assert np.all(p[~m] == 0.0), (name, i, path)  # exact zeros, every step
        current = moments(inner, state.inner_state, masks)
        for k, (s, m) in enumerate(current):
            if extra["method"] == "saliency":  # masks can re-select a pruned entry: moments reset
                assert np.all(s[~m] == 0), (name, i)
            elif previous is not None:  # nested masks: pruned moments only decay, never act
                was_pruned = ~previous[k][1] & ~m
                assert np.all(np.abs(s[was_pruned]) <= np.abs(previous[k][0][was_pruned])), (name, i)
        previous = current
        seen.append(sum(int((~leaf(masks, p)).sum()) for p in KERNELS))
    assert seen[0] == 0 and len(set(seen)) >= 3, seen  # masks changed at several schedule steps
    assert seen == sorted(seen)
    rep = sp.report(after)
    assert rep["sparsity"] == pytest.approx(seen[-1] / (64 + 144))  # counted from the values
    if name == "sgd":
        assert rep["sparsity/Dense_0/kernel"] == pytest.approx(round(0.6 * 64) / 64)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_dst_constant_sparsity_and_zero_growth(method):
    inner = optax.adam(0.05)
    cfg = sparsity_config(method=method, target=0.5, update_every=2, end=8, drop_fraction=0.5)
    tx = sp.make_sparsity(cfg, inner, total_steps=10)
    changes, old = 0, None
    for i, before, after, state in run(tx, 7, with_init=True):
        new = sp.find_masks(state)
        if i == -1:
            for path in KERNELS:
                assert leaf(new, path).sum() == leaf(P0, path).size // 2  # target sparsity from step 0
            old = new
            continue
        for path in KERNELS:
            o, n, p = leaf(old, path), leaf(new, path), leaf(after, path)
            assert n.sum() == o.sum() == p.size // 2  # constant sparsity
            assert np.all(p[~n] == 0.0)
            grown = n & ~o
            assert np.all(p[grown] == 0.0)  # grown weights start at exactly zero
            changes += int(grown.sum())
            if i in (2, 4, 6):
                assert grown.sum() > 0, (i, path)
            else:
                assert grown.sum() == 0
        for s, m in moments(inner, state.inner_state, new):
            assert np.all(s[~m] == 0)
        if i in (2, 4):  # right after growth, the grown entries also have zero moments
            grown_tree = jax.tree.map(lambda a, b: None if a is None else np.asarray(a & ~b), new, old,
                                      is_leaf=lambda x: x is None)
            for s, g in moments(inner, state.inner_state, grown_tree):
                assert np.all(s[g] == 0)
        old = new
    assert changes > 0


def test_nm_transform_exactly_n_nonzeros_per_group():
    cfg = sparsity_config(method="magnitude", structure="nm", n=2, m=4, schedule="one_shot", start=0)
    for _, _, after, _ in run(sp.make_sparsity(cfg, optax.sgd(0.1, momentum=0.9), 10), 3):
        dense, conv = leaf(after, ("Dense_0", "kernel")), leaf(after, ("Conv_0", "kernel"))
        assert (np.count_nonzero(dense.reshape(2, 4, 8), axis=1) == 2).all()
        assert (np.count_nonzero(conv.reshape(3, 3, 1, 4, 4), axis=3) == 2).all()


def test_threshold_freezes_small_weights():
    cfg = sparsity_config(method="none", penalty="l1", penalty_weight=0.01, threshold=0.5, threshold_at=2)
    tx = sp.make_sparsity(cfg, optax.sgd(0.1), 10)
    frozen = None
    for i, before, after, state in run(tx, 5):
        if i < 2:
            assert all(np.all(leaf(after, p) != 0) for p in KERNELS)
        if i == 2:
            frozen = {p: np.abs(leaf(before, p)) < 0.5 for p in KERNELS}
            assert all(f.any() and not f.all() for f in frozen.values())
        if i >= 2:  # zeroed at the threshold step and kept there despite nonzero gradients
            for p in KERNELS:
                np.testing.assert_array_equal(leaf(after, p) == 0, frozen[p])
                np.testing.assert_array_equal(~leaf(sp.find_masks(state), p), frozen[p])
            assert np.all(np.asarray(after["Dense_0"]["bias"]) != 0)  # biases are never pruned


def test_nothing_requested_returns_inner_and_find_masks():
    inner = optax.adam(1e-3)
    assert sp.make_sparsity(sparsity_config(), inner, 10) is inner
    assert sp.make_sparsity(sparsity_config(penalty="l1", penalty_weight=1e-4), inner, 10) is inner
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     sp.make_sparsity(sparsity_config(method="magnitude", target=0.5), inner, 10))
    state = train_state.TrainState.create(apply_fn=None, params=P0, tx=tx)
    masks = sp.find_masks(state.opt_state)
    assert masks["Dense_0"]["kernel"].dtype == jnp.bool_ and masks["Conv_0"]["bias"] is None
    assert sp.find_masks(inner.init(P0)) is None


def test_an_include_pattern_that_selects_nothing_is_a_config_error():
    from jaxaccel.config import ConfigError
    tx = sp.make_sparsity(sparsity_config(method="magnitude", target=0.5, include=["Dense_0/kernel", "Dense_9"]),
                          optax.sgd(0.1), 10)
    with pytest.raises(ConfigError, match="sparsity.include: 'Dense_9' matches no parameter"):
        tx.init(P0)


def test_invalid_combinations_raise():
    with pytest.raises(ValueError):
        sp.make_sparsity(sparsity_config(method="rigl", structure="channel"), optax.sgd(0.1), 10)
    with pytest.raises(ValueError):
        sp.make_sparsity(sparsity_config(method="magnitude", scope="global", structure="block"), optax.sgd(0.1), 10)


# ------------------------------------------------------------------------------------------------
# Penalties and the report, against NumPy.

def np_group_lasso(w, group, m=4):
    if group in ("row", "channel"):
        return sum(np.linalg.norm(w[..., j]) for j in range(w.shape[-1]))
    total = 0.0
    for idx in np.ndindex(*w.shape[:-2], w.shape[-1]):
        lead, out = idx[:-1], idx[-1]
        for g0 in range(0, w.shape[-2], m):
            total += np.linalg.norm([w[lead + (i, out)] for i in range(g0, min(g0 + m, w.shape[-2]))])
    return total


@pytest.mark.parametrize("kind,group", [("l1", "row"), ("group_lasso", "row"), ("group_lasso", "channel"),
                                        ("group_lasso", "nm")])
def test_penalty_against_numpy(kind, group):
    params = {"Dense_0": {"kernel": RNG.normal(size=(6, 5)).astype(np.float32), "bias": np.ones(5, np.float32)},
              "Conv_0": {"kernel": RNG.normal(size=(3, 3, 6, 4)).astype(np.float32), "bias": np.ones(4, np.float32)}}
    params["Dense_0"]["kernel"][:, 1] = 0.0  # an all-zero group: value 0 and a finite gradient
    cfg = sparsity_config(penalty=kind, penalty_weight=0.5, group=group)
    value, grads = jax.jit(jax.value_and_grad(lambda p: sp.penalty(cfg, p)))(params)
    kernels = [params["Dense_0"]["kernel"], params["Conv_0"]["kernel"]]
    want = 0.5 * sum(np.abs(w).sum() if kind == "l1" else np_group_lasso(w.astype(np.float64), group)
                     for w in kernels)
    assert float(value) == pytest.approx(want, rel=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert not np.asarray(grads["Dense_0"]["bias"]).any()
    assert float(sp.penalty(sparsity_config(), params)) == 0.0


def test_report_counts_exact_zeros_numpy_and_jax():
    params = {"Dense_0": {"kernel": np.array([[0.0, 1.0], [2.0, 0.0]], np.float32), "bias": np.zeros(2, np.float32)},
              "Dense_1": {"kernel": np.array([[0.0, 3.0, 4.0]], np.float32), "bias": np.zeros(3, np.float32)}}
    for tree in (params, jax.tree.map(jnp.asarray, params)):
        rep = sp.report(tree, sparsity_config())
        assert rep["sparsity"] == pytest.approx(3 / 7)
        assert rep["sparsity/Dense_0/kernel"] == 0.5 and rep["sparsity/Dense_1/kernel"] == pytest.approx(1 / 3)
        assert not any("bias" in k for k in rep)
    cfg = sparsity_config(exclude=["Dense_1"])
    assert sp.report(params, cfg)["sparsity"] == 0.5



def test_map_param_trees_falls_back_for_inits_that_do_arithmetic():
    # An init that looks inside params cannot run on tree_map_params' placeholder; the fallback
    # matches param-shaped subtrees by structure and shapes instead.
    odd = optax.GradientTransformation(
        lambda p: {"trace": jax.tree.map(lambda x: np.ones_like(x) * 2.0, p),
                   "count": np.zeros(p["Dense_0"]["kernel"].shape[:1])},
        lambda u, s, p=None: (u, s))
    with pytest.raises(TypeError):
        optax.tree_utils.tree_map_params(odd, lambda s: s, odd.init(P0))
    state = odd.init(P0)
    masks = {"Dense_0": {"kernel": np.eye(8, dtype=bool), "bias": None},
             "Conv_0": {"kernel": np.zeros((3, 3, 4, 4), bool), "bias": None}}
    out = sp.map_param_trees(odd, lambda s, m: s if m is None else np.where(m, s, 0.0), state, P0, masks)
    assert out["count"] is state["count"]
    np.testing.assert_array_equal(out["trace"]["Dense_0"]["kernel"], 2.0 * np.eye(8))
    assert not out["trace"]["Conv_0"]["kernel"].any() and (out["trace"]["Conv_0"]["bias"] == 2.0).all()


# ---------------------------------------------------------------------------------------------
# NNX Variables, and selections and structures that cannot do what they say.

def test_nnx_optimizer_prunes_exactly_as_on_arrays():
    """``nnx.Optimizer(model, make_sparsity(...), wrt=nnx.Param)`` in a user's loop: the masks of a
    tree of Variables are those of its arrays, so the parameters follow a plain-array run of the
    same network, with exact zeros at the target."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(8, 8, rngs=rngs)
            self.out = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.hidden(x)))

    cfg = sparsity_config(method="magnitude", target=0.5, schedule="one_shot", start=1)
    model = Net(nnx.Rngs(0))
    arrays = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = sp.make_sparsity(cfg, optax.adam(0.05), 10)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = jnp.asarray(RNG.normal(size=(16, 8)), jnp.float32), jnp.asarray(RNG.normal(size=(16, 4)), jnp.float32)

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(lambda m: ((m(x) - y) ** 2).mean())(model)
        optimizer.update(model, grads)

    def loss(p):  # the same network on the plain array tree
        hidden = jax.nn.relu(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        return ((hidden @ p["out"]["kernel"] + p["out"]["bias"] - y) ** 2).mean()

    @jax.jit
    def array_step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(arrays)
    for _ in range(4):
        train_step(model, optimizer)
        arrays, state = array_step(arrays, state)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(arrays)):
        np.testing.assert_array_equal(np.asarray(a) == 0, np.asarray(b) == 0)  # the same masks
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        if str(path[-1]).endswith("'kernel']"):
            assert np.mean(np.asarray(a) == 0) == 0.5


@pytest.mark.parametrize("fields, message", [
    (dict(include=["nothing$"]), r"sparsity.include: 'nothing\$' matches no parameter; paths: "),
    (dict(exclude=["Conv_9"]), "sparsity.exclude: 'Conv_9' matches no parameter; paths: "),
    (dict(include=["Dense_0/kernel"], exclude=["Dense"]), "selects no parameter; paths: "),
])
def test_a_selection_of_nothing_is_an_error_listing_the_paths(fields, message):
    cfg = sparsity_config(method="magnitude", target=0.5, **fields)
    with pytest.raises(ValueError, match=message) as error:
        sp.make_sparsity(cfg, optax.sgd(0.1), 10).init(P0)
    assert all(name in str(error.value) for name in ("Conv_0/bias", "Conv_0/kernel", "Dense_0/bias", "Dense_0/kernel"))


def test_nm_on_an_axis_not_a_multiple_of_m_is_refused_with_the_actual_sparsity():
    cfg = sparsity_config(method="magnitude", structure="nm", n=2, m=4, schedule="one_shot", start=0)
    params = {"Dense_0": {"kernel": np.ones((10, 3), np.float32)}}  # groups 4 + 4 + 2: keeps 6 of 10
    with pytest.raises(ValueError, match=r"Dense_0/kernel \[10, 3\].*would get sparsity 0.4000 instead of 0.5000"):
        sp.make_sparsity(cfg, optax.sgd(0.1), 10).init(params)


def test_a_layer_too_small_for_nm_is_named_and_left_dense():
    cfg = sparsity_config(method="magnitude", structure="nm", n=2, m=4, schedule="one_shot", start=0)
    params = {"Conv_0": {"kernel": np.asarray(RNG.normal(size=(3, 3, 1, 8)), np.float32)},
              "Dense_0": {"kernel": np.asarray(RNG.normal(size=(8, 8)), np.float32)}}
    tx = sp.make_sparsity(cfg, optax.sgd(0.1), 10)
    with pytest.warns(sp.SparsityWarning, match=r"Conv_0/kernel \[3, 3, 1, 8\]: its contracting axis has 1 < m=4"):
        state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    new = optax.apply_updates(params, updates)
    assert np.all(np.asarray(new["Conv_0"]["kernel"]) != 0) and np.mean(np.asarray(new["Dense_0"]["kernel"]) == 0) == 0.5

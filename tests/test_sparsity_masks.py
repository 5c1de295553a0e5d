"""Mask calculators against independent NumPy references, element by element."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel import sparsity as sp

RNG = np.random.default_rng(0)


def _params():
    return {
        "Dense_0": {"kernel": RNG.normal(size=(10, 6)).astype(np.float32), "bias": np.ones(6, np.float32)},
        "Conv_0": {"kernel": RNG.normal(size=(3, 3, 6, 5)).astype(np.float32), "bias": np.ones(5, np.float32)},
    }


PARAMS = _params()
KERNELS = {"Dense_0/kernel": PARAMS["Dense_0"]["kernel"], "Conv_0/kernel": PARAMS["Conv_0"]["kernel"]}


# One compiled function per mask kind (the sparsity is traced): far fewer compiles than eager ops.
@functools.partial(jax.jit, static_argnames=("method", "structure", "scope", "n", "m", "block"))
def masks_of(params, sparsity, grads=None, key=None, *, method="magnitude", structure="unstructured",
             scope="layer", n=2, m=4, block=(4, 4)):
    return sp.compute_masks(params, sp.prunable_tree(params), sparsity, method=method, structure=structure,
                            scope=scope, n=n, m=m, block=block, grads=grads, key=key)


# ------------------------------------------------------------------------------------------------
# NumPy references (no code under test).

def np_topk(score, k):
    """Keep the k highest scores; ties to the lower flat index."""
    flat = np.asarray(score, np.float64).ravel()
    order = np.lexsort((np.arange(flat.size), -flat))  # primary key -score, then index
    keep = np.zeros(flat.size, bool)
    keep[order[:k]] = True
    return keep.reshape(np.shape(score))


def np_keep(size, s):
    return int(np.round((1 - s) * size))


def np_nm(w, n, m):
    """Loop over every (spatial..., out) position and every group of m inputs along axis -2."""
    w = np.abs(w)
    keep = np.zeros(w.shape, bool)
    n_in = w.shape[-2]
    for idx in np.ndindex(*w.shape[:-2], w.shape[-1]):
        lead, out = idx[:-1], idx[-1]
        for g0 in range(0, n_in, m):
            group = list(range(g0, min(g0 + m, n_in)))
            best = sorted(group, key=lambda i: (-w[lead + (i, out)], i))[:n]
            for i in best:
                keep[lead + (i, out)] = True
    return keep


def np_block(w, s, bh, bw):
    w2 = np.abs(w).reshape(-1, w.shape[-1])
    rows, cols = w2.shape
    rb, cb = -(-rows // bh), -(-cols // bw)
    norms = np.array([[np.sqrt(np.sum(w2[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw] ** 2)) for j in range(cb)]
                      for i in range(rb)])
    kb = np_topk(norms, np_keep(norms.size, s))
    keep = np.zeros_like(w2, bool)
    for i, j in itertools.product(range(rb), range(cb)):
        keep[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw] = kb[i, j]
    return keep.reshape(w.shape)


def np_channel(w, s):
    norms = np.sqrt(np.sum(np.abs(w).reshape(-1, w.shape[-1]) ** 2, axis=0))
    return np.broadcast_to(np_topk(norms, np_keep(norms.size, s)), w.shape)


def np_drop_and_grow(mask, w, score, frac):
    mask = mask.ravel()
    d = int(np.floor(np.float32(frac) * mask.sum()))
    active = np.flatnonzero(mask)
    dropped = sorted(active, key=lambda i: (abs(w.flat[i]), i))[:d]
    kept = mask.copy()
    kept[dropped] = False
    grown = sorted(np.flatnonzero(~kept), key=lambda i: (-score.flat[i], i))[:d]
    kept[grown] = True
    return kept.reshape(w.shape)


# ------------------------------------------------------------------------------------------------

def test_prunable_tree_default_and_regex():
    assert sp.prunable_tree(PARAMS) == {"Dense_0": {"kernel": True, "bias": False},
                                        "Conv_0": {"kernel": True, "bias": False}}
    got = sp.prunable_tree(PARAMS, include=[r"kernel$"], exclude=[r"^Conv"])
    assert got["Conv_0"]["kernel"] is False and got["Dense_0"]["kernel"] is True


@pytest.mark.parametrize("s", [0.3, 0.57])
def test_magnitude_per_layer(s):
    masks = masks_of(PARAMS, s)
    assert masks["Dense_0"]["bias"] is None and masks["Conv_0"]["bias"] is None
    for path, w in KERNELS.items():
        layer, name = path.split("/")
        np.testing.assert_array_equal(np.asarray(masks[layer][name]), np_topk(np.abs(w), np_keep(w.size, s)))


def test_magnitude_global():
    s = 0.6
    masks = masks_of(PARAMS, s, scope="global")
    dense, conv = KERNELS["Dense_0/kernel"], KERNELS["Conv_0/kernel"]
    allw = np.concatenate([np.abs(dense).ravel(), np.abs(conv).ravel()])
    ref = np_topk(allw, np_keep(allw.size, s))
    np.testing.assert_array_equal(np.asarray(masks["Dense_0"]["kernel"]).ravel(), ref[:dense.size])
    np.testing.assert_array_equal(np.asarray(masks["Conv_0"]["kernel"]).ravel(), ref[dense.size:])


def test_saliency():
    grads = jax.tree.map(lambda x: RNG.normal(size=x.shape).astype(np.float32), PARAMS)
    masks = masks_of(PARAMS, 0.4, grads, method="saliency")
    for layer in ("Dense_0", "Conv_0"):
        w, g = PARAMS[layer]["kernel"], grads[layer]["kernel"]
        ref = np_topk(np.abs(w * g), np_keep(w.size, 0.4))
        np.testing.assert_array_equal(np.asarray(masks[layer]["kernel"]), ref)


def test_random_exact_count_deterministic_and_nested():
    key = jax.random.key(3)
    lo, hi = masks_of(PARAMS, 0.3, key=key, method="random"), masks_of(PARAMS, 0.6, key=key, method="random")
    again = masks_of(PARAMS, 0.3, key=key, method="random")
    other = masks_of(PARAMS, 0.3, key=jax.random.key(4), method="random")
    for layer in ("Dense_0", "Conv_0"):
        a, b = np.asarray(lo[layer]["kernel"]), np.asarray(hi[layer]["kernel"])
        assert a.sum() == np_keep(a.size, 0.3) and b.sum() == np_keep(b.size, 0.6)
        assert not np.any(b & ~a)  # the sparser mask is a subset: gradual random pruning nests
        np.testing.assert_array_equal(a, np.asarray(again[layer]["kernel"]))
    assert any(np.any(np.asarray(lo[k]["kernel"]) != np.asarray(other[k]["kernel"])) for k in lo)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_nm_against_reference(n, m):
    masks = masks_of(PARAMS, 0.0, structure="nm", n=n, m=m)
    for layer in ("Dense_0", "Conv_0"):
        w = PARAMS[layer]["kernel"]  # contracting lengths 10 and 6: a short last group
        np.testing.assert_array_equal(np.asarray(masks[layer]["kernel"]), np_nm(w, n, m))


def test_nm_exactly_n_per_group_dense_and_conv():
    dense = RNG.normal(size=(16, 5)).astype(np.float32)
    conv = RNG.normal(size=(2, 3, 8, 4)).astype(np.float32)
    nm = jax.jit(lambda p: sp.nm_masks(p, 2, 4))(
        {"Dense_0": {"kernel": dense}, "Conv_0": {"kernel": conv}})
    md, mc = np.asarray(nm["Dense_0"]["kernel"]), np.asarray(nm["Conv_0"]["kernel"])
    assert (md.reshape(4, 4, 5).sum(axis=1) == 2).all()         # groups of 4 inputs, per output
    assert (mc.reshape(2, 3, 2, 4, 4).sum(axis=3) == 2).all()    # per (kh, kw, out), along in
    # N:M of the masked weights: exactly N nonzeros per group.
    assert (np.count_nonzero((dense * md).reshape(4, 4, 5), axis=1) == 2).all()


def test_ties_exact_counts_lowest_index_first():
    m, nm, ch = jax.jit(lambda w: (sp.unstructured_mask(w, 0.5), sp.nm_mask(w, 2, 4),
                                   sp.channel_mask(w, 0.5)))(jnp.ones((8, 4)))
    m, nm, ch = np.asarray(m), np.asarray(nm), np.asarray(ch)
    assert m.sum() == 16 and m.ravel()[:16].all()
    assert (nm.reshape(2, 4, 4)[:, :2].all()) and not nm.reshape(2, 4, 4)[:, 2:].any()
    assert ch[:, :2].all() and not ch[:, 2:].any()


@pytest.mark.parametrize("block,s", [((4, 4), 0.5), ((3, 2), 0.4)])
def test_block_against_reference(block, s):
    masks = masks_of(PARAMS, s, structure="block", block=block)
    for layer in ("Dense_0", "Conv_0"):
        w = PARAMS[layer]["kernel"]  # (10, 6) and (54, 5): neither divisible by the blocks
        np.testing.assert_array_equal(np.asarray(masks[layer]["kernel"]), np_block(w, s, *block))


@pytest.mark.parametrize("s", [0.35, 0.6])  # (1 - s) * channels never ends in .5
def test_channel_against_reference(s):
    masks = masks_of(PARAMS, s, structure="channel")
    for layer in ("Dense_0", "Conv_0"):
        w = PARAMS[layer]["kernel"]
        np.testing.assert_array_equal(np.asarray(masks[layer]["kernel"]), np_channel(w, s))


@pytest.mark.parametrize("frac", [0.3, 1.0])
def test_drop_and_grow_against_reference(frac):
    w = RNG.normal(size=(6, 7)).astype(np.float32)
    mask = np_topk(np.abs(w), 20)
    w = np.where(mask, w, 0.0).astype(np.float32)  # inactive weights are exact zeros in training
    score = RNG.normal(size=w.shape).astype(np.float32) ** 2
    got = np.asarray(jax.jit(sp.drop_and_grow)(mask, w, score, frac))
    np.testing.assert_array_equal(got, np_drop_and_grow(mask, w, score, frac))
    assert got.sum() == 20


def test_apply_masks_zeroes_and_keeps_unmasked():
    out = jax.jit(lambda p: sp.apply_masks(p, sp.magnitude_masks(p, 0.5)))(PARAMS)
    w = PARAMS["Dense_0"]["kernel"]
    np.testing.assert_array_equal(np.asarray(out["Dense_0"]["kernel"]),
                                  np.where(np_topk(np.abs(w), np_keep(w.size, 0.5)), w, 0))
    np.testing.assert_array_equal(np.asarray(out["Dense_0"]["bias"]), PARAMS["Dense_0"]["bias"])

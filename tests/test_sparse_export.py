"""Compressed sparse export (jaxaccel.sparsity.export) and sparse inference routes."""
from __future__ import annotations

import math
import warnings

import jax
import numpy as np
import pytest
from flax import traverse_util

from jaxaccel.models import MLP
from jaxaccel.sparsity import export as sparse_export
from jaxaccel.sparsity import inference as sparse_inference

DENSE_SHAPE = (32, 24)       # (in, out)
CONV_SHAPE = (3, 3, 8, 12)   # (kh, kw, in, out)


def _pruned(shape: tuple[int, ...], sparsity: float, seed: int = 0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(dtype)
    w[rng.random(shape) < sparsity] = 0
    return w


def _two_four(shape: tuple[int, ...], seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Exactly 2 nonzeros in every 4 consecutive entries along the contracting axis (-2)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape) if np.dtype(dtype).kind == "f" else rng.integers(1, 128, size=shape)
    w = w * rng.choice([-1, 1], size=shape)  # no accidental zeros, either sign
    w = np.moveaxis(w.astype(dtype), -2, -1)  # contracting axis last
    groups = w.reshape(*w.shape[:-1], -1, 4)
    drop = np.argsort(rng.random(groups.shape), axis=-1)[..., :2]
    np.put_along_axis(groups, drop, 0, axis=-1)
    out = np.moveaxis(groups.reshape(w.shape), -1, -2)
    assert (out != 0).sum() == out.size // 2
    return np.ascontiguousarray(out)


def _assert_bitwise(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def _round_trip(params: dict[str, np.ndarray], structure=None) -> tuple[dict, dict]:
    arrays, meta = sparse_export.compress(params, structure)
    _assert_bitwise(sparse_export.decompress(arrays, meta), params)
    return arrays, meta


@pytest.mark.parametrize("shape", [DENSE_SHAPE, CONV_SHAPE])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9, 0.99, 1.0])
def test_round_trip_unstructured(shape, sparsity):
    params = {"layer/kernel": _pruned(shape, sparsity), "layer/bias": np.arange(shape[-1], dtype=np.float32)}
    arrays, meta = _round_trip(params)
    assert meta["tensors"]["layer/bias"]["form"] == "dense"
    # The chosen form is never bigger than dense.
    assert meta["tensors"]["layer/kernel"]["nbytes"] <= params["layer/kernel"].nbytes
    assert sparse_export.nbytes(arrays) == sum(t["nbytes"] for t in meta["tensors"].values())


def test_fully_dense_and_all_zero_forms():
    arrays, meta = _round_trip({"full": _pruned(DENSE_SHAPE, 0.0), "zero": np.zeros(DENSE_SHAPE, np.float32)})
    assert meta["tensors"]["full"]["form"] == "dense"
    assert meta["tensors"]["zero"]["form"] == "csr" and meta["tensors"]["zero"]["nnz"] == 0
    assert sparse_export.nbytes({k: v for k, v in arrays.items() if k.startswith("zero")}) < 100


def test_ninety_percent_is_csr_and_smaller():
    w = _pruned(DENSE_SHAPE, 0.9)
    arrays, meta = _round_trip({"k": w})
    info = meta["tensors"]["k"]
    assert info["form"] == "csr" and info["nnz"] == np.count_nonzero(w)
    assert arrays["k:indices"].dtype == np.int16 and arrays["k:indptr"].dtype == np.int16
    assert sparse_export.nbytes(arrays) < w.nbytes / 3


def test_index_dtypes_widen_when_needed():
    w = _pruned((40_000, 2), 0.5)  # column index up to 39,999 and ~40k nonzeros: past int16
    arrays, meta = _round_trip({"k": w}, {"k": "csr"})
    assert arrays["k:indices"].dtype == np.int32 and arrays["k:indptr"].dtype == np.int32


@pytest.mark.parametrize("shape", [DENSE_SHAPE, CONV_SHAPE])
@pytest.mark.parametrize("dtype", [np.float32, np.int8])
def test_two_four_is_packed_nm(shape, dtype):
    w = _two_four(shape, dtype=dtype)
    arrays, meta = _round_trip({"k": w})
    info = meta["tensors"]["k"]
    assert (info["form"], info["n"], info["m"], info["bits"]) == ("nm", 2, 4, 2)
    slots = w.size // 2  # 2 kept values per group of 4
    assert arrays["k:values"].dtype == dtype and arrays["k:values"].size == slots
    assert arrays["k:positions"].dtype == np.uint8
    assert arrays["k:positions"].nbytes == math.ceil(slots * 2 / 8)  # 2-bit indices, 4 per byte
    assert sparse_export.nbytes(arrays) < w.nbytes


def test_two_four_along_wrong_axis_is_not_nm():
    """2:4 along the output axis is not N:M along the contracting axis."""
    w = np.ascontiguousarray(_two_four(DENSE_SHAPE[::-1]).T)
    _, meta = _round_trip({"k": w})
    assert meta["tensors"]["k"].get("m") != 4


def test_nm_with_fewer_than_n_nonzeros_per_group():
    w = _two_four(DENSE_SHAPE)
    w[:8] = 0  # groups with 0 nonzeros get padded with their own zeros
    _, meta = _round_trip({"k": w}, {"k": "2:4"})
    assert meta["tensors"]["k"]["form"] == "nm"


@pytest.mark.parametrize("sparsity,form,stored", [(0.5, "dense", "q/kernel"), (0.9, "csr", "q/kernel:values")])
def test_int8_values_round_trip(sparsity, form, stored):
    """int8 weights stay int8 in whichever form is smaller (dense at 50%, CSR at 90%)."""
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, size=CONV_SHAPE).astype(np.int8)
    w[rng.random(w.shape) < sparsity] = 0
    arrays, meta = _round_trip({"q/kernel": w, "q/scale": rng.random(12).astype(np.float32)})
    assert meta["tensors"]["q/kernel"]["dtype"] == "int8" and meta["tensors"]["q/kernel"]["form"] == form
    assert arrays[stored].dtype == np.int8


def test_negative_zero_and_nan_survive():
    w = _pruned(DENSE_SHAPE, 0.95)
    w[0, 0], w[1, 1], w[2, 2] = -0.0, np.nan, 0.0
    _round_trip({"k": w})


def test_structure_hints():
    w = _pruned(DENSE_SHAPE, 0.9)
    _, meta = _round_trip({"a": w, "b": w}, {"a": "dense", "b": "unstructured"})
    assert meta["tensors"]["a"]["form"] == "dense" and meta["tensors"]["b"]["form"] == "csr"
    with pytest.warns(UserWarning, match="does not hold"):
        _, meta = _round_trip({"k": _pruned(DENSE_SHAPE, 0.0)}, {"k": "2:4"})
    assert meta["tensors"]["k"]["form"] == "dense"
    with pytest.raises(ValueError):
        sparse_export.compress({"k": w}, {"k": "5:4"})


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_position_packing(bits):
    values = np.random.default_rng(bits).integers(0, 2 ** bits, size=37).astype(np.uint8)
    packed = sparse_export.pack_positions(values, bits)
    assert packed.size == math.ceil(37 * bits / 8)
    np.testing.assert_array_equal(sparse_export.unpack_positions(packed, bits, 37), values)


def test_mlp_layers_numeric_order():
    meta = {"tensors": {f"Dense_{i}/kernel": {} for i in (10, 2, 0)} | {"Dense_0/bias": {}}}
    assert sparse_inference.mlp_layers(meta) == [
        ("Dense_0/kernel", "Dense_0/bias"), ("Dense_2/kernel", None), ("Dense_10/kernel", None)]


# ------------------------------------------------------------------------------ inference
_MODEL = MLP(features=(16, 12), num_classes=5)
_IMAGE = (4, 4, 1)  # 16 inputs: every contracting size (16, 16, 12) is a multiple of 4


def _mlp_params(mode: float | str) -> dict[str, np.ndarray]:
    """Dense-with-zeros params of _MODEL (NumPy init: flax's init would cost compiles, not coverage)."""
    rng = np.random.default_rng(42)
    sizes = (math.prod(_IMAGE), *_MODEL.features, _MODEL.num_classes)
    flat = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        shape = (fan_in, fan_out)
        kernel = _two_four(shape, i) if mode == "2:4" else _pruned(shape, mode, i)
        flat[f"Dense_{i}/kernel"] = kernel / np.float32(np.sqrt(fan_in))  # lecun-like scale
        flat[f"Dense_{i}/bias"] = rng.normal(scale=0.1, size=fan_out).astype(np.float32)
    return flat


@pytest.fixture(scope="module", params=[0.7, "2:4"])
def compressed_mlp(request):
    flat = _mlp_params(request.param)
    arrays, meta = sparse_export.compress(flat)
    images = np.random.default_rng(0).integers(0, 256, size=(3, *_IMAGE), dtype=np.uint8)
    params = {"params": traverse_util.unflatten_dict(sparse_export.decompress(arrays, meta), sep="/")}
    return arrays, meta, images, np.asarray(jax.jit(_MODEL.apply)(params, images))


# Tolerance: every route computes the same float32 dot products in another summation order (and
# adds the bias before or after). Each output sums <= 16 products of magnitude <~ 1, so the
# reordering error is <~ 16 * eps32 (1.2e-7) * sum|terms| ~ 1e-5 absolute; identical math would
# give 0, a wrong index or dropped value gives errors of order 0.1.
_TOL = dict(rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("route", sparse_inference.ROUTES)
def test_routes_match_dense_model(compressed_mlp, route):
    arrays, meta, images, expected = compressed_mlp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jax.experimental.sparse efficiency warnings
        model = sparse_inference.SparseMLP(arrays, meta, route)
        # Batch 1 takes a separate (1-D) code path only in the SciPy route; jax routes would just
        # compile the same program twice.
        for batch in (1, 3) if route == "scipy" else (3,):
            logits = model(images[:batch])
            np.testing.assert_allclose(logits, expected[:batch], **_TOL)
            np.testing.assert_array_equal(logits.argmax(1), expected[:batch].argmax(1))


def test_scipy_route_fallback_and_threads(compressed_mlp, monkeypatch):
    arrays, meta, images, expected = compressed_mlp
    monkeypatch.setattr(sparse_inference, "_THREAD_MIN_WORK", 0)  # split even tiny products
    threaded = sparse_inference.SparseMLP(arrays, meta, "scipy", threads=2)
    np.testing.assert_allclose(threaded(images), expected, **_TOL)
    np.testing.assert_allclose(threaded(images[:1]), expected[:1], **_TOL)
    monkeypatch.setattr(sparse_inference, "_RAW_CSR", False)  # public csr_array @ x path
    public = sparse_inference.SparseMLP(arrays, meta, "scipy")
    np.testing.assert_allclose(public(images), expected, **_TOL)
    np.testing.assert_allclose(public(images[:1]), expected[:1], **_TOL)


def test_from_params_and_bad_inputs():
    flat = _mlp_params(0.9)
    model = sparse_inference.SparseMLP.from_params(flat, route="scipy")
    assert model(np.zeros((2, *_IMAGE), np.uint8)).shape == (2, 5)
    with pytest.raises(ValueError, match="values per image"):
        model(np.zeros((2, 5, 5, 1), np.uint8))
    with pytest.raises(ValueError, match="route"):
        sparse_inference.SparseMLP.from_params(flat, route="magic")
    arrays, meta = sparse_export.compress({"Dense_0/kernel": np.zeros((4, 4), np.int8)})
    with pytest.raises(ValueError, match="floating-point"):
        sparse_inference.SparseMLP(arrays, meta)

"""Sparse CPU inference of an MLP export (a chain of Dense + ReLU layers on flattened uint8/255).

:class:`SparseMLP` runs straight from the compressed form of :mod:`jaxaccel.sparsity.export`
(no dense copy of a sparse kernel is made) through one of these routes:

``dense``  the dense-with-zeros chain under ``jax.jit``: the reference and the baseline.
``bcsr``   ``jax.experimental.sparse.BCSR`` of ``W^T``; on CPU it lowers to the
           ``cpu_csr_sparse_dense_ffi`` Eigen kernel (multi-threaded for large products).
``bcoo``   ``jax.experimental.sparse.BCOO`` of ``W^T``; lowers to a gather of ``nnz x batch``
           activations followed by a scatter-add.
``ell``    a jax gather kernel over an ELL layout (one row of column indices per output unit,
           padded to the longest row; an N:M kernel is an unpadded ELL with ``K*N/M`` slots).
``scipy``  SciPy CSR products in NumPy, with activations kept as ``(features, batch)`` so each
           product is one contiguous ``csr_matvec(s)`` call; large products are split by rows
           over threads (SciPy releases the GIL). The fastest route at batch 1 on CPU.

Layers whose stored form is ``dense`` (not sparse enough to be smaller) run as dense matmuls in
every route. Values must be floating point: int8 kernels need their scales, applied elsewhere.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from jaxaccel.sparsity import export as sparse_export

__all__ = ["SparseMLP", "ROUTES", "mlp_layers", "ell_from_csr"]

ROUTES = ("dense", "bcsr", "bcoo", "ell", "scipy")
_DENSE_RE = re.compile(r"^(?P<prefix>.*?)Dense_(?P<index>\d+)/kernel$")
# Below this many multiply-adds a product runs on the calling thread: a thread hand-off costs
# ~10-50 us, more than the whole of a LeNet-300-100 layer at batch 1.
_THREAD_MIN_WORK = 1 << 20

try:  # The raw kernels behind csr_array @ x: no per-call validation, bias fused, row-splittable.
    from scipy.sparse import _sparsetools as _raw  # private (stable for years); public API is the fallback
    _RAW_CSR = callable(getattr(_raw, "csr_matvec", None)) and callable(getattr(_raw, "csr_matvecs", None))
except ImportError:  # pragma: no cover - depends on the SciPy build
    _raw, _RAW_CSR = None, False


def mlp_layers(meta: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """``[(kernel_name, bias_name or None), ...]`` of ``Dense_i`` layers in index order."""
    found = []
    for name in meta["tensors"]:
        match = _DENSE_RE.match(name)
        if match:
            bias = f"{match['prefix']}Dense_{match['index']}/bias"
            found.append((int(match["index"]), name, bias if bias in meta["tensors"] else None))
    if not found:
        raise ValueError("no Dense_i/kernel tensors: not an MLP export")
    return [(kernel, bias) for _, kernel, bias in sorted(found)]


def ell_from_csr(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(values, columns) of shape (rows, longest row), padded with value 0 at column 0."""
    counts = np.diff(indptr.astype(np.int64))
    width = int(counts.max(initial=0))
    rows = np.repeat(np.arange(counts.size), counts)
    slot = np.arange(values.size) - np.repeat(indptr[:-1].astype(np.int64), counts)
    ell_values = np.zeros((counts.size, width), values.dtype)
    ell_cols = np.zeros((counts.size, width), np.int32)
    ell_values[rows, slot] = values
    ell_cols[rows, slot] = indices
    return ell_values, ell_cols


class SparseMLP:
    """An MLP export run through one sparse route: ``model(images) -> logits`` (NumPy)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], route: str = "scipy",
                 threads: int | None = None):
        if route not in ROUTES:
            raise ValueError(f"route {route!r}: expected one of {ROUTES}")
        self.route = route
        self.layers = mlp_layers(meta)
        self.threads = threads or _available_cpus()
        self._pool: ThreadPoolExecutor | None = None
        tensors = meta["tensors"]
        self.input_features = tensors[self.layers[0][0]]["shape"][0]
        for kernel, _ in self.layers:
            info = tensors[kernel]
            stored = arrays[kernel if info["form"] == "dense" else f"{kernel}:values"].dtype
            if len(info["shape"]) != 2 or not jnp.issubdtype(stored, jnp.floating):  # bfloat16 too
                raise ValueError(f"{kernel}: need a 2-D floating-point kernel, got {info['dtype']} {info['shape']}")
        build = self._build_scipy if route == "scipy" else self._build_jax
        self._forward: Callable[[Any], Any] = build(arrays, tensors)

    @classmethod
    def from_params(cls, flat_params: Mapping[str, np.ndarray], route: str = "scipy",
                    structure: Mapping[str, str] | None = None, **kwargs: Any) -> "SparseMLP":
        """Compress dense-with-zeros params (``{'Dense_0/kernel': ...}``) and build the route."""
        arrays, meta = sparse_export.compress(flat_params, structure)
        return cls(arrays, meta, route, **kwargs)

    def forward(self, images: Any) -> Any:
        """Logits as the route produces them: a jax Array (not yet ready) or a NumPy array."""
        # Checked here because SciPy's raw kernels trust the lengths they are given.
        if images.ndim < 2 or images.size != images.shape[0] * self.input_features:
            raise ValueError(f"expected images [N, ...] with {self.input_features} values per image, "
                             f"got shape {tuple(images.shape)}")
        return self._forward(images)

    def __call__(self, images: Any) -> np.ndarray:
        return np.asarray(self.forward(images))

    # ---------------------------------------------------------------------------- jax routes
    def _build_jax(self, arrays: Mapping[str, np.ndarray], tensors: Mapping[str, Any]) -> Callable:
        import jax
        from jax.experimental import sparse as jsparse

        kinds, params = [], []
        for kernel, bias in self.layers:
            info = tensors[kernel]
            out = info["shape"][1]
            b = jnp.asarray(arrays[bias]) if bias else jnp.zeros((out,), info["dtype"])
            if info["form"] == "dense" or self.route == "dense":
                kinds.append("dense")
                params.append((jnp.asarray(sparse_export.decompress_one(arrays, kernel, info)), b))
            elif self.route == "ell":
                if info["form"] == "nm":  # already an ELL without padding
                    vals, cols = sparse_export.nm_ell(arrays, kernel, info)
                else:
                    vals, cols = ell_from_csr(*sparse_export.csr_arrays(arrays, kernel, info))
                kinds.append("ell")
                params.append(((jnp.asarray(cols), jnp.asarray(vals)), b))
            else:
                values, indices, indptr = sparse_export.csr_arrays(arrays, kernel, info)
                # The CPU FFI kernel wants int32 indices and indptr of one dtype (else it falls back).
                indices, indptr = indices.astype(np.int32), indptr.astype(np.int32)
                shape = (out, info["shape"][0])  # W^T: rows are output units
                if self.route == "bcsr":
                    mat = jsparse.BCSR((jnp.asarray(values), jnp.asarray(indices), jnp.asarray(indptr)),
                                       shape=shape, indices_sorted=True, unique_indices=True)
                else:
                    rows = np.repeat(np.arange(out, dtype=np.int32), np.diff(indptr))
                    mat = jsparse.BCOO((jnp.asarray(values), jnp.asarray(np.stack([rows, indices], 1))),
                                       shape=shape, indices_sorted=True, unique_indices=True)
                kinds.append("sparse")
                params.append((mat, b))
        fn = jax.jit(partial(_jax_chain, tuple(kinds)))
        params = tuple(params)
        return lambda images: fn(params, images)

    # ---------------------------------------------------------------------------- scipy route
    def _build_scipy(self, arrays: Mapping[str, np.ndarray], tensors: Mapping[str, Any]) -> Callable:
        import scipy.sparse

        layers = []
        for kernel, bias in self.layers:
            info = tensors[kernel]
            out = info["shape"][1]
            # float32 throughout: SciPy's kernels need one dtype for weights and activations, and
            # the jax routes compute in float32 too.
            b = np.asarray(arrays[bias], np.float32) if bias else np.zeros((out,), np.float32)
            if info["form"] == "dense":
                layers.append(("dense", np.ascontiguousarray(arrays[kernel].T, np.float32), b))
            else:
                values, indices, indptr = sparse_export.csr_arrays(arrays, kernel, info)
                mat = scipy.sparse.csr_array(
                    (values.astype(np.float32), indices.astype(np.int32), indptr.astype(np.int32)), shape=(out, info["shape"][0]))
                layers.append(("csr", mat, b))
        self._scipy_layers = layers
        return self._scipy_forward

    def _scipy_forward(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        batch = images.shape[0]
        # Features-major (in, batch): every CSR row then updates one contiguous run of `batch`.
        x = images.reshape(batch, -1).T.astype(np.float32, order="C") / 255.0
        if batch == 1:
            x = x.reshape(-1)
        for i, (kind, w, b) in enumerate(self._scipy_layers):
            if kind == "dense":
                y = w @ x
                y += b if batch == 1 else b[:, None]
            else:
                y = self._csr_product(w, b, x)
            x = np.maximum(y, 0, out=y) if i < len(self._scipy_layers) - 1 else y
        return x.reshape(1, -1) if batch == 1 else np.ascontiguousarray(x.T)

    def _csr_product(self, mat: Any, bias: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``mat @ x + bias`` (bias per row), with x of shape (in,) or (in, batch)."""
        if not _RAW_CSR:
            y = mat @ x
            y += bias if x.ndim == 1 else bias[:, None]
            return y
        rows, cols = mat.shape
        # The raw kernels accumulate into y, so starting from the bias fuses the bias add.
        if x.ndim == 1:
            y = bias.copy()
        else:
            y = np.empty((rows, x.shape[1]), np.float32)
            y[...] = bias[:, None]
        if self.threads < 2 or mat.nnz * (1 if x.ndim == 1 else x.shape[1]) < _THREAD_MIN_WORK:
            _raw_rows(mat, 0, rows, cols, x, y)
            return y
        # Split rows into chunks of about equal nonzeros; chunks write disjoint rows of y.
        cuts = np.searchsorted(mat.indptr, np.linspace(0, mat.nnz, self.threads + 1)[1:-1])
        bounds = [0, *map(int, cuts), rows]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads)
        list(self._pool.map(lambda r: _raw_rows(mat, r[0], r[1], cols, x, y), zip(bounds[:-1], bounds[1:])))
        return y


def _available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _raw_rows(mat: Any, start: int, stop: int, cols: int, x: np.ndarray, y: np.ndarray) -> None:
    """y[start:stop] += mat[start:stop] @ x via SciPy's C++ kernels (indptr offsets are absolute)."""
    if stop <= start:
        return
    indptr = mat.indptr if (start, stop) == (0, mat.shape[0]) else mat.indptr[start:stop + 1]
    if x.ndim == 1:
        _raw.csr_matvec(stop - start, cols, indptr, mat.indices, mat.data, x, y[start:stop])
    else:
        _raw.csr_matvecs(stop - start, cols, x.shape[1], indptr, mat.indices, mat.data,
                         x.reshape(-1), y[start:stop].reshape(-1))


def _jax_chain(kinds: tuple[str, ...], params: tuple, images: Any) -> Any:
    """The MLP forward pass; ``kinds[i]`` says how layer i's kernel is held."""
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
    for i, (kind, (w, b)) in enumerate(zip(kinds, params)):
        if kind == "dense":
            y = x @ w
        elif kind == "ell":
            cols, vals = w
            y = jnp.einsum("bol,ol->bo", x[:, cols], vals)  # gather (batch, out, slots), reduce
        else:  # BCSR / BCOO of W^T: sparse @ dense is the product jax.experimental.sparse lowers
            y = (w @ x.T).T
        y = y + b
        x = jnp.maximum(y, 0) if i < len(kinds) - 1 else y
    return x

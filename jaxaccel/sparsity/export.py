"""Compressed, exact storage forms for pruned kernels.

:func:`compress` turns a flat ``{'Dense_0/kernel': array, ...}`` dict into the arrays to store
(``np.savez`` keys) and a JSON-able description; :func:`decompress` inverts it bit for bit.

Every kernel (any array with ``ndim >= 2``) is viewed as a 2-D matrix ``W2`` of shape
``(out, K)``: row ``o`` holds the weights feeding output unit ``o``, its columns are the
contracting entries in memory order (``in`` for a Dense kernel ``(in, out)``; ``kh, kw, in`` for a
conv kernel ``(kh, kw, in, out)``, so ``in`` varies fastest). That orientation is the one sparse
inference wants (one row per output = CSR of ``W^T``), and it makes groups of ``M`` consecutive
columns exactly the groups of ``M`` along the input-channel axis when ``in % M == 0``.

Forms, the smallest exact one is chosen per kernel:

``dense``  the array as is (key ``name``).
``csr``    ``name:values`` (nnz,), ``name:indices`` (nnz,) column of each value,
           ``name:indptr`` (out + 1,) row starts; index arrays are int16 when they fit, else int32.
``nm``     every group of ``M`` consecutive columns has at most ``N`` nonzeros:
           ``name:values`` (out, K/M*N) the ``N`` kept entries per group (in position order,
           padded with the group's own zero entries), ``name:positions`` their in-group positions,
           ``ceil(log2 M)`` bits each, little-endian bit-packed into uint8 (2 bits for M=4).

Zero means an all-zero bit pattern, so ``-0.0`` (and NaN) are kept as values and the round trip
is bitwise. Values keep their dtype, so int8 kernels (with scales stored elsewhere) round-trip.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Any, Mapping

import numpy as np

__all__ = ["compress", "decompress", "nbytes", "decompress_one", "csr_arrays", "nm_ell", "pack_positions",
           "unpack_positions", "FORMAT_VERSION", "FORMS"]

FORMAT_VERSION = 1
FORMS = ("dense", "csr", "nm")
_AUTO_M = (2, 4, 8, 16)  # group sizes tried when no structure is declared
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


# ------------------------------------------------------------------------------------ helpers
def _nonzero(a: np.ndarray) -> np.ndarray:
    """Mask of entries whose bit pattern is not all zeros (keeps -0.0 and NaN as values)."""
    if a.dtype.itemsize in (1, 2, 4, 8):
        return a.view(np.dtype(f"u{a.dtype.itemsize}")) != 0
    return a != 0  # exotic widths (complex128...): value test is the best available


def _to_2d(kernel: np.ndarray) -> np.ndarray:
    """(..., in, out) -> (out, prod(...) * in), rows = output units."""
    return np.ascontiguousarray(np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1))


def _from_2d(w2: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(w2.reshape(shape[-1], *shape[:-1]), 0, -1))


def _index_dtype(max_value: int) -> np.dtype:
    """Smallest of int16/int32 holding 0..max_value (signed: what BCSR/scipy expect)."""
    return np.dtype(np.int16) if max_value <= np.iinfo(np.int16).max else np.dtype(np.int32)


def _bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def pack_positions(positions: np.ndarray, bits: int) -> np.ndarray:
    """Pack small unsigned ints (< 2**bits) into a uint8 stream, little-endian bit order."""
    flat = positions.reshape(-1).astype(np.uint8)
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_positions(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_positions`: ``count`` uint8 values."""
    planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


def _parse_structure(spec: str | None) -> tuple[str, tuple[int, int] | None]:
    """'dense' | 'csr' | 'unstructured' | 'N:M' | None (auto) -> (kind, (n, m) or None)."""
    if spec is None or spec in ("auto", ""):
        return "auto", None
    if spec in ("dense", "csr", "unstructured"):
        return spec, None
    match = _NM_RE.match(spec)
    if not match or not 1 <= int(match[1]) <= int(match[2]) or int(match[2]) < 2:
        raise ValueError(f"structure {spec!r}: expected 'dense', 'csr', 'unstructured' or 'N:M'")
    return "nm", (int(match[1]), int(match[2]))


def _nm_needed(mask2: np.ndarray, m: int) -> int:
    """Largest nonzero count over groups of m consecutive columns."""
    return int(mask2.reshape(mask2.shape[0], -1, m).sum(axis=-1).max(initial=0))


# ------------------------------------------------------------------------------ compression
def _csr(name: str, w2: np.ndarray, mask2: np.ndarray) -> dict[str, np.ndarray]:
    counts = mask2.sum(axis=1)
    nnz = int(counts.sum())
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(_index_dtype(nnz))
    cols = np.nonzero(mask2)[1].astype(_index_dtype(w2.shape[1] - 1))  # row-major: sorted per row
    return {f"{name}:values": w2[mask2], f"{name}:indices": cols, f"{name}:indptr": indptr}


def _nm(name: str, w2: np.ndarray, mask2: np.ndarray, n: int, m: int) -> dict[str, np.ndarray]:
    out = w2.shape[0]
    groups, gmask = w2.reshape(out, -1, m), mask2.reshape(out, -1, m)
    # Nonzeros first (stable: in position order), then the group's zeros as padding; padding
    # with real zero entries keeps the n positions distinct, so decompression is a plain scatter.
    order = np.argsort(~gmask, axis=-1, kind="stable")[..., :n]
    positions = np.sort(order, axis=-1)
    values = np.take_along_axis(groups, positions, axis=-1)
    return {f"{name}:values": values.reshape(out, -1),
            f"{name}:positions": pack_positions(positions, _bits(m))}


def _choose(kernel: np.ndarray, spec: str | None, name: str) -> tuple[str, int, int]:
    """(form, n, m) of the smallest exact form allowed by the declared structure."""
    kind, nm = _parse_structure(spec)
    if kernel.ndim < 2 or kernel.size == 0 or kind == "dense":
        return "dense", 0, 0
    itemsize = kernel.dtype.itemsize
    mask2 = _nonzero(_to_2d(kernel))
    out, k = mask2.shape
    nnz = int(mask2.sum())
    sizes: dict[tuple[str, int, int], int] = {("dense", 0, 0): kernel.nbytes}
    sizes[("csr", 0, 0)] = (nnz * (itemsize + _index_dtype(k - 1).itemsize)
                            + (out + 1) * _index_dtype(nnz).itemsize)
    if kind == "csr":
        return "csr", 0, 0
    if kind == "nm":
        n, m = nm
        if kernel.shape[-2] % m or _nm_needed(mask2, m) > n:
            warnings.warn(f"{name}: declared {n}:{m} does not hold along the contracting axis "
                          f"(shape {kernel.shape}); choosing the form automatically", stacklevel=3)
            kind = "auto"
        else:
            slots = out * (k // m) * n
            sizes[("nm", n, m)] = slots * itemsize + math.ceil(slots * _bits(m) / 8)
    if kind == "auto":
        for m in _AUTO_M:
            if kernel.shape[-2] % m == 0:
                n = max(_nm_needed(mask2, m), 1)
                if n < m:
                    slots = out * (k // m) * n
                    sizes[("nm", n, m)] = slots * itemsize + math.ceil(slots * _bits(m) / 8)
    # min() keeps the first of equal sizes: dense, then csr, then nm in order of insertion.
    return min(sizes, key=sizes.__getitem__)


def compress(flat_params: Mapping[str, np.ndarray],
             structure: Mapping[str, str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Smallest exact stored form of each tensor.

    ``structure`` optionally maps a param name to ``'dense'`` (keep dense), ``'csr'`` (force CSR),
    ``'unstructured'`` (dense or CSR, no N:M search) or ``'N:M'`` such as ``'2:4'`` (consider that
    packing; if it does not hold the form is chosen automatically, with a warning). Names not in it
    are automatic: dense, CSR or N:M for M in {2, 4, 8, 16}, whichever is smallest. Arrays with
    ``ndim < 2`` (biases, per-channel scales) stay dense.

    Returns ``(arrays, meta)``: ``arrays`` for ``np.savez``; ``meta`` JSON-able, with per-tensor
    ``form``, ``shape``, ``dtype`` (and ``n``, ``m``, ``bits`` for N:M, ``nnz`` for CSR).
    """
    structure = structure or {}
    arrays: dict[str, np.ndarray] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for name, value in flat_params.items():
        value = np.asarray(value)
        form, n, m = _choose(value, structure.get(name), name)
        info: dict[str, Any] = {"form": form, "shape": list(value.shape), "dtype": value.dtype.name}
        if form == "dense":
            part = {name: value}
        else:
            w2 = _to_2d(value)
            mask2 = _nonzero(w2)
            if form == "csr":
                part = _csr(name, w2, mask2)
                info["nnz"] = int(part[f"{name}:values"].size)
            else:
                part = _nm(name, w2, mask2, n, m)
                info.update(n=n, m=m, bits=_bits(m))
        info["keys"] = sorted(part)
        info["nbytes"] = nbytes(part)
        arrays.update(part)
        tensors[name] = info
    return arrays, {"sparse_format_version": FORMAT_VERSION, "tensors": tensors}


# ---------------------------------------------------------------------------- decompression
def csr_arrays(arrays: Mapping[str, np.ndarray], name: str, info: Mapping[str, Any]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, indices, indptr) of the (out, K) view of a csr- or nm-form tensor.

    For N:M the padding slots (all-zero bit patterns) are dropped, so the result is the same CSR
    :func:`compress` would have produced.
    """
    if info["form"] == "csr":
        return arrays[f"{name}:values"], arrays[f"{name}:indices"], arrays[f"{name}:indptr"]
    if info["form"] != "nm":
        raise ValueError(f"{name}: form {info['form']!r} has no CSR view")
    values, cols = nm_ell(arrays, name, info)
    keep = _nonzero(values)
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    k = values.shape[1] // info["n"] * info["m"]
    return (values[keep], cols[keep].astype(_index_dtype(k - 1)),
            indptr.astype(_index_dtype(int(indptr[-1]))))


def nm_ell(arrays: Mapping[str, np.ndarray], name: str, info: Mapping[str, Any]
           ) -> tuple[np.ndarray, np.ndarray]:
    """(values, columns), both (out, K/M*N): the N:M form as an unpadded ELL matrix."""
    n, m = info["n"], info["m"]
    values = arrays[f"{name}:values"]
    out, slots = values.shape
    pos = unpack_positions(arrays[f"{name}:positions"], info["bits"], out * slots)
    cols = (np.arange(slots, dtype=np.int32) // n * m)[None, :] + pos.reshape(out, slots)
    return values, cols.astype(np.int32)


def decompress_one(arrays: Mapping[str, np.ndarray], name: str, info: Mapping[str, Any]) -> np.ndarray:
    """The dense array of one tensor described by ``info`` (an entry of ``meta['tensors']``)."""
    shape = tuple(info["shape"])
    if info["form"] == "dense":
        return np.asarray(arrays[name])
    out, k = shape[-1], math.prod(shape[:-1])
    values = np.asarray(arrays[f"{name}:values"])
    w2 = np.zeros((out, k), dtype=values.dtype)
    if info["form"] == "csr":
        indptr = np.asarray(arrays[f"{name}:indptr"], dtype=np.int64)
        rows = np.repeat(np.arange(out), np.diff(indptr))
        w2[rows, arrays[f"{name}:indices"]] = values
    elif info["form"] == "nm":
        values, cols = nm_ell(arrays, name, info)
        np.put_along_axis(w2, cols, values, axis=1)  # positions in a group are distinct
    else:
        raise ValueError(f"{name}: unknown form {info['form']!r}")
    return _from_2d(w2, shape)


def decompress(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Exact inverse of :func:`compress`: ``{name: dense array}`` in the original order."""
    if meta.get("sparse_format_version") != FORMAT_VERSION:
        raise ValueError(f"sparse format version {meta.get('sparse_format_version')}; "
                         f"this jaxaccel reads {FORMAT_VERSION}")
    return {name: decompress_one(arrays, name, info) for name, info in meta["tensors"].items()}


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the stored arrays (what the compressed form really costs, without npz headers)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))

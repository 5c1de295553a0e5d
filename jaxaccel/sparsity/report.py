"""Measured sparsity of a parameter tree: exact zeros counted from the values, never the target.

    report(params, cfg) == {"sparsity": zeros / size over all prunable leaves,
                            "sparsity/<path>": zeros / size of that leaf, ...,
                            "prunable_params": size, "zero_params": zeros}

Works on NumPy arrays and on (fully addressable) jax arrays; the values are fetched to the host.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxaccel import paths
from jaxaccel.sparsity import masks as masks_lib

__all__ = ["report"]


def report(params: Any, cfg: Any = None) -> dict[str, Any]:
    """Overall and per-leaf fraction of exact zeros over the leaves ``cfg.include`` /
    ``cfg.exclude`` make prunable (without ``cfg``: the kernels), see the module doc."""
    prunable = (masks_lib.prunable_tree(params) if cfg is None
                else masks_lib.prunable_tree(params, cfg.include, cfg.exclude))
    out: dict[str, Any] = {}
    zeros = total = 0
    for (path, leaf), keep in zip(paths.named_leaves(params), jax.tree.leaves(prunable)):
        if not keep:
            continue
        value = np.asarray(jax.device_get(leaf))
        z = int(value.size - np.count_nonzero(value))
        out[f"sparsity/{path}"] = z / value.size if value.size else 0.0
        zeros, total = zeros + z, total + value.size
    out["sparsity"] = zeros / total if total else 0.0
    out["prunable_params"] = total
    out["zero_params"] = zeros
    return out

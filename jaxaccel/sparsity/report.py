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

from jaxaccel.sparsity import masks as masks_lib

__all__ = ["prunable_mask_tree", "report"]


def prunable_mask_tree(params: Any, cfg: Any = None) -> Any:
    """Tree of Python bools: which leaves ``cfg.include`` / ``cfg.exclude`` make prunable
    (default: paths ending in ``kernel``, i.e. Dense/Conv kernels)."""
    include = (r"kernel$",) if cfg is None else tuple(cfg.include)
    exclude = () if cfg is None else tuple(cfg.exclude)
    return masks_lib.prunable_tree(params, include, exclude)


def report(params: Any, cfg: Any = None) -> dict[str, Any]:
    """Overall and per-leaf fraction of exact zeros over the prunable leaves (see module doc)."""
    flags = jax.tree.leaves(prunable_mask_tree(params, cfg))
    out: dict[str, Any] = {}
    zeros = total = 0
    for path, leaf, keep in zip(masks_lib.leaf_paths(params), jax.tree.leaves(params), flags):
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

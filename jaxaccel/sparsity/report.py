"""Measured sparsity of a parameter tree: exact zeros counted from the values, never the target.

    report(params, cfg) == {"sparsity": zeros / size over all prunable leaves,
                            "sparsity/<path>": zeros / size of that leaf, ...,
                            "prunable_params": size, "zero_params": zeros}

Works on NumPy arrays and on jax arrays, also sharded over several processes (FSDP): those are
counted where they live and only one int32 per leaf reaches the host (``parallel.zero_counts``),
so every process must call it at the same point.
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
    from jaxaccel.parallel import zero_counts
    selected = prunable_mask_tree(params, cfg)
    flags = jax.tree.leaves(selected)
    counts = iter(zero_counts(params, selected))
    out: dict[str, Any] = {}
    zeros = total = 0
    for path, leaf, keep in zip(masks_lib.leaf_paths(params), jax.tree.leaves(params), flags):
        if not keep:
            continue
        z, size = next(counts), int(np.size(leaf))
        out[f"sparsity/{path}"] = z / size if size else 0.0
        zeros, total = zeros + z, total + size
    out["sparsity"] = zeros / total if total else 0.0
    out["prunable_params"] = total
    out["zero_params"] = zeros
    return out

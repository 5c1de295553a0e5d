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

from jaxaccel import paths
from jaxaccel.parallel import zero_counts
from jaxaccel.sparsity import masks as masks_lib

__all__ = ["report"]


def report(params: Any, cfg: Any = None) -> dict[str, Any]:
    """Overall and per-leaf fraction of exact zeros over the leaves ``cfg.include`` /
    ``cfg.exclude`` make prunable (without ``cfg``: the kernels), see the module doc."""
    prunable = (masks_lib.prunable_tree(params) if cfg is None
                else masks_lib.prunable_tree(params, cfg.include, cfg.exclude))
    counts = iter(zero_counts(params, prunable))  # on device: an evaluation copies no state to the host
    out: dict[str, Any] = {}
    zeros = total = 0
    for (path, leaf), keep in zip(paths.named_leaves(params), jax.tree.leaves(prunable)):
        if not keep:
            continue
        z, size = next(counts), int(np.size(leaf))
        out[f"sparsity/{path}"] = z / size if size else 0.0
        zeros, total = zeros + z, total + size
    out["sparsity"] = zeros / total if total else 0.0
    out["prunable_params"] = total
    out["zero_params"] = zeros
    return out

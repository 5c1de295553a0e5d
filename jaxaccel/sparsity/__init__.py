"""Sparsity: mask calculators, pruning schedules, dynamic sparse training, penalties, reports.

The trainer needs four calls (all pure; the transform is plain optax and jittable):

    tx = make_sparsity(cfg.sparsity, make_optimizer(cfg.optim, total), total, seed=cfg.seed)
    loss = task_loss + penalty(cfg.sparsity, params)        # 0.0 unless cfg.sparsity.penalty is set
    report(params, cfg.sparsity)                            # {'sparsity': ..., 'sparsity/<path>': ...}
    find_masks(state.opt_state)                             # the masks, for export (or None)

``sparsity.shrink`` (structure=channel) removes fully pruned units from the model mid-run:
:mod:`jaxaccel.sparsity.shrink` (its surgeon is chosen in :func:`jaxaccel.surgeons.surgeons`).
"""
from jaxaccel.sparsity.dst import drop_and_grow, drop_fraction, dst_masks, is_dst_update_step
from jaxaccel.sparsity.masks import (
    apply_masks, block_mask, block_masks, channel_mask, channel_masks, compute_masks, nm_layout, unbox,
    global_unstructured_masks, keep_top, magnitude_masks, nm_mask, nm_masks,
    prunable_tree, random_masks, saliency_masks, structured_mask, unstructured_mask,
)
from jaxaccel.sparsity.penalties import group_norms, penalty
from jaxaccel.sparsity.report import report
from jaxaccel.sparsity.schedules import (
    erk_densities, is_update_step, layer_sparsities, polynomial_sparsity, sparsity_fraction,
)
from jaxaccel.sparsity.transform import (
    EarlyBirdState, SparsityState, SparsityWarning, changes_masks, early_bird_record, early_bird_state, find_masks,
    make_sparsity, map_param_trees, mask_update_due, schedule_steps, sparsity_count, unit_masks,
)
from jaxaccel.sparsity.methods import METHODS, DynamicSparse, NoSparsity, Pruning, SparsityConfig
# jaxaccel.sparsity.shrink (the channel-shrinking surgeon) is imported where it is used: it needs
# jaxaccel.surgery, which needs the config, which needs this package.

__all__ = [
    "make_sparsity", "SparsityState", "SparsityWarning", "find_masks", "map_param_trees", "mask_update_due", "sparsity_count",
    "changes_masks", "unit_masks", "penalty", "group_norms", "EarlyBirdState", "early_bird_state", "early_bird_record",
    "report", "prunable_tree", "compute_masks", "apply_masks", "nm_layout", "unbox",
    "keep_top", "unstructured_mask", "nm_mask", "block_mask", "channel_mask", "structured_mask",
    "global_unstructured_masks", "magnitude_masks", "random_masks", "saliency_masks", "nm_masks",
    "block_masks", "channel_masks", "polynomial_sparsity", "sparsity_fraction", "is_update_step",
    "erk_densities", "layer_sparsities", "schedule_steps",
    "SparsityConfig", "NoSparsity", "Pruning", "DynamicSparse", "METHODS",
    "drop_fraction", "drop_and_grow", "dst_masks", "is_dst_update_step",
]

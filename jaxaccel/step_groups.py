"""Compiled groups of training steps, and the non-finite guard that decides how they run.

The loop asks for ``count`` steps from batch ``position`` of an epoch; :class:`StepGroups` runs them
as one or more compiled calls (a device loop, or unrolled blocks) and owns both guards:

- ``precision.guard=step``: every step tests its loss and gradients and skips a non-finite one.
- ``precision.guard=rollback``: a group runs without the per-step test, from a copy of its start
  state; only a group that met a non-finite value is run again, with the per-step test, which
  skips exactly the non-finite steps. The per-step selects made XLA:CPU copy the optimizer state
  every step (benchmarks/README.md, "Non-finite guard").

A group in which no sparsity-mask update is due runs a variant of the optimizer without the
mask-update branch (same state), which XLA:CPU otherwise pays for even when it is not taken.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel import precision as prec
from jaxaccel import sparsity
from jaxaccel import step as step_lib
from jaxaccel.config import Config
from jaxaccel.optim import build_optimizer, make_schedule
from jaxaccel.parallel import local_copy
from jaxaccel.plan import Plan, compiler_options

__all__ = ["StepGroups", "make_step_fn"]


def make_step_fn(cfg: Config, apply_fn: Callable, tx, total_steps: int, axis_name: str | None) -> Callable:
    """``train_step`` bound to the model, the optimizer and the options of ``cfg``."""
    uses_penalty = cfg.sparsity.penalty != "none" and cfg.sparsity.penalty_weight > 0
    return functools.partial(
        step_lib.train_step, apply_fn=apply_fn, tx=tx, learning_rate=make_schedule(cfg.optim, total_steps),
        label_smoothing=cfg.train.label_smoothing, axis_name=axis_name,
        penalty=(functools.partial(sparsity.penalty, cfg.sparsity, norms=cfg.model.unit_norms())
                 if uses_penalty else None),
        precision=cfg.precision if cfg.precision.params != "float32" else None,
        quant_start_step=cfg.quant.start if cfg.quant.mode == "qat" else None,
        augment=cfg.augment if cfg.augment.enabled else None)


class StepGroups:
    """The compiled step groups of one run. Call :meth:`compile` once, then :meth:`run`."""

    def __init__(self, cfg: Config, plan: Plan, parallel: Any, apply_fn: Callable, step_key: jax.Array,
                 serialize_calls: bool):
        self.cfg, self.plan, self.parallel = cfg, plan, parallel
        self.apply_fn, self.step_key, self.serialize_calls = apply_fn, step_key, serialize_calls
        self.rollback = plan.guard == "rollback"
        self.tx = build_optimizer(cfg, plan.total_steps)  # with the per-step guard: builds and restores states

    def _variants(self) -> list[tuple[int | None, dict[str, Any]]]:
        """``(key, make_train_steps options)`` of each compiled group: the device loop (one, or one
        per call length with a static trip count), or unrolled blocks of K and of 1 step."""
        plan = self.plan
        if plan.loop == "unroll":
            return [(k, {"unroll": k}) for k in sorted({1, plan.steps_per_call})]
        if plan.static_trip_count:
            return [(n, {"unroll": None, "trip_count": n}) for n in plan.compiled_lengths()]
        return [(None, {"unroll": None})]

    def _compile_groups(self, tx, args: Callable[[int], tuple]) -> dict[int | None, Any]:
        step_fn = make_step_fn(self.cfg, self.apply_fn, tx, self.plan.total_steps, self.parallel.axis_name)
        options = compiler_options(self.cfg, jax.default_backend())
        compiled = {}
        for key, variant in self._variants():
            fn = step_lib.make_train_steps(step_fn, batch_size=self.cfg.train.batch_size,
                                           batch_sharding=self.parallel.batch_sharding, step_key=self.step_key,
                                           axis_name=self.parallel.axis_name, streamed=self.streamed, **variant)
            fn_args = args(key or 1)
            if "trip_count" in variant:  # the sums a group starts from: zeros, made on the devices once
                if self._zero_sums is None:
                    zeros = self.parallel.compile(fn.initial_sums, fn_args[:-1], donate=False)
                    self._zero_sums = zeros(*fn_args[:-1])
                fn_args = (*fn_args, self._zero_sums)
            compiled[key] = self.parallel.compile(fn, fn_args, options=options)
        return compiled

    def compile(self, state, data) -> None:
        """Ahead-of-time compile the groups the run starts with (the guarded rerun lazily).
        ``data``: the run's feed (jaxaccel.feed), or the resident ``(inputs, labels, perm)``."""
        feed = _Gathered(data) if isinstance(data, tuple) else data
        self.streamed, self._zero_sums = getattr(feed, "streamed", False), None
        if self.streamed and self.plan.loop == "device_loop" and not self.plan.static_trip_count:
            raise ValueError("streamed batches are stacked per call: the plan needs static_trip_count=True")
        args = lambda n: (state, *feed.example_args(n), np.int32(n))  # noqa: E731
        if not self.rollback:
            self.groups, self.fixed_mask_groups = self._compile_groups(self.tx, args), None
            return
        total = self.plan.total_steps
        self.groups = self._compile_groups(build_optimizer(self.cfg, total, assume_finite=True), args)
        self.fixed_mask_groups = (
            self._compile_groups(build_optimizer(self.cfg, total, assume_finite=True, refresh=False), args)
            if sparsity.changes_masks(self.cfg.sparsity) else None)
        self._guarded_groups = functools.cache(lambda: self._compile_groups(self.tx, args))
        # Compiled here, not at their first call: that call is inside the timed training loop (and,
        # after a model change, would compile again for the new shapes there).
        self._copy_state = jax.jit(lambda s: jax.tree.map(jnp.copy, s)).lower(state).compile()
        self._state_finite = jax.jit(
            lambda s: prec.all_finite((s.params, s.opt_state, s.model_state))).lower(state).compile()

    def flops_per_step(self) -> float | None:
        """Model FLOPs of one training step from XLA's cost analysis of a compiled group (the
        one-step group when unrolled; a device loop's body is counted once). None if unavailable."""
        compiled = self.groups[1] if 1 in self.groups else next(iter(self.groups.values()))
        try:
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
            return float(cost["flops"]) if cost and cost.get("flops", -1) > 0 else None
        except Exception:  # noqa: BLE001 - a backend without cost analysis reports no FLOP rate
            return None

    def run(self, state, data, position: int, count: int):
        """Run ``count`` steps from batch ``position``; returns the state and summed measurements.
        ``data``: the group's batches (``feed.group(...)``), or the resident ``(inputs, labels, perm)``.

        With the rollback guard the group waits for its end (one sync per group, not per step)."""
        data = _Gathered(data) if isinstance(data, tuple) else data
        if not self.rollback:
            return self._run_steps(self.groups, state, data, position, count)
        start = self._copy_state(state)
        groups = self.groups if self._mask_update_due(state, count) else self.fixed_mask_groups
        new, sums = self._run_steps(groups, state, data, position, count)
        finite_steps = float(self.parallel.host(sums["finite_steps"]))
        if finite_steps == count and bool(local_copy(self._state_finite(new))):
            return new, sums
        return self._run_steps(self._guarded_groups(), start, data, position, count)

    def _mask_update_due(self, state, count: int) -> bool:
        """Whether the sparsity masks may change in the next ``count`` updates (always True when
        there are no fixed-mask groups). Counts are the optimizer's, read from the state: in these
        untested groups every step is an update."""
        if self.fixed_mask_groups is None:
            return True
        first = int(self.parallel.host(sparsity.sparsity_count(state.opt_state)))
        due = sparsity.mask_update_due(self.cfg.sparsity, self.plan.total_steps, first + np.arange(count))
        return bool(np.any(np.asarray(due)))

    def _run_steps(self, groups, state, data, position: int, count: int):
        if self.plan.loop == "device_loop" and not self.plan.static_trip_count:
            state, sums = groups[None](state, *data.call_args(position, count), np.int32(count))
            return state, self._with_guard_state(state, sums)
        sums_all = self._zero_sums if self.plan.static_trip_count else None
        for n in self.plan.call_lengths(count):
            args = (state, *data.call_args(position, n), np.int32(n))
            if self.plan.static_trip_count:  # one loop continued: the sums carried through the calls
                state, sums_all = groups[n](*args, sums_all)
            else:
                state, sums = groups[n](*args)
                sums_all = sums if sums_all is None else step_lib.combine_measurements(sums_all, sums)
            if self.serialize_calls:
                jax.block_until_ready(state)
            position += n
        return state, self._with_guard_state(state, sums_all)

    @staticmethod
    def _with_guard_state(state, sums):
        """Add the loss scale at the group's end (a device value read one group later with the
        sums, so the host does not wait for it)."""
        # A copy: the state's own buffers are donated to the next call.
        return {**sums, "loss_scale": jnp.copy(prec.current_scale(state.opt_state))}


class _Gathered:
    """The resident path's call arguments: the whole split on device, gathered by ``perm``."""

    def __init__(self, data: tuple):
        self.data = data

    def example_args(self, n: int) -> tuple:
        return (*self.data, np.int32(0))

    def call_args(self, position: int, n: int) -> tuple:
        return (*self.data, np.int32(position))

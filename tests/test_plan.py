"""The step arithmetic: where step groups end, how long a run is, what the plan refuses."""
from __future__ import annotations

import dataclasses

import pytest

import jaxaccel
from jaxaccel.config import ConfigError
from jaxaccel.plan import Plan, make_plan


def _groups(plan: Plan, start: int = 0) -> list[int]:
    ends, step = [], start
    while step < plan.total_steps:
        step = plan.next_boundary(step)
        ends.append(step)
    return ends


def test_groups_end_at_log_points_epoch_ends_checkpoints_and_the_last_step():
    plan = Plan(steps_per_epoch=10, total_steps=25, loop="device_loop", steps_per_call=None, log_every=4,
                checkpoint_every=7)
    # Log points restart each epoch (4, 8 | 14, 18 | 24), epochs end at 10 and 20, checkpoints at 7, 14, 21.
    assert _groups(plan) == [4, 7, 8, 10, 14, 18, 20, 21, 24, 25]


def test_a_resumed_run_groups_its_steps_as_an_uninterrupted_one():
    plan = Plan(steps_per_epoch=468, total_steps=2000, loop="unroll", steps_per_call=10, log_every=100,
                checkpoint_every=250)
    full = _groups(plan)
    for resume_at in (250, 500, 1000):
        assert _groups(plan, resume_at) == [e for e in full if e > resume_at]


def test_device_loop_calls_are_capped_by_steps_per_call():
    plan = Plan(steps_per_epoch=100, total_steps=100, loop="device_loop", steps_per_call=30, log_every=100,
                checkpoint_every=1000)
    assert _groups(plan) == [30, 60, 90, 100]


def _cfg(*overrides):
    return jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"), list(overrides))


def test_length_in_epochs_or_steps_and_the_dropped_partial_batch():
    plan = make_plan(_cfg("train.epochs=3", "train.batch_size=128"), 60000, "cpu")
    assert (plan.steps_per_epoch, plan.total_steps) == (468, 1404)  # 60000 // 128, the rest dropped
    assert make_plan(_cfg("train.steps=50"), 60000, "cpu").total_steps == 50
    assert make_plan(_cfg("train.loop=unroll"), 60000, "cpu").steps_per_call == 10


def test_a_batch_larger_than_the_split_is_refused():
    with pytest.raises(ConfigError, match="train.batch_size=512 is larger than the training split"):
        make_plan(_cfg("train.batch_size=512"), 100, "cpu")


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_backend_defaults_are_decided_in_the_plan(backend):
    """model.conv=auto, precision.guard=auto and the device loop's trip count, per backend: the
    XLA:CPU choices (im2col, the rollback guard, a runtime trip count) only where measured."""
    cpu = backend == "cpu"
    cnn = make_plan(jaxaccel.experiments.get("mnist_cnn"), 60000, backend)
    assert (cnn.conv, cnn.guard, cnn.loop) == ("im2col" if cpu else "xla", "rollback" if cpu else "step", "device_loop")
    assert cnn.static_trip_count is not cpu
    fp16 = make_plan(jaxaccel.experiments.get("mnist_fp16"), 60000, backend)
    assert fp16.guard == "step"  # dynamic loss scaling overflows by design: test every step
    forced = make_plan(_cfg("precision.guard=rollback", "model.name=cnn", "model.conv=xla"), 60000, backend)
    assert forced.guard == "rollback" and forced.conv == "xla"
    assert forced.loop == ("unroll" if cpu else "device_loop")  # XLA:CPU's convs are slow in loop bodies


def test_group_lengths_are_the_distinct_groups():
    plan = Plan(steps_per_epoch=10, total_steps=25, loop="device_loop", steps_per_call=None, log_every=4,
                checkpoint_every=7)
    assert plan.group_lengths() == sorted({b - a for a, b in zip([0] + _groups(plan), _groups(plan))})
    assert plan.group_lengths() == [1, 2, 3, 4]


@pytest.mark.parametrize("count", [1, 7, 36, 64, 68, 100, 468])
def test_a_static_loop_runs_a_group_as_its_binary_decomposition(count):
    """With the trip count compiled in, a group's calls are the powers of two of its length,
    largest first; with a runtime count one call; unrolled, blocks of K then single steps."""
    static = Plan(10, 1000, "device_loop", None, 100, 1000, static_trip_count=True)
    calls = static.call_lengths(count)
    assert sum(calls) == count and calls == sorted(calls, reverse=True)
    assert all(n & (n - 1) == 0 for n in calls) and len(set(calls)) == len(calls) == bin(count).count("1")
    assert dataclasses.replace(static, static_trip_count=False).call_lengths(count) == [count]
    unrolled = dataclasses.replace(static, loop="unroll", steps_per_call=10, static_trip_count=False)
    assert unrolled.call_lengths(count) == [10] * (count // 10) + [1] * (count % 10)


def test_a_static_plan_compiles_one_loop_per_power_of_two_not_per_group_length():
    """mnist_sparse off CPU: 15 distinct group lengths (8 ... 100 steps) need 5 loops (4 ... 64)."""
    plan = make_plan(jaxaccel.experiments.get("mnist_sparse"), 60000, "tpu")
    assert len(plan.group_lengths()) == 15
    assert plan.compiled_lengths() == [4, 8, 16, 32, 64]

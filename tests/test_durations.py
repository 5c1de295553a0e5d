"""Durations: the grammar, the one conversion to steps, and resolve() over a whole config."""
from __future__ import annotations

import pytest

import jaxaccel
from jaxaccel import durations
from jaxaccel.config import ConfigError


@pytest.mark.parametrize("value, steps", [
    (0, 0), (1000, 1000), ("1000 steps", 1000), ("1 step", 1),
    ("2 epochs", 936), ("2ep", 936), ("1 epoch", 468), ("1.5 epochs", 702), (" 0.25ep ", 117),
    ("30%", 2808), ("100%", 9360), ("10.69%", 1000), ("64.11%", 6000), (".5%", 46),
])
def test_to_steps_at_468_steps_per_epoch_of_a_9360_step_run(value, steps):
    assert durations.to_steps(value, 468, 9360) == steps


def test_fractions_are_exact_and_round_down():
    # Decimal fractions are exact (no binary float error), then the step is floored: 29% of 100
    # steps is step 29 (0.29 * 100 is 28.999999999999996 in floats), 33.3% of 10 is step 3.
    assert durations.to_steps("29%", None, 100) == 29
    assert durations.to_steps("0.29%", None, 10000) == 29
    assert durations.to_steps("33.3%", None, 10) == 3


@pytest.mark.parametrize("value", [-1, 0.5, "0.5", "2 weeks", "1.5 steps", "101%", "", "epochs", True, None])
def test_what_is_not_a_duration_is_refused(value):
    with pytest.raises(ValueError):
        durations.parse(value)


def test_epochs_need_the_epoch_length():
    with pytest.raises(ValueError, match="in epochs"):
        durations.to_steps("2 epochs", None, 1000)


def test_resolve_turns_every_duration_into_steps_and_keeps_the_given_config():
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_sparse_qat"), [
        "sparsity.start=2ep", "sparsity.end=50%", "sparsity.update_every=1 epoch", "quant.start=25%"])
    resolved = durations.resolve(cfg, steps_per_epoch=100, total_steps=2000)
    assert (resolved.sparsity.start, resolved.sparsity.end, resolved.sparsity.update_every) == (200, 1000, 100)
    assert resolved.quant.start == 500 and resolved.sparsity.threshold_at == 1800  # the default, 90%
    assert cfg.sparsity.start == "2ep" and cfg.quant.start == "25%"  # the config as written is unchanged
    assert resolved.model == cfg.model and resolved.train == cfg.train


def test_resolve_refuses_more_steps_than_a_step_counter_holds():
    cfg = jaxaccel.experiments.get("mnist_mlp")
    with pytest.raises(ConfigError, match="more than the 2147483647"):
        durations.resolve(cfg, 10 ** 9, 10 ** 10)


@pytest.mark.parametrize("overrides, total, needle", [
    # A schedule that cannot happen within the run names its keys (exit 2 from the CLI).
    (["sparsity.start=1000"], 500, "sparsity.start=1000 is at or after the end of this 500-step run"),
    (["sparsity.start=3 epochs"], 500, "sparsity.start='3 epochs' (step 600) is at or after the end"),
    (["sparsity.start=10%", "sparsity.end=400"], 300, "sparsity.end=400 is past the last step (299)"),
    (["sparsity.start=50%", "sparsity.end=1 epoch"], 1000, "sparsity.end='1 epoch' (step 200) is before sparsity.start='50%' (step 500)"),
    (["sparsity.start=0", "sparsity.end=50", "sparsity.update_every=100"], 1000,
     "sparsity.update_every=100 is longer than the schedule from sparsity.start to sparsity.end (steps 0..50)"),
    (["sparsity.update_every=0.01%"], 1000, "sparsity.update_every='0.01%' (step 0) is less than one step"),
    (["sparsity.schedule=periodic", "sparsity.end=75%", "sparsity.start=900"], 1000, "it would prune once"),
])
def test_impossible_pruning_schedules_are_config_errors(overrides, total, needle):
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_sparse"), overrides)
    with pytest.raises(ConfigError) as info:
        durations.resolve(cfg, steps_per_epoch=200, total_steps=total)
    assert needle in str(info.value)


@pytest.mark.parametrize("exp, overrides, needle", [
    ("mnist_rigl", ["sparsity.update_every=400", "sparsity.end=300"], "no drop-and-grow step falls between"),
    ("mnist_rigl", ["sparsity.end=1200"], "sparsity.end=1200 is past the last step"),
    ("mnist_l1", ["sparsity.threshold_at=1000"], "sparsity.threshold_at=1000 is past the last step (999)"),
    ("mnist_qat", ["quant.start=100%"], "quant.start='100%' (step 1000) is at or after the end"),
    ("cifar10_resnet", ["optim.warmup=5 epochs"], "optim.warmup='5 epochs' (step 1000) is the whole 1000-step run"),
])
def test_other_points_outside_the_run_are_config_errors(exp, overrides, needle):
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get(exp), overrides)
    with pytest.raises(ConfigError) as info:
        durations.resolve(cfg, steps_per_epoch=200, total_steps=1000)
    assert needle in str(info.value)


def test_the_schedules_of_the_experiments_fit_a_one_epoch_run():
    # Written in fractions and epochs, the pruning experiments still prune in a one-epoch run
    # (mnist_nm's two dense epochs cannot: it is refused, see tests/test_config.py).
    for name in ("mnist_sparse", "mnist_block", "mnist_sparse_qat", "mnist_rigl", "mnist_l1"):
        resolved = durations.resolve(jaxaccel.experiments.get(name), 468, 468)
        assert getattr(resolved.sparsity, "end", resolved.sparsity.threshold_at) < 468

"""Schedules against their closed forms; ERK densities; DST drop-fraction decay."""
import math

import jax
import numpy as np
import pytest

from jaxaccel import sparsity as sp


def zhu_gupta(t, s_f, t0, t_end, dt, power, s_i=0.0):
    """s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^p at the last update step <= t."""
    if t < t0:
        return s_i
    last = t_end if t >= t_end else t0 + (t - t0) // dt * dt
    return s_f + (s_i - s_f) * (1.0 - (last - t0) / (t_end - t0)) ** power


@pytest.mark.parametrize("power", [3.0, 1.5])
def test_polynomial_matches_closed_form(power):
    start, end, every, target = 10, 50, 8, 0.8  # (end - start) not a multiple of every
    steps = np.arange(0, 70)
    got = np.asarray(jax.jit(sp.polynomial_sparsity, static_argnums=(2, 3, 4))(steps, target, start, end, every, power))
    want = [zhu_gupta(int(t), target, start, end, every, power) for t in steps]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[start] == 0.0 and got[end] == pytest.approx(target) and got[-1] == pytest.approx(target)


def test_update_steps():
    steps = np.arange(0, 60)
    poly = np.asarray(sp.is_update_step("polynomial", steps, 10, 50, 8))
    assert list(steps[poly]) == [10, 18, 26, 34, 42, 50]
    periodic = np.asarray(sp.is_update_step("periodic", steps, 10, 50, 8))
    assert list(steps[periodic]) == [10, 18, 26, 34, 42, 50, 58]
    one = np.asarray(sp.is_update_step("one_shot", steps, 10, 50, 8))
    assert list(steps[one]) == [10]
    for name in ("one_shot", "periodic"):
        frac = np.asarray(sp.sparsity_fraction(name, steps, 10, 50, 8))
        np.testing.assert_array_equal(frac, (steps >= 10).astype(np.float32))


def test_erk_densities_hit_target_and_follow_formula():
    shapes = {"a": (3, 3, 16, 32), "b": (800, 300), "c": (300, 100), "d": (100, 10)}
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    for target in (0.5, 0.9, 0.98):
        dens = sp.erk_densities(shapes, target)
        overall = sum(dens[k] * sizes[k] for k in shapes) / sum(sizes.values())
        assert overall == pytest.approx(1 - target, rel=1e-9)
        free = [k for k in shapes if dens[k] < 1.0]
        ratios = [dens[k] / (sum(shapes[k]) / sizes[k]) for k in free]
        assert np.allclose(ratios, ratios[0])  # the same eps for every uncapped layer
        assert all(0 <= d <= 1 for d in dens.values())
    # At 50% the small last layer would exceed density 1: it is capped at dense.
    assert sp.erk_densities(shapes, 0.5)["d"] == 1.0


def test_layer_sparsities_uniform_and_erk():
    params = {"Dense_0": {"kernel": np.zeros((20, 10)), "bias": np.zeros(10)},
              "Dense_1": {"kernel": np.zeros((10, 4)), "bias": np.zeros(4)}}
    prunable = sp.prunable_tree(params)
    assert sp.layer_sparsities(params, prunable, 0.7) == {"Dense_0/kernel": 0.7, "Dense_1/kernel": 0.7}
    erk = sp.layer_sparsities(params, prunable, 0.7, "erk")
    overall = (erk["Dense_0/kernel"] * 200 + erk["Dense_1/kernel"] * 40) / 240
    assert overall == pytest.approx(0.7) and erk["Dense_0/kernel"] > erk["Dense_1/kernel"]


def test_drop_fraction_cosine_and_dst_steps():
    steps = np.arange(0, 120)
    got = np.asarray(jax.jit(sp.drop_fraction, static_argnums=(2, 3))(steps, 0.3, 20, 100))
    want = np.where((steps >= 20) & (steps < 100), 0.15 * (1 + np.cos(np.pi * (steps - 20) / 80)), 0.0)
    np.testing.assert_allclose(got, want, atol=1e-6)
    upd = np.asarray(sp.is_dst_update_step(steps, 20, 100, 25))
    assert list(steps[upd]) == [20, 45, 70, 95]
    assert not bool(sp.is_dst_update_step(0, 0, 100, 25))  # step 0: the initial masks


@pytest.mark.parametrize("start,end,every", [(0, 20, 5), (3, 22, 4), (10, 10, 3)])
def test_early_bird_checks_every_period_from_start_and_at_end(start, end, every):
    """early_bird's checks: start, start + every, ... up to end, and end itself (a Python list here)."""
    want = sorted({*range(start, end + 1, every), end})
    checks = [t for t in range(end + 10) if bool(sp.is_update_step("early_bird", t, start, end, every))]
    assert checks == want
    with pytest.raises(ValueError, match="ticket is drawn"):
        sp.sparsity_fraction("early_bird", 0, start, end, every)

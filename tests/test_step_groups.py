"""Step groups and the non-finite guards: the rollback guard gives the per-step guard's results,
and a run of non-finite steps stops the run with nothing non-finite saved."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxaccel
from jaxaccel import export, step as step_lib
from jaxaccel.checkpoint import Checkpointer


def _cfg(workdir, *overrides, exp="mnist_mlp"):
    return jaxaccel.experiments.override(jaxaccel.experiments.get(exp), [f"workdir={workdir}", *overrides])


def _final_params(workdir):
    return export.load(workdir / "export").params


def _poison_step(monkeypatch, bad_step: int):
    """Make step ``bad_step`` (0-based) get infinite gradients while its task loss stays finite, so
    only the gradient/state checks can catch it: an ``inf * sum(params)`` penalty on that step."""
    original = step_lib.train_step

    def poisoned(state, batch, rng, **kw):
        weight = jnp.where(state.step == bad_step, jnp.inf, 0.0)
        kw["penalty"] = lambda params: weight * sum(jnp.sum(p) for p in jax.tree.leaves(params))
        return original(state, batch, rng, **kw)

    monkeypatch.setattr(step_lib, "train_step", poisoned)


# Gradual pruning with mask updates at steps 5, 10, 15 and 20: groups of 5 steps with and without one.
_PRUNING = ("sparsity.method=magnitude", "sparsity.target=0.5", "sparsity.start=5", "sparsity.end=20",
            "sparsity.update_every=5")


@pytest.mark.parametrize("loop,sparse", [("device_loop", False), ("unroll", False), ("device_loop", True)])
def test_rollback_guard_gives_the_per_step_guards_results(tmp_path, monkeypatch, loop, sparse):
    """precision.guard=rollback runs groups untested (and, with pruning, groups without a mask update
    due without the mask-update conditional) and reruns one that met a non-finite step: params,
    masks, metrics and counters must be those of the per-step guard, finite or not."""
    _poison_step(monkeypatch, bad_step=13)
    runs = {}
    for guard in ("step", "rollback"):
        workdir = tmp_path / guard
        summary = jaxaccel.train(_cfg(workdir, "train.steps=30", "train.log_every_steps=5", f"train.loop={loop}",
                                      "train.steps_per_call=5", "model.features=[16]", f"precision.guard={guard}",
                                      *(_PRUNING if sparse else ())))
        lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
        runs[guard] = (summary, [l for l in lines if "split" not in l], _final_params(workdir))
    (s_step, lines_step, params_step), (s_roll, lines_roll, params_roll) = runs["step"], runs["rollback"]
    # Step 14 (1-based) was skipped, in the group of steps 11-15, and only there.
    assert [l.get("skipped_nonfinite_steps", 0) for l in lines_step] == [0, 0, 1, 0, 0, 0]
    # Same steps skipped, same math; the two programs are fused differently by XLA, so sums and
    # params may differ in their last bits (seen: 3.5e-7 relative after 30 steps).
    assert [sorted(l) for l in lines_roll] == [sorted(l) for l in lines_step]
    for roll, step in zip(lines_roll, lines_step):
        np.testing.assert_allclose([roll[k] for k in sorted(step)], [step[k] for k in sorted(step)], rtol=1e-5)
    assert s_roll["test_accuracy"] == pytest.approx(s_step["test_accuracy"], abs=2e-4)
    for a, b in zip(jax.tree.leaves(params_step), jax.tree.leaves(params_roll)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(a == 0, b == 0)  # the same entries pruned
        assert np.all(np.isfinite(a))
    if sparse:  # the mask updates happened (one was in the rerun group 11-15)
        assert s_roll["sparsity"] == s_step["sparsity"] and s_roll["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_consecutive_nonfinite_steps_stop_the_run_and_nothing_nonfinite_is_saved(tmp_path):
    from jaxaccel.precision import NonFiniteError
    cfg = _cfg(tmp_path, "train.steps=60", "train.log_every_steps=10", "checkpoint.every_steps=5",
               "optim.name=sgd", "optim.learning_rate=1e12", "precision.max_nonfinite_steps=3",
               "model.features=[32]")
    with pytest.raises(NonFiniteError, match=r"consecutive non-finite steps .*by step \d+"):
        jaxaccel.train(cfg)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(l.get("skipped_nonfinite_steps", 0) > 0 for l in lines)
    assert not (tmp_path / "export").exists() and not (tmp_path / "summary.json").exists()
    checkpointer = Checkpointer(tmp_path / "checkpoints", 2)
    for step in checkpointer.manager.all_steps():
        saved = checkpointer.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(saved["state"]["params"]))
    checkpointer.close()


@pytest.mark.parametrize("loop", ["device_loop", "unroll"])
def test_a_step_group_copies_nothing_between_host_and_device(tmp_path, loop):
    """The steady-state hot path: with the data, the epoch order, the state and the group's
    (position, count) already on the device, a compiled group of steps runs under
    jax.transfer_guard("disallow"): no host<->device copy in or between its steps."""
    from jaxaccel import setup as setup_lib
    from jaxaccel.checkpoint import Checkpointer
    from jaxaccel.step_groups import StepGroups
    from jaxaccel.trainer import epoch_order
    steps = 10
    setup = setup_lib.build(_cfg(tmp_path, "model.features=[16]", f"train.loop={loop}",
                                 f"train.steps_per_call={steps}", "precision.guard=step"))
    checkpointer = Checkpointer(tmp_path / "checkpoints", 1)
    state, _, _ = setup_lib.initial_state(setup, checkpointer, print)
    checkpointer.close()
    par, ds = setup.parallel, setup.dataset
    inputs, labels = par.replicate(ds.train_inputs), par.replicate(ds.train_labels)
    perm = par.replicate(epoch_order(0, 0, len(ds.train_labels)))
    groups = StepGroups(setup.cfg, setup.plan, par, setup.model.apply, setup.step_key, setup.serialize_calls)
    groups.compile(state, (inputs, labels, perm))
    call = groups.groups[None if loop == "device_loop" else steps]
    position, count = jax.device_put(np.int32(0)), jax.device_put(np.int32(steps))
    with jax.transfer_guard("disallow"):
        state, sums = call(state, inputs, labels, perm, position, count)
        state, sums = call(state, inputs, labels, perm, position, count)
    assert int(state.step) == 2 * steps and float(sums["finite_steps"]) == steps


@pytest.mark.parametrize("log_every", [10, 100])
def test_the_nonfinite_stop_does_not_depend_on_the_log_period(tmp_path, log_every):
    """A dynamic loss scale started far too high skips ~16 steps in a row before it recovers: with
    precision.max_nonfinite_steps=10 that stops the run whether a step group ends inside the run
    of skips (log every 10) or after it has recovered (log every 100)."""
    from conftest import run_cli
    out = run_cli("exp=mnist_fp16", f"workdir={tmp_path}", "model.features=[32]", "train.steps=60",
                  f"train.log_every_steps={log_every}", "precision.loss_scale_init=1e12",
                  "precision.loss_scale_max=1e12", "precision.max_nonfinite_steps=10")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "consecutive non-finite steps" in out.stderr and "dynamic loss scale" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "summary.json").exists()


def test_a_static_trip_count_runs_the_same_steps(tmp_path):
    """What GPU/TPU plans compile (loops with the trip count compiled in, a group of 7 steps run
    as calls of 4, 2 and 1 with the sums carried) gives bit for bit the state and the measurement
    sums of the loop whose count is a runtime value."""
    import dataclasses
    from jaxaccel import setup as setup_lib
    from jaxaccel.checkpoint import Checkpointer
    from jaxaccel.step_groups import StepGroups
    from jaxaccel.trainer import epoch_order
    setup = setup_lib.build(_cfg(tmp_path, "model.features=[16]", "train.steps=20", "train.log_every_steps=7",
                                 "precision.guard=step"))
    checkpointer = Checkpointer(tmp_path / "checkpoints", 1)
    state, _, _ = setup_lib.initial_state(setup, checkpointer, print)
    checkpointer.close()
    par, ds = setup.parallel, setup.dataset
    data = (par.replicate(ds.train_inputs), par.replicate(ds.train_labels),
            par.replicate(epoch_order(0, 0, len(ds.train_labels))))
    finals = {}
    for static in (False, True):
        plan = dataclasses.replace(setup.plan, static_trip_count=static)
        groups = StepGroups(setup.cfg, plan, par, setup.model.apply, setup.step_key, setup.serialize_calls)
        s = jax.tree.map(jnp.copy, state)
        groups.compile(s, data)
        assert sorted(groups.groups) == ([1, 2, 4] if static else [None])
        step, sums = 0, []
        while step < plan.total_steps:
            end = plan.next_boundary(step)
            s, group_sums = groups.run(s, data, step, end - step)
            sums.append(group_sums)
            step = end
        finals[static] = jax.tree.leaves((s, sums))
    assert len(finals[False]) == len(finals[True])
    for a, b in zip(finals[False], finals[True]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

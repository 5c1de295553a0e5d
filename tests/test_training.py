"""Real training: it learns, it is deterministic, it checkpoints, resumes and exports faithfully."""
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
from jaxaccel.models import CNN, MLP
from jaxaccel.optim import make_optimizer


def _cfg(workdir, *overrides, exp="mnist_mlp"):
    return jaxaccel.experiments.override(jaxaccel.experiments.get(exp), [f"workdir={workdir}", *overrides])


def _final_params(workdir):
    return export.load(workdir / "export").params


def test_short_run_learns_and_writes_every_output(mlp_run):
    workdir, cfg, summary = mlp_run
    assert summary["test_accuracy"] > 0.93  # chance is 0.10; 600 steps of LeNet-300-100 reach ~0.96
    on_disk = json.loads((workdir / "summary.json").read_text())
    for key in ("test_accuracy", "steps", "train_seconds", "compile_seconds", "examples_per_second",
                "sparsity", "param_count", "model_bytes", "compressed_bytes"):
        assert key in on_disk
    assert on_disk["steps"] == 600 and on_disk["param_count"] == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert on_disk["model_bytes"] == 4 * on_disk["param_count"] == on_disk["compressed_bytes"]
    assert on_disk["sparsity"] == 0.0
    # One whole epoch (468 steps) of the 600 was run: its seconds are part of the training time.
    assert len(on_disk["epoch_seconds"]) == 1 and 0 < on_disk["epoch_seconds"][0] < on_disk["train_seconds"]
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [l["step"] for l in lines if "split" not in l]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 600
    evals = [l for l in lines if l.get("split") == "test"]
    assert [e["step"] for e in evals] == [468, 600]  # epoch end and last step
    assert evals[-1]["accuracy"] == summary["test_accuracy"]
    config = json.loads((workdir / "config.json").read_text())
    assert config["config"]["train"]["steps"] == 600 and config["versions"]["jax"] == jax.__version__
    assert config["device_count"] == jax.device_count() and config["process_count"] == 1
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [500, 600]


def test_export_predicts_what_the_trained_model_predicts(mlp_run, mnist):
    workdir, cfg, summary = mlp_run
    model = export.load(workdir)
    # The reference: the last checkpoint's params, restored by orbax, through the flax module.
    checkpointer = Checkpointer(workdir / "checkpoints", 2)
    restored = checkpointer.manager.restore(600, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    checkpointer.close()
    raw = restored["state"]["params"]
    images = mnist.test_images[:512]
    reference = np.asarray(jax.jit(MLP(features=(300, 100), num_classes=10).apply)({"params": raw}, images))
    got = model(images)
    # Same params, same XLA program shape: equal up to the last bits of fusion-order rounding.
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(reference, -1))
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(raw)):
        np.testing.assert_array_equal(a, np.asarray(b))
    accuracy = np.mean(np.argmax(model(mnist.test_images), -1) == mnist.test_labels)
    assert abs(accuracy - summary["test_accuracy"]) < 1e-6


def test_export_rejects_wrong_inputs(mlp_run):
    model = export.load(mlp_run[0])
    with pytest.raises(ValueError, match="uint8 images"):
        model(np.zeros((2, 28, 28, 1), np.float32))


def test_train_step_is_deterministic(mnist):
    model = CNN(num_classes=10)
    tx = make_optimizer(jaxaccel.config.OptimConfig(name="adam"), 10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.uint8))["params"]
    state = step_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    batch = {"image": jnp.asarray(mnist.train_images[:32]), "label": jnp.asarray(mnist.train_labels[:32])}
    step = jax.jit(step_lib.train_step)
    a = step(state, batch, jax.random.key(1))
    b = step(state, batch, jax.random.key(1))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(a[1]["loss"]) > 0


def test_resumed_run_ends_bitwise_equal_to_uninterrupted(mlp_run, tmp_path):
    """Stop after 250 steps (a checkpoint), start again with the same workdir and a longer run:
    the final parameters equal those of the uninterrupted 600-step run bit for bit."""
    workdir, cfg, _ = mlp_run
    interrupted = tmp_path / "resumed"
    common = ["checkpoint.every_steps=250", "train.log_every_steps=50"]
    # Same total steps (schedule length), killed at 250: emulate by training 250 of a 600-step run.
    first = _cfg(interrupted, "train.steps=600", *common)
    import jaxaccel.trainer as trainer
    original = trainer._Plan.next_boundary
    stop_at = {"step": 250}

    class Stop(Exception):
        pass

    def boundary(self, step):
        if step >= stop_at["step"]:
            raise Stop()
        return original(self, step)

    trainer._Plan.next_boundary = boundary
    try:
        with pytest.raises(Stop):
            jaxaccel.train(first)
    finally:
        trainer._Plan.next_boundary = original
    assert Checkpointer(interrupted / "checkpoints", 2).latest_step() == 250
    jaxaccel.train(first)
    for a, b in zip(jax.tree.leaves(_final_params(workdir)), jax.tree.leaves(_final_params(interrupted))):
        np.testing.assert_array_equal(a, b)
    uninterrupted = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(l) for l in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in resumed] == [l["step"] for l in uninterrupted]
    assert [l["loss"] for l in resumed] == [l["loss"] for l in uninterrupted]


def test_unrolled_steps_match_the_device_loop(tmp_path):
    """The two lowerings of a step group compute the same training (to float rounding)."""
    common = ["train.steps=40", "train.log_every_steps=20", "model.features=[32]"]
    scan = jaxaccel.train(_cfg(tmp_path / "scan", "train.loop=scan", *common))
    unroll = jaxaccel.train(_cfg(tmp_path / "unroll", "train.loop=unroll", "train.steps_per_call=8", *common))
    for a, b in zip(jax.tree.leaves(_final_params(tmp_path / "scan")), jax.tree.leaves(_final_params(tmp_path / "unroll"))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert abs(scan["test_accuracy"] - unroll["test_accuracy"]) < 0.01
    # Model FLOPs per step, from each lowering's compiled cost analysis (loop body / one-step group),
    # against the dots counted by hand: forward, weight gradients, input gradient of the last layer.
    b, dots = 128, 784 * 32 + 32 * 10
    by_hand = 2 * b * dots * 2 + 2 * b * 32 * 10
    for summary in (scan, unroll):
        assert by_hand <= summary["flops_per_step"] <= 1.25 * by_hand  # + elementwise ops and Adam
        assert summary["model_flops_per_second"] == pytest.approx(
            summary["flops_per_step"] * 40 / summary["train_seconds"])


def test_mismatched_checkpoint_is_refused_with_the_paths(mlp_run, tmp_path):
    import shutil
    from jaxaccel.checkpoint import CheckpointMismatch
    workdir = tmp_path / "other"
    shutil.copytree(mlp_run[0] / "checkpoints", workdir / "checkpoints")
    with pytest.raises(CheckpointMismatch, match=r"Dense_0.*kernel.*checkpoint \(784, 300\), model \(784, 64\)"):
        jaxaccel.train(_cfg(workdir, "model.features=[64,100]", "train.steps=700"))


def test_init_from_export_copies_matching_params(mlp_run, tmp_path):
    """Fine-tuning start: every tensor of the same path and shape comes from the export."""
    cfg = _cfg(tmp_path / "ft", f"init.from={mlp_run[0] / 'export'}", "train.steps=1",
               "optim.learning_rate=1e-9", "optim.name=sgd")
    summary = jaxaccel.train(cfg)
    for a, b in zip(jax.tree.leaves(_final_params(mlp_run[0])), jax.tree.leaves(_final_params(tmp_path / "ft"))):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert summary["test_accuracy"] > 0.9


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


@pytest.mark.parametrize("loop,sparse", [("scan", False), ("unroll", False), ("scan", True)])
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
    with pytest.raises(NonFiniteError, match=r"consecutive non-finite steps .*the last at step \d+"):
        jaxaccel.train(cfg)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(l.get("skipped_nonfinite_steps", 0) > 0 for l in lines)
    assert not (tmp_path / "export").exists() and not (tmp_path / "summary.json").exists()
    checkpointer = Checkpointer(tmp_path / "checkpoints", 2)
    for step in checkpointer.manager.all_steps():
        saved = checkpointer.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(saved["state"]["params"]))
    checkpointer.close()

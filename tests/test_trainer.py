"""The training loop on real runs: it learns, writes every output, resumes bitwise, groups steps
alike in a device loop and unrolled, and starts from another run's parameters."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel import export
from jaxaccel.checkpoint import Checkpointer


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


def test_resumed_run_ends_bitwise_equal_to_uninterrupted(mlp_run, tmp_path):
    """Stop after 250 steps (a checkpoint), start again with the same workdir and a longer run:
    the final parameters equal those of the uninterrupted 600-step run bit for bit."""
    workdir, cfg, _ = mlp_run
    interrupted = tmp_path / "resumed"
    common = ["checkpoint.every_steps=250", "train.log_every_steps=50"]
    # Same total steps (schedule length), killed at 250: emulate by training 250 of a 600-step run.
    first = _cfg(interrupted, "train.steps=600", *common)
    from jaxaccel.plan import Plan
    original = Plan.next_boundary
    stop_at = {"step": 250}

    class Stop(Exception):
        pass

    def boundary(self, step):
        if step >= stop_at["step"]:
            raise Stop()
        return original(self, step)

    Plan.next_boundary = boundary
    try:
        with pytest.raises(Stop):
            jaxaccel.train(first)
    finally:
        Plan.next_boundary = original
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
    scan = jaxaccel.train(_cfg(tmp_path / "device_loop", "train.loop=device_loop", *common))
    unroll = jaxaccel.train(_cfg(tmp_path / "unroll", "train.loop=unroll", "train.steps_per_call=8", *common))
    for a, b in zip(jax.tree.leaves(_final_params(tmp_path / "device_loop")), jax.tree.leaves(_final_params(tmp_path / "unroll"))):
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




def test_sigterm_is_announced_once_committed_and_a_second_sigterm_does_not_lose_it(tmp_path):
    """SIGTERM, then another as soon as the run says it checkpointed: the announced checkpoint is
    committed (no half-written one left) whatever the second signal does."""
    import os
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "jaxaccel.run", "exp=mnist_mlp", f"workdir={tmp_path}",
                             "train.steps=3000", "checkpoint.every_steps=50", "train.log_every_steps=50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    announced = None
    for line in proc.stdout:
        if line.startswith("step 100/"):  # training is under way: preempt it
            proc.send_signal(signal.SIGTERM)
        if line.startswith("SIGTERM: checkpointed step "):
            proc.send_signal(signal.SIGTERM)
            announced = int(line.split("step ")[1].split(";")[0])
            break
    proc.communicate(timeout=300)
    assert announced is not None and proc.returncode in (0, -signal.SIGTERM), proc.returncode
    checkpoints = tmp_path / "checkpoints"
    assert not list(checkpoints.glob("*tmp*"))
    assert Checkpointer(checkpoints, 2).latest_step() == announced


def _snapshot(workdir):
    return {p.relative_to(workdir): (p.read_bytes(), p.stat().st_mtime_ns) for p in workdir.rglob("*") if p.is_file()}


def test_a_finished_run_started_again_changes_nothing(tmp_path):
    """The same command again: exit 0, 'already done', and every file as it was (bytes and mtimes)."""
    from conftest import run_cli
    args = ["exp=mnist_mlp", f"workdir={tmp_path}", "model.features=[16]", "train.steps=60", "checkpoint.every_steps=30"]
    assert run_cli(*args).returncode == 0
    before = _snapshot(tmp_path)
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "already done" in again.stdout and "Traceback" not in again.stderr
    assert _snapshot(tmp_path) == before


def test_a_restart_after_the_final_checkpoint_finishes_without_duplicate_lines(tmp_path):
    """Killed after the final checkpoint, before summary.json: the restart writes the export and a
    summary whose training time and rate are the run's (kept with the checkpoint), and logs no
    line twice."""
    from conftest import run_cli
    args = ["exp=mnist_mlp", f"workdir={tmp_path}", "model.features=[16]", "train.steps=60", "checkpoint.every_steps=30"]
    assert run_cli(*args).returncode == 0
    first = json.loads((tmp_path / "summary.json").read_text())
    lines = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "summary.json").unlink()  # as if killed between the final checkpoint and the summary
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == lines
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("test_accuracy", "steps", "train_seconds", "examples_per_second", "epoch_seconds"):
        assert summary[key] == first[key], key
    assert summary["train_seconds"] > 0 and summary["examples_per_second"] > 0


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MB tmpfs (room for one checkpoint of LeNet-300-100 with Adam, not two); skipped where
    this process may not mount one."""
    import subprocess
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_and_keeps_the_committed_checkpoint(small_disk):
    from conftest import run_cli
    workdir = small_disk / "run"
    out = run_cli("exp=mnist_mlp", f"workdir={workdir}", "train.steps=150", "checkpoint.every_steps=50")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: no space left on the device"), out.stderr[-3000:]
    assert "latest: step 50" in out.stderr
    assert Checkpointer(workdir / "checkpoints", 2).latest_step() == 50


def test_ctrl_c_checkpoints_and_exits_130_in_one_line(tmp_path):
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "jaxaccel.run", "exp=mnist_mlp", f"workdir={tmp_path}",
                             "train.steps=3000", "checkpoint.every_steps=1000", "train.log_every_steps=50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    for line in proc.stdout:
        if line.startswith("step 100/"):
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert "SIGINT: checkpointed step" in stdout and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    announced = int(stdout.split("SIGINT: checkpointed step ")[1].split(";")[0])
    assert Checkpointer(tmp_path / "checkpoints", 2).latest_step() == announced < 3000


@pytest.mark.parametrize("point", ["setup@0", "export@40"])
def test_sigterm_at_start_up_or_during_the_export_says_what_happened(tmp_path, point):
    """Before training: exit 0, nothing trained, and it says so; during the export: the export and
    summary are finished first."""
    from conftest import run_cli
    out = run_cli("exp=mnist_mlp", f"workdir={tmp_path}", "model.features=[16]", "train.steps=40",
                  env={"JAXACCEL_FAULT": f"{point}:SIGTERM"})
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    if point.startswith("setup"):
        assert "SIGTERM during start-up: stopped before training" in out.stdout
        assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
    else:
        assert "SIGTERM during the export: finished it first" in out.stdout
        assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 40

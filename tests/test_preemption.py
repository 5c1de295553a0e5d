"""Preemption: SIGTERM checkpoints and exits 0; SIGKILL loses only the steps since the last
checkpoint; either way, running the same command again ends bitwise equal to an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxaccel import export
from tests.conftest import run_cli

ARGS = ["exp=mnist_mlp", "model.features=[64]", "train.steps=2000", "checkpoint.every_steps=100",
        "train.log_every_steps=50"]


def _start(workdir):
    return subprocess.Popen([sys.executable, "-m", "jaxaccel.run", *ARGS, f"workdir={workdir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def _wait_for_step(workdir, step, proc, timeout=300):
    """Wait until metrics.jsonl shows training has passed ``step``."""
    deadline = time.monotonic() + timeout
    path = workdir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}: {proc.stderr.read()[-1000:]}")
        if path.exists() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines() if l.strip()):
            return
        time.sleep(0.02)
    pytest.fail("timed out waiting for training to start")


def _metrics(workdir):
    return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(*ARGS, f"workdir={workdir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir


def _assert_same_run(workdir, reference):
    for a, b in zip(jax.tree.leaves(export.load(workdir).params), jax.tree.leaves(export.load(reference).params)):
        np.testing.assert_array_equal(a, b)
    # Every line once, same values bit for bit (but the training seconds on the test lines).
    timeless = lambda lines: [{k: v for k, v in l.items() if k != "train_seconds"} for l in lines]  # noqa: E731
    assert timeless(_metrics(workdir)) == timeless(_metrics(reference))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_interrupted_run_resumes_bitwise(sig, tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    proc = _start(workdir)
    _wait_for_step(workdir, 250, proc)
    proc.send_signal(sig)
    start = time.monotonic()
    out, err = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 0, err[-2000:]
        assert time.monotonic() - start < 30
        assert "SIGTERM: checkpointed step" in out
        saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        assert saved and saved[-1] >= 250 and not (workdir / "summary.json").exists()
    else:
        assert proc.returncode == -signal.SIGKILL
    result = run_cli(*ARGS, f"workdir={workdir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from checkpoint step" in result.stdout
    _assert_same_run(workdir, uninterrupted)


@pytest.mark.parametrize("fault", ["eval@468", "save@500"], ids=["during-eval", "during-save"])
def test_killed_during_eval_or_checkpoint_write_resumes_bitwise(fault, tmp_path, uninterrupted):
    """SIGKILL at an exact point: inside an evaluation, or while an async checkpoint write is in
    flight (the partial checkpoint must be ignored or complete, never half-read)."""
    workdir = tmp_path / "run"
    result = run_cli(*ARGS, f"workdir={workdir}", env={"JAXACCEL_FAULT": fault})
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    result = run_cli(*ARGS, f"workdir={workdir}")
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_same_run(workdir, uninterrupted)


def _corrupt_latest(workdir) -> int:
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    for data_file in (workdir / "checkpoints" / str(steps[-1]) / "state").rglob("d/*"):
        data_file.write_bytes(b"not a checkpoint")
    return steps[-1]


def test_corrupt_latest_checkpoint_is_named_or_falls_back(tmp_path, uninterrupted):
    import shutil
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    (workdir / "summary.json").unlink()
    bad = _corrupt_latest(workdir)
    result = run_cli(*ARGS, f"workdir={workdir}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"checkpoint step {bad} in" in result.stderr and "checkpoint.fallback=true" in result.stderr
    result = run_cli(*ARGS, f"workdir={workdir}", "checkpoint.fallback=true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"checkpoint step {bad} in" in result.stdout and f"resuming from checkpoint step {bad - 100}" in result.stdout
    _assert_same_run(workdir, uninterrupted)


def test_same_seed_twice_is_bitwise_identical(tmp_path, uninterrupted):
    result = run_cli(*ARGS, f"workdir={tmp_path}")
    assert result.returncode == 0
    _assert_same_run(tmp_path, uninterrupted)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_checkpoint(tmp_path):
    """Multi-process: the notice reaches one host; every process saves the same step, exits 0."""
    import socket
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, "-m", "jaxaccel.run", *ARGS, "train.steps=3000",
                               "checkpoint.every_steps=1000", f"workdir={tmp_path}",
                               f"distributed.coordinator=localhost:{port}", "distributed.num_processes=2",
                               f"distributed.process_id={i}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    _wait_for_step(tmp_path, 200, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
    stops = set()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        stops |= {line for line in out.splitlines() if line.startswith("SIGTERM: checkpointed step")}
    assert len(stops) == 1  # the same step on both processes
    step = int(stops.pop().split()[3].rstrip(";"))
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == [step] and step >= 200

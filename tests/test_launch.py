"""The local launcher, as users start multi-process runs: preemption stops every process at the
same checkpointed step, a killed process stops the run with one line saying what to do, and each
process gets its own GPUs."""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest

from jaxaccel import launch

ARGS = ["exp=mnist_mlp", "model.features=[32]", "train.steps=400", "train.batch_size=64",
        "checkpoint.every_steps=100", "train.log_every_steps=50"]


def _launch_cmd(workdir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxaccel.launch", "-n", "2", *ARGS, f"workdir={workdir}", *extra]


def _start(workdir) -> tuple[subprocess.Popen, list[int]]:
    """The launcher and its workers' pids (its first two lines on stderr)."""
    proc = subprocess.Popen(_launch_cmd(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [int(re.search(r"\[launch\] process \d of 2: pid (\d+)", proc.stderr.readline()).group(1)) for _ in range(2)]
    return proc, pids


def _wait_for_step(workdir, step: int, proc, timeout: float = 300) -> None:
    path = workdir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}: {proc.communicate()[1][-2000:]}")
        if path.exists() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines() if l.strip()):
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for step {step}")


def _committed(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _resume(workdir) -> subprocess.CompletedProcess:
    result = subprocess.run(_launch_cmd(workdir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 400
    return result


@pytest.mark.parametrize("target", ["launcher", "worker-1"])
def test_sigterm_stops_every_process_at_one_checkpointed_step(target, tmp_path):
    """Before the fix orbax's own calls to JAX's preemption sync point (with checkpoint steps)
    moved the agreed stop point past every count the loop used: both trained to the end."""
    proc, pids = _start(tmp_path)
    try:
        _wait_for_step(tmp_path, 150, proc)  # past the first checkpoint (100), as in the report
        os.kill(proc.pid if target == "launcher" else pids[1], signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    stops = {int(m) for m in re.findall(r"^\[[01]\] SIGTERM: checkpointed step (\d+);", out, re.M)}
    assert len(re.findall(r"^\[[01]\] SIGTERM: checkpointed step", out, re.M)) == 2 and len(stops) == 1, out[-3000:]
    step = stops.pop()
    assert 150 <= step < 400 and _committed(tmp_path)[-1] == step
    assert not (tmp_path / "summary.json").exists()
    if target == "launcher":
        assert f"resuming from checkpoint step {step}" in _resume(tmp_path).stdout


@pytest.mark.parametrize("killed", [0, 1])
def test_killed_process_stops_the_run_with_one_line(killed, tmp_path):
    """SIGKILL to either process: before, the survivor hung ~28 s, then aborted with a C++ trace
    (launcher exit 134) or a Python traceback."""
    proc, pids = _start(tmp_path)
    try:
        _wait_for_step(tmp_path, 150, proc)
        os.kill(pids[killed], signal.SIGKILL)
        start = time.monotonic()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    assert time.monotonic() - start < 10
    assert "Traceback" not in out + err and "Check failure" not in out + err, out[-6000:] + err[-6000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"[launch] error: process {killed} of 2 stopped (killed by SIGKILL)")
    assert "Restart every process with the same command" in last
    assert f"resumes from its latest checkpoint (step {_committed(tmp_path)[-1]})" in last
    if killed == 1:  # what the line promises (resuming is the same whichever process died)
        assert "resuming from checkpoint step" in _resume(tmp_path).stdout


def _dry_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxaccel.launch", *args, "--dry-run", "exp=mnist_mlp"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env})


def _fake_nvidia_smi(tmp_path, count: int) -> str:
    """A PATH whose nvidia-smi lists ``count`` GPUs as the real one does."""
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    lines = "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})'\n" for i in range(count))
    tool.write_text(f"#!/bin/sh\n{lines}")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return f"{tool.parent}{os.pathsep}{os.environ['PATH']}"


def test_each_process_gets_its_own_gpus():
    """The environment each process is started with, for a faked list of 4 GPUs."""
    def visible(*args: str) -> list[tuple[str, str]]:
        result = _dry_run(*args, JAXACCEL_LAUNCH_GPUS="0,1,2,3")
        assert result.returncode == 0, result.stderr
        return re.findall(r"CUDA_VISIBLE_DEVICES=(\S+) .*distributed\.process_id=(\d)", result.stdout)

    assert visible("-n", "2") == [("0,1", "0"), ("2,3", "1")]
    assert visible("-n", "2", "--devices-per-process", "1") == [("0", "0"), ("1", "1")]
    assert visible("-n", "4") == [("0", "0"), ("1", "1"), ("2", "2"), ("3", "3")]
    result = _dry_run("-n", "2", "--devices-per-process", "3", JAXACCEL_LAUNCH_GPUS="0,1,2,3")
    assert result.returncode == 2 and "need 6 GPUs; 4 are visible" in result.stderr


def test_gpus_are_read_from_nvidia_smi(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = _fake_nvidia_smi(tmp_path, 4)
    assert launch.nvidia_smi_gpus(env) == ["0", "1", "2", "3"]
    assert launch.nvidia_smi_gpus({**env, "CUDA_VISIBLE_DEVICES": "3,1"}) == ["3", "1"]  # the job's own share
    assert launch.nvidia_smi_gpus({**env, "PATH": str(tmp_path / "nowhere")}) == []


def test_without_gpus_devices_per_process_emulates_cpu_devices():
    result = _dry_run("-n", "2", "--devices-per-process", "3", JAXACCEL_LAUNCH_GPUS="")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("--xla_force_host_platform_device_count=3" in l for l in lines)
    assert "CUDA_VISIBLE_DEVICES" not in result.stdout


def test_worker_environments():
    assert [e["CUDA_VISIBLE_DEVICES"] for e in launch.worker_environments(3, None, {}, list("0123"))] == ["0", "1", "2"]
    with pytest.raises(launch.LaunchError):
        launch.worker_environments(5, None, {}, list("0123"))


def test_failure_message_names_the_checkpoint_it_resumes_from(tmp_path):
    # Built without starting processes: the message reads the workdir the command names.
    died = lambda *args: launch._Launch._died(type("L", (), {"args": list(args), "n": 2})(), 1, signal.SIGKILL)
    (tmp_path / "checkpoints" / "40").mkdir(parents=True)
    (tmp_path / "checkpoints" / "60.orbax-checkpoint-tmp-1").mkdir()  # not committed: not a resume point
    assert "latest checkpoint (step 40)" in died("exp=mnist_mlp", f"workdir={tmp_path}")
    assert "starts over" in died("exp=mnist_mlp", f"workdir={tmp_path / 'new'}")
    # A URL is not listed from the launcher (remote stores need credentials) and never read as a local path.
    url = died("exp=mnist_mlp", "workdir=gs://bucket/run")
    assert "latest checkpoint in gs://bucket/run" in url and "SIGKILL" in url and "process 1 of 2" in url


def test_a_failed_collective_is_a_lost_peer_whatever_its_exception_type():
    # orbax's save barrier raised this as a ValueError (not a JaxRuntimeError) in the survivor of a
    # SIGKILLed peer under load, which then printed a traceback instead of the one-line error.
    import jax

    from jaxaccel import failures
    gloo = ValueError("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error "
                      "[127.0.0.1]:3984: Connection reset by peer")
    assert failures.peer_failure(gloo)
    assert failures.peer_failure(jax.errors.JaxRuntimeError("INTERNAL: collective failed"))
    assert not failures.peer_failure(ValueError("train.batch_size must be positive"))
    assert not failures.peer_failure(KeyError("Gloo"))

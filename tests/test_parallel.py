"""Data parallelism is equivalent to one device: jit over a Mesh and pmap, 1 vs 4 emulated devices.

Devices are fixed when jax starts, so each configuration runs in its own process with
XLA_FLAGS=--xla_force_host_platform_device_count=N, through the real command line.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxaccel import export
from tests.conftest import run_cli

COMMON = ["exp=mnist_mlp", "model.features=[64]", "train.steps=60", "train.log_every_steps=10",
          "train.batch_size=128", "train.eval_batch_size=1000"]


def _run(tmp_path_factory, devices: int, mode: str):
    workdir = tmp_path_factory.mktemp(f"{mode}{devices}")
    result = run_cli(*COMMON, f"parallel.mode={mode}", f"workdir={workdir}",
                     env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((workdir / "config.json").read_text())
    assert config["parallel"] == {"mode": mode, "devices": devices}
    return [l["loss"] for l in lines if "split" not in l], export.load(workdir).params


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _run_two_processes(tmp_path_factory):
    """2 processes x 2 devices on localhost (jax.distributed, CPU collectives)."""
    workdir = tmp_path_factory.mktemp("procs2")
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, "-m", "jaxaccel.run", *COMMON, f"workdir={workdir}",
                               f"distributed.coordinator=localhost:{port}", "distributed.num_processes=2",
                               f"distributed.process_id={i}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    config = json.loads((workdir / "config.json").read_text())
    assert config["process_count"] == 2 and config["device_count"] == 4
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [l["loss"] for l in lines if "split" not in l], export.load(workdir).params


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {(d, m): _run(tmp_path_factory, d, m) for d, m in ((1, "jit"), (4, "jit"), (4, "pmap"))}
    out[(4, "2 processes")] = _run_two_processes(tmp_path_factory)
    return out


@pytest.mark.parametrize("other", [(4, "jit"), (4, "pmap"), (4, "2 processes")])
def test_same_loss_curve_and_params_as_one_device(runs, other):
    base_losses, base_params = runs[(1, "jit")]
    losses, params = runs[other]
    assert len(losses) == len(base_losses) == 6
    np.testing.assert_allclose(losses, base_losses, rtol=1e-5)
    for a, b in zip(_leaves(params), _leaves(base_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_batch_must_split_evenly_over_devices(tmp_path):
    result = run_cli(*COMMON, "train.batch_size=126", f"workdir={tmp_path}",
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert result.returncode == 2 and "train.batch_size=126 must be a multiple of the 4 devices" in result.stderr


def test_wrong_coordinator_address_fails_clearly(tmp_path):
    result = run_cli(*COMMON, f"workdir={tmp_path}", f"distributed.coordinator=localhost:{_free_port()}",
                     "distributed.num_processes=2", "distributed.process_id=1",
                     "distributed.init_timeout_seconds=3")
    assert result.returncode == 1
    assert "cannot reach the coordinator at localhost:" in result.stderr and "Traceback" not in result.stderr

"""Data parallelism is equivalent to one device: jit over a Mesh (replicated or FSDP), pmap, and
2 processes x 2 devices through ``jaxaccel.launch``, each against 1 emulated device; replicas
stay bit-identical (masks, loss scale, params) and a dead peer stops the others with a message.

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


# Sparsity masks, a dynamic loss scale and QAT in one run: the state whose replicas must agree.
REPLICATED_EXTRAS = ["sparsity.method=magnitude", "sparsity.target=0.8", "sparsity.end=40",
                     "sparsity.update_every=10", "precision.loss_scale=dynamic", "quant.mode=qat"]


def _devices(n: int) -> dict:
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def _outputs(workdir):
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((workdir / "config.json").read_text())
    return [l["loss"] for l in lines if "split" not in l], export.load(workdir).params, config


def _run(tmp_path_factory, devices: int, mode: str, *extra: str):
    workdir = tmp_path_factory.mktemp(f"{mode}{devices}")
    result = run_cli(*COMMON, f"parallel.mode={mode}", f"workdir={workdir}", *extra, env=_devices(devices))
    assert result.returncode == 0, result.stderr[-2000:]
    losses, params, config = _outputs(workdir)
    assert config["parallel"]["mode"] == mode and config["parallel"]["devices"] == devices
    return losses, params, config, result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _launch(tmp_path_factory, name: str, *extra: str):
    """2 processes x 2 devices on localhost through ``python -m jaxaccel.launch`` (jax.distributed,
    CPU collectives)."""
    workdir = tmp_path_factory.mktemp(name)
    result = subprocess.run([sys.executable, "-m", "jaxaccel.launch", "-n", "2", "--devices-per-process", "2",
                             *COMMON, f"workdir={workdir}", *extra], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    losses, params, config = _outputs(workdir)
    assert config["process_count"] == 2 and config["device_count"] == 4
    return losses, params, config, result.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {(d, m): _run(tmp_path_factory, d, m) for d, m in ((1, "jit"), (4, "jit"), (4, "pmap"))}
    out[(4, "fsdp")] = _run(tmp_path_factory, 4, "jit", "parallel.fsdp=true")
    out[(4, "2 processes")] = _launch(tmp_path_factory, "procs2")
    return out


@pytest.mark.parametrize("other", [(4, "jit"), (4, "pmap"), (4, "fsdp"), (4, "2 processes")])
def test_same_loss_curve_and_params_as_one_device(runs, other):
    base_losses, base_params, _, _ = runs[(1, "jit")]
    losses, params, _, _ = runs[other]
    assert len(losses) == len(base_losses) == 6
    np.testing.assert_allclose(losses, base_losses, rtol=1e-5)
    for a, b in zip(_leaves(params), _leaves(base_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fsdp_shards_the_state(runs):
    """FSDP keeps about a quarter of the state per device on 4 devices (only a 10-wide bias and
    scalars stay whole), measured from the arrays' actual shards."""
    replicated = runs[(4, "jit")][2]["parallel"]["state_bytes_per_device"]
    sharded = runs[(4, "fsdp")][2]["parallel"]["state_bytes_per_device"]
    assert runs[(4, "fsdp")][2]["parallel"]["fsdp"] is True
    assert 0.24 * replicated < sharded < 0.27 * replicated


def test_eight_devices_with_unrolled_blocks_finish(tmp_path):
    """Several unrolled calls in flight on 8 emulated devices once deadlocked in an all-reduce
    (XLA:CPU thread starvation); the loop now runs one multi-device call at a time on CPU."""
    result = run_cli(*COMMON, "train.steps=150", "train.loop=unroll", "train.steps_per_call=10",
                     f"workdir={tmp_path}", env=_devices(8), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 150


def test_fsdp_needs_jit_mode(tmp_path):
    result = run_cli(*COMMON, "parallel.mode=pmap", "parallel.fsdp=true", f"workdir={tmp_path}")
    assert result.returncode == 2 and "use parallel.mode=jit" in result.stderr


@pytest.mark.parametrize("how", ["pmap", "pmap over 2 processes"])
def test_masks_loss_scale_and_quantized_state_identical_on_every_replica(tmp_path_factory, how):
    """With pruning, dynamic loss scaling and QAT, every replica's copy of the whole state is
    compared byte for byte at each evaluation (the run fails if any differs). (The jit runs of
    test_same_loss_curve_and_params_as_one_device run the same check.)"""
    if how == "pmap":
        _, params, _, out = _run(tmp_path_factory, 4, "pmap", *REPLICATED_EXTRAS)
        expected = "bit-identical on 4 devices, 1 process(es)"
    else:
        _, params, _, out = _launch(tmp_path_factory, "sparse2", "parallel.mode=pmap", *REPLICATED_EXTRAS)
        expected = "bit-identical on 4 devices, 2 process(es)"
    checks = [l for l in out.splitlines() if "replica check:" in l]
    assert checks and all(expected in l for l in checks), out[-2000:]
    leaves = int(checks[-1].split("replica check: ")[1].split()[0])
    assert leaves > 19  # the dense run's state has 19 leaves; masks and the loss scale add more
    kernels = [v for k, v in _flat(params).items() if k.endswith("kernel")]
    assert np.mean(np.concatenate([k.ravel() for k in kernels]) == 0) == pytest.approx(0.8, abs=1e-3)


CHECK_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jaxaccel.parallel import MeshParallel, PmapParallel, ReplicaMismatch
for par in (MeshParallel(), PmapParallel()):
    good = par.put_state({"mask": jnp.ones((8, 4)), "scale": jnp.float32(2.0)})
    assert par.check_replicas(good) == 2
    # The same global array, but device 1's copy of the mask has one flipped entry.
    mask = good["mask"]
    shards = [np.asarray(s.data) for s in mask.addressable_shards]
    shards[1] = shards[1].copy(); shards[1].flat[5] = 0.0
    bad = jax.make_array_from_single_device_arrays(
        mask.shape, mask.sharding, [jax.device_put(x, s.device) for x, s in zip(shards, mask.addressable_shards)])
    try:
        par.check_replicas({"mask": bad, "scale": good["scale"]})
    except ReplicaMismatch as e:
        assert "['mask']" in str(e) and "cpu:1" in str(e), e
        print(type(par).__name__, "caught:", e)
    else:
        raise SystemExit(f"{type(par).__name__}: a differing replica was not detected")
"""


def test_replica_check_detects_one_differing_entry():
    result = subprocess.run([sys.executable, "-c", CHECK_SCRIPT], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **_devices(2)})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("caught:") == 2


def test_killed_peer_stops_the_other_process_with_a_message(tmp_path):
    """SIGKILL one of two processes mid-run: the survivor exits 1 at once, saying what happened."""
    port = _free_port()
    cmd = [sys.executable, "-u", "-m", "jaxaccel.run", *COMMON, "train.steps=100000", f"workdir={tmp_path}",
           f"distributed.coordinator=localhost:{port}", "distributed.num_processes=2",
           "distributed.heartbeat_timeout_seconds=10"]
    procs = [subprocess.Popen(cmd + [f"distributed.process_id={i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        for line in procs[0].stdout:  # wait until both train (their first training line)
            if line.startswith("step 10/"):
                break
        procs[1].kill()
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1, err[-3000:]
    assert "error: process 0 of 2 stopped" in err and "restart every process with the same command" in err


def _flat(tree):
    from flax import traverse_util
    return traverse_util.flatten_dict(tree, sep="/")


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


def test_fsdp_sparse_run_resumes_bitwise(tmp_path):
    """FSDP with pruning masks (sharded like their parameters): stopped at a checkpoint and resumed,
    the run ends exactly where an uninterrupted one does. (Periodic re-pruning every 10 steps: a
    schedule ending at step 30 would be refused for the 20-step first part, which ends before it.)"""
    common = [*COMMON, "parallel.fsdp=true", "optim.schedule=constant", "checkpoint.every_steps=20",
              "sparsity.method=magnitude", "sparsity.target=0.8", "sparsity.schedule=periodic", "sparsity.update_every=10"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for steps, workdir in ((40, straight), (20, resumed), (40, resumed)):
        result = run_cli(*common, f"train.steps={steps}", f"workdir={workdir}", env=_devices(4))
        assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from checkpoint step 20" in result.stdout
    for a, b in zip(_leaves(export.load(straight).params), _leaves(export.load(resumed).params)):
        np.testing.assert_array_equal(a, b)
    # The 20-step run also evaluated at its end (step 20); the training lines must match exactly.
    assert _outputs(straight)[0] == _outputs(resumed)[0]

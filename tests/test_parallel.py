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
from pathlib import Path

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
    assert result.returncode == 2
    assert "train.batch_size=126 must be a multiple of the 4 devices it is split over: use train.batch_size=124 or 128" in result.stderr


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


# ----------------------------------------------------------------------------------------------
# Meshes that follow the hardware.

class _FakeDevice:
    """Enough of a jax Device for the mesh layout (CPU-like: kept in the order given)."""
    platform, device_kind = "cpu", "fake"

    def __init__(self, i, slice_index=0, process_index=0):
        self.id, self.slice_index, self.process_index = i, slice_index, process_index

    def __repr__(self):
        return f"d{self.id}"


def test_mesh_puts_fsdp_within_a_slice_and_data_across():
    """2 slices x 4 devices: by default each mesh row (the fsdp axis) is one slice; fsdp_size may
    split a slice further or span slices; a size that fits neither is refused naming valid ones."""
    from jaxaccel.config import ConfigError
    from jaxaccel.parallel import device_grid, device_groups
    devices = [_FakeDevice(i, slice_index=i // 4) for i in range(8)]
    devices[0].platform = "tpu"  # slices are read from TPU devices only
    kind, groups = device_groups(devices)
    assert kind == "slice" and [[d.id for d in g] for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    ids = lambda grid: [[d.id for d in row] for row in grid]  # noqa: E731
    assert ids(device_grid(devices, None, (kind, groups))) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ids(device_grid(devices, 2, (kind, groups))) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ids(device_grid(devices, 8, (kind, groups))) == [[0, 1, 2, 3, 4, 5, 6, 7]]
    with pytest.raises(ConfigError, match=r"fsdp_size=3 does not split 2 slices of 4 devices: use one of \[1, 2, 4, 8\]"):
        device_grid(devices, 3, (kind, groups))
    # One slice (or devices without slices, e.g. GPUs of one host): one group, fsdp over all.
    flat = [_FakeDevice(i) for i in range(8)]
    assert device_groups(flat)[0] == "all" and ids(device_grid(flat)) == [list(range(8))]


def test_replica_groups_of_the_three_hlo_forms():
    from jaxaccel.parallel import collectives
    hlo = "\n".join([
        "%a = f32[8] all-gather(%x), replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], "
        "device_ids=([2,4]T(1,0)) {'axis_0'}, dimensions={0}",
        "%b = (f32[], f32[2]) all-reduce(%y, %z), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add",
        "%c = f32[2] reduce-scatter(%w), replica_groups={{0,1},{2,3}}, dimensions={0}",
        "%d = f32[2] add(%w, %w)"])
    assert collectives(hlo) == [("all-gather", [[0, 1, 2, 3], [4, 5, 6, 7]]),
                                ("all-reduce", [[0, 4], [1, 5], [2, 6], [3, 7]]),
                                ("reduce-scatter", [[0, 1], [2, 3]])]


HYBRID_SCRIPT = """
import functools, json, jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
from jaxaccel import step as step_lib
from jaxaccel.parallel import MeshParallel, PmapParallel, collectives

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))

rng = np.random.default_rng(0)
images = rng.integers(0, 255, (512, 8, 8, 1), dtype=np.uint8)
labels = rng.integers(0, 10, 512).astype(np.int32)
model, tx = MLP(), optax.adam(1e-2)

def create(key):
    params = model.init(key, jnp.zeros((1, 8, 8, 1), jnp.uint8))["params"]
    return step_lib.TrainState.create(params, tx)

def run(par):
    state = par.create_state(create, jax.random.key(0))
    step = functools.partial(step_lib.train_step, apply_fn=model.apply, tx=tx, axis_name=par.axis_name)
    fn = step_lib.make_train_steps(step, batch_size=64, batch_sharding=par.batch_sharding,
                                   unroll=None, step_key=jax.random.key(2), axis_name=par.axis_name)
    args = (state, par.replicate(images), par.replicate(labels),
            par.replicate(rng.permutation(512).astype(np.int32)), np.int32(0), np.int32(8))
    compiled = par.compile(fn, args)
    new, sums = compiled(*args)
    return {"loss": float(par.host(sums)["loss"]), "params": [np.asarray(x).tolist() for x in jax.tree.leaves(new.params)],
            "bytes": par.state_bytes_per_device(new), "mesh": par.describe(new)["mesh"],
            "kernel": [list(new.params["Dense_0"]["kernel"].shape), str(new.params["Dense_0"]["kernel"].sharding.spec)],
            "collectives": collectives(compiled.as_text())}

rng_state = rng.bit_generator.state
out = {}
for name, par in (("one", MeshParallel(devices=jax.devices()[:1])), ("flat", MeshParallel(fsdp=True)),
                  ("hybrid", MeshParallel(fsdp=True, fsdp_size=2)), ("pmap", PmapParallel())):
    rng.bit_generator.state = rng_state
    out[name] = run(par)
print("RESULT", json.dumps(out))
"""


def test_hybrid_mesh_trains_like_one_device_with_gathers_inside_each_row():
    """A (data=2, fsdp=2) mesh on 4 devices trains 8 steps as 1 device, 1-D FSDP over 4 and the
    explicit-collectives mode (shard_map, ``parallel.mode=pmap``) do; the compiled step's
    all-gathers stay within a mesh row (a slice or host) and its gradient reduction crosses the rows."""
    result = subprocess.run([sys.executable, "-c", HYBRID_SCRIPT], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **_devices(4)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert out["hybrid"]["mesh"]["axes"] == {"data": 2, "fsdp": 2} and out["flat"]["mesh"]["axes"] == {"data": 1, "fsdp": 4}
    for name in ("flat", "hybrid", "pmap"):
        np.testing.assert_allclose(out[name]["loss"], out["one"]["loss"], rtol=1e-5)
        for a, b in zip(out[name]["params"], out["one"]["params"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Parameters and Adam moments split in 2 (hybrid) or 4 (flat) parts.
    assert 0.49 < out["hybrid"]["bytes"] / out["one"]["bytes"] < 0.52
    assert 0.24 < out["flat"]["bytes"] / out["one"]["bytes"] < 0.27
    # shard_map: the state is one replicated global array per leaf (no leading device axis), a
    # whole copy on each device, and the step's one reduction (the pmean) spans every device.
    assert out["pmap"]["kernel"] == [[64, 10], "P()"] and out["pmap"]["bytes"] == out["one"]["bytes"]
    assert out["pmap"]["mesh"] == {"axes": {"data": 4}, "groups": "all", "group_count": 1, "batch_axes": ["data"],
                                   "state_axis": None, "collectives": "shard_map"}
    assert {op for op, _ in out["pmap"]["collectives"]} == {"all-reduce"}
    assert all(groups in ([], [[0, 1, 2, 3]]) for _, groups in out["pmap"]["collectives"])
    rows = [{0, 1}, {2, 3}]  # mesh positions of each fsdp row
    gathers = [g for op, g in out["hybrid"]["collectives"] if op == "all-gather"]
    assert gathers and all(any(set(group) <= row for row in rows) for groups in gathers for group in groups)
    reductions = [g for op, g in out["hybrid"]["collectives"] if op in ("all-reduce", "reduce-scatter")]
    assert any(len(group) > 1 and not any(set(group) <= row for row in rows)
               for groups in reductions for group in groups)


TWO_HOSTS_SCRIPT = """
import functools, json, socket, sys
import jax
port, rank = sys.argv[1], int(sys.argv[2])
socket.gethostname = lambda: f"host{rank}"  # two processes on two (pretended) hosts
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=rank, initialization_timeout=60)
import jax.numpy as jnp, numpy as np, optax, flax.linen as nn
from jaxaccel import sparsity, step as step_lib
from jaxaccel.parallel import MeshParallel, PmapParallel, ReplicaMismatch, zero_counts

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))

rng = np.random.default_rng(0)
images = rng.integers(0, 255, (512, 8, 8, 1), dtype=np.uint8)
labels = rng.integers(0, 10, 512).astype(np.int32)
perm = rng.permutation(512).astype(np.int32)
model = MLP()

def create(key):
    params = model.init(key, jnp.zeros((1, 8, 8, 1), jnp.uint8))["params"]
    return step_lib.TrainState.create(params, TX)

TX = optax.adam(1e-2)

def run(par):
    state = par.create_state(create, jax.random.key(0))
    step = functools.partial(step_lib.train_step, apply_fn=model.apply, tx=TX, axis_name=par.axis_name)
    fn = step_lib.make_train_steps(step, batch_size=64,
                                   batch_sharding=par.batch_sharding, unroll=None, step_key=jax.random.key(2),
                                   axis_name=par.axis_name)
    args = (state, par.replicate(images), par.replicate(labels), par.replicate(perm), np.int32(0), np.int32(8))
    new, sums = par.compile(fn, args)(*args)
    return new, float(par.host(sums)["loss"])

out = {}
_, out["one"] = run(MeshParallel(devices=jax.local_devices()[:1]))
par = MeshParallel(fsdp=True)
state, out["hybrid"] = run(par)
out["mesh"] = par.describe()["mesh"]
out["rows"] = [[d.process_index for d in row] for row in par.mesh.devices]
out["leaves"] = par.check_replicas(state)
out["zeros"] = zero_counts(state.params)
_, out["pmap"] = run(PmapParallel())
# One flipped bit in process 1's copy of a kernel shard (held by process 0 too): both processes see it.
kernel = state.params["Dense_1"]["kernel"]
parts = [np.array(s.data) for s in kernel.addressable_shards]
if rank == 1:
    parts[0].view(np.uint32).flat[7] ^= 1
bad = jax.make_array_from_single_device_arrays(
    kernel.shape, kernel.sharding, [jax.device_put(p, s.device) for p, s in zip(parts, kernel.addressable_shards)])
state.params["Dense_1"]["kernel"] = bad
try:
    par.check_replicas(state)
except ReplicaMismatch as e:
    out["mismatch"] = str(e)
print("RESULT", json.dumps(out), flush=True)
"""


def test_two_hosts_get_data_parallelism_across_and_fsdp_within():
    """Two processes on two (pretended) hosts, 2 devices each: the default mesh puts each host on
    its own fsdp row, trains as one device does (so does the shard_map mode over both hosts), the
    replica check compares a shard's copies held by different hosts (a bit flipped on one is named
    by both processes) and zero counts reach every process."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", TWO_HOSTS_SCRIPT, str(port), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **_devices(2)}) for i in range(2)]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
            results.append(json.loads(stdout.split("RESULT ", 1)[1]))
    finally:
        for p in procs:
            p.kill()
    for out in results:
        assert out["mesh"]["axes"] == {"data": 2, "fsdp": 2} and out["mesh"]["groups"] == "host"
        assert out["rows"] == [[0, 0], [1, 1]]
        np.testing.assert_allclose(out["hybrid"], out["one"], rtol=1e-5)
        np.testing.assert_allclose(out["pmap"], out["one"], rtol=1e-5)
        assert out["leaves"] == 14 and len(out["zeros"]) == 4 and out["zeros"] == results[0]["zeros"]
        assert out["mismatch"].startswith("replicated state differs between processes: .params['Dense_1']['kernel'] "
                                          "(devices ")


def test_config_json_records_the_mesh_and_the_leaves_fsdp_leaves_whole(runs):
    parallel = runs[(4, "fsdp")][2]["parallel"]
    assert parallel["mesh"]["axes"] == {"data": 1, "fsdp": 4} and parallel["mesh"]["state_axis"] == "fsdp"
    # The 10-wide output bias and its two Adam moments: the only non-scalar leaves 4 does not divide.
    assert sorted(leaf["path"] for leaf in parallel["unsharded_leaves"]) == [
        ".opt_state.inner_state[0].mu['Dense_1']['bias']", ".opt_state.inner_state[0].nu['Dense_1']['bias']",
        ".params['Dense_1']['bias']"]
    assert all(leaf["shape"] == [10] and leaf["bytes"] == 40 for leaf in parallel["unsharded_leaves"])
    assert runs[(4, "jit")][2]["parallel"]["mesh"]["axes"] == {"data": 1, "fsdp": 4}
    assert "unsharded_leaves" not in runs[(4, "jit")][2]["parallel"]


# ----------------------------------------------------------------------------------------------
# Checks computed on the devices.

ON_DEVICE_SCRIPT = """
import json, jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
from jax._src import array as array_impl
from jaxaccel import sparsity, step as step_lib
from jaxaccel.parallel import MeshParallel, ReplicaMismatch, checksum, local_copy, zero_counts

# Count every jax.Array copied to host NumPy: np.asarray / np.array (what jax.device_get,
# local_copy and process_allgather end in; on CPU they may read the buffer directly) and the copy
# behind float(), .tolist() and __array__ (not counted again inside a counted np.asarray).
moved, inside = [], [0]
for name in ("asarray", "array"):
    def counting(x, *args, _original=getattr(np, name), **kwargs):
        if not isinstance(x, jax.Array):
            return _original(x, *args, **kwargs)
        moved.append(x.nbytes)
        inside[0] += 1
        try:
            return _original(x, *args, **kwargs)
        finally:
            inside[0] -= 1
    setattr(np, name, counting)
_copy = array_impl.ArrayImpl._single_device_array_to_np_array_did_copy
def counting_copy(self):
    out = _copy(self)
    if not inside[0]:
        moved.append(out[0].nbytes)
    return out
array_impl.ArrayImpl._single_device_array_to_np_array_did_copy = counting_copy

def host_bytes(fn, *args):
    fn(*args)  # compiled on first use
    moved.clear()
    result = fn(*args)
    return result, sum(moved)

class MLP(nn.Module):  # LeNet-300-100
    @nn.compact
    def __call__(self, x):
        for n in (300, 100):
            x = nn.relu(nn.Dense(n)(x))
        return nn.Dense(10)(x)

def create(key):
    params = MLP().init(key, jnp.zeros((1, 784)))["params"]
    # Planted zeros (and a -0.0 and a NaN) in the first kernel: 1/3 of its entries.
    kernel = params["Dense_0"]["kernel"]
    kernel = jnp.where(jnp.arange(kernel.size).reshape(kernel.shape) % 3 == 0, 0.0, kernel)
    params["Dense_0"]["kernel"] = kernel.at[0, 1].set(-0.0).at[0, 2].set(jnp.nan)
    return step_lib.TrainState.create(params, optax.adam(1e-3))

out = {}
par = MeshParallel(fsdp=True)
state = par.create_state(create, jax.random.key(0))
out["state_bytes"] = sum(x.nbytes for x in jax.tree.leaves(state))
out["params_bytes"] = sum(x.nbytes for x in jax.tree.leaves(state.params))
out["leaves"], out["check_bytes"] = host_bytes(par.check_replicas, state)
selected = sparsity.prunable_tree(state.params)
out["zeros"], out["zero_bytes"] = host_bytes(zero_counts, state.params, selected)
host_params, out["local_copy_bytes"] = host_bytes(local_copy, state.params)
out["host_zeros"] = [int(np.size(x) - np.count_nonzero(x)) for x in jax.tree.leaves(host_params)
                     if x.ndim == 2]
out["report_same"] = sparsity.report(state.params) == sparsity.report(host_params)

# A (data=2, fsdp=2) mesh: each kernel shard has a copy in the other row; flip one bit of one.
par = MeshParallel(fsdp=True, fsdp_size=2)
state = par.create_state(create, jax.random.key(0))
assert par.check_replicas(state) == out["leaves"]
kernel = state.params["Dense_1"]["kernel"]
target = par.mesh.devices[1, 0]
parts = [np.array(s.data) for s in kernel.addressable_shards]
devices = [s.device for s in kernel.addressable_shards]
flip = parts[devices.index(target)]
flip.view(np.uint32).flat[123] ^= 1 << 7
bad = jax.make_array_from_single_device_arrays(kernel.shape, kernel.sharding,
                                               [jax.device_put(p, d) for p, d in zip(parts, devices)])
state.params["Dense_1"]["kernel"] = bad
try:
    par.check_replicas(state)
except ReplicaMismatch as e:
    out["mismatch"] = str(e)
out["target"] = str(target)

# Any one changed element changes the checksum, for every dtype the state may hold.
changed = []
for dtype in ("float32", "bfloat16", "float16", "int8", "uint8", "int32", "uint32", "bool"):
    x = np.random.default_rng(0).integers(0, 2, 1000).astype(dtype)
    y = x.copy()
    y[517] = 1 - y[517] if dtype != "bool" else not y[517]
    changed.append(bool(np.any(np.asarray(checksum(jnp.asarray(x))) != np.asarray(checksum(jnp.asarray(y))))))
keys = [jax.random.key(0), jax.random.key(1)]
changed.append(bool(np.any(np.asarray(checksum(keys[0])) != np.asarray(checksum(keys[1])))))
out["changed"] = changed
print("RESULT", json.dumps(out))
"""


def test_evaluation_checks_move_a_few_bytes_per_leaf_not_the_state():
    """FSDP on 4 emulated devices, LeNet-300-100 with Adam (3.2 MB of state): the replica check
    brings 8 bytes per leaf and device to the host, the zero count 4 bytes per kernel; a host copy
    of the parameters (what each evaluation made before) is measured the same way for scale.
    The checks still see what they must: the same zero counts as NumPy, and one flipped bit in
    one copy of a sharded kernel on a (data=2, fsdp=2) mesh."""
    result = subprocess.run([sys.executable, "-c", ON_DEVICE_SCRIPT], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **_devices(4)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert out["state_bytes"] > 3_000_000 and out["leaves"] == 20
    assert 0 < out["check_bytes"] <= 8 * 4 * out["leaves"]  # 640 bytes
    assert 0 < out["zero_bytes"] <= 4 * 3  # one int32 per kernel
    assert out["local_copy_bytes"] >= out["params_bytes"] > 1_000_000  # the instrument sees a params copy
    assert out["zeros"] == out["host_zeros"] and out["zeros"][0] == 784 * 300 // 3 + 1  # +1: the -0.0
    assert out["report_same"]
    assert out["mismatch"].startswith("replicated state differs between devices of process 0: "
                                      ".params['Dense_1']['kernel'] (devices " + out["target"] + " differ from ")
    assert all(out["changed"]), out["changed"]


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compiles for a multi-slice TPU (needs libtpu; no TPU).

MULTISLICE_SCRIPT = """
import functools, json, jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
from jax.experimental import topologies
from jaxaccel import step as step_lib
from jaxaccel.parallel import MeshParallel, collectives, cross_slice_collectives

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255
        return nn.Dense(10)(nn.relu(nn.Dense(512)(x)))

model = MLP()
def create(key):
    params = model.init(key, jnp.zeros((1, 28, 28, 1), jnp.uint8))["params"]
    return step_lib.TrainState.create(params, TX)

TX = optax.adam(1e-3)
devices = list(topologies.get_topology_desc(topology_name="v5e:4x4", platform="tpu", num_slices=2).devices)
abstract = jax.eval_shape(create, jax.random.key(0))
out = {"state_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))}
for name, fsdp_size in (("default", None), ("across slices", 32)):
    par = MeshParallel(fsdp=True, fsdp_size=fsdp_size, devices=devices)
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=par.leaf_sharding(s)), abstract)
    replicated = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=par.replicated)
    step = functools.partial(step_lib.train_step, apply_fn=model.apply, tx=TX, axis_name=par.axis_name)
    fn = step_lib.make_train_steps(step, batch_size=256,
                                   batch_sharding=par.batch_sharding, unroll=1, step_key=jax.random.key(2),
                                   axis_name=par.axis_name)
    args = (state, replicated((60000, 28, 28, 1), jnp.uint8), replicated((60000,), jnp.int32),
            replicated((60000,), jnp.int32), np.int32(0), np.int32(1))
    hlo = par.compile(fn, args).as_text()
    out[name] = {"mesh": par.describe(state)["mesh"], "state_bytes_per_device": par.state_bytes_per_device(state),
                 "rows": [sorted({d.slice_index for d in row}) for row in par.mesh.devices],
                 "in_slice": collectives(hlo), "cross_slice": cross_slice_collectives(hlo)}
print("RESULT", json.dumps(out))
"""


def _tpu_python() -> str | None:
    """A Python with libtpu: this one, or ``JAXACCEL_TPU_PYTHON`` (libtpu kept out of the main
    environment, where it would change every JAX process)."""
    import importlib.util
    if importlib.util.find_spec("libtpu") is not None:
        return sys.executable
    other = os.environ.get("JAXACCEL_TPU_PYTHON")
    if other and subprocess.run([other, "-c", "import libtpu"], capture_output=True).returncode == 0:
        return other
    return None


@pytest.mark.skipif(_tpu_python() is None, reason="libtpu is not installed (pip install 'jax[tpu]'); or set "
                                                  "JAXACCEL_TPU_PYTHON to a Python that has it")
def test_multislice_tpu_fsdp_gathers_within_a_slice_and_reduces_gradients_across():
    """Compiled with the real XLA:TPU compiler for 2 slices of v5e:4x4: with the default mesh the
    FSDP all-gathers run on each slice's ICI and only reductions (the gradients, the metrics) cross
    the data-centre network; with fsdp_size=32 parameter gathers cross it too (what the default
    avoids). Per-device state bytes: 1/16 and 1/32 of the state (a 10-wide bias stays whole)."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([_tpu_python(), "-c", MULTISLICE_SCRIPT], capture_output=True, text=True, timeout=600,
                            cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
                                           "TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost",
                                           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT ", 1)[1])
    default, across = out["default"], out["across slices"]
    assert default["mesh"]["axes"] == {"data": 2, "fsdp": 16} and default["mesh"]["groups"] == "slice"
    assert default["rows"] == [[0], [1]]  # each fsdp row is one slice
    gathers = [groups for op, groups in default["in_slice"] if op == "all-gather"]
    assert gathers and all(len(g) == 16 for groups in gathers for g in groups)
    assert default["cross_slice"] and set(default["cross_slice"]) == {"all-reduce"}
    assert across["mesh"]["axes"] == {"data": 1, "fsdp": 32} and "all-gather" in across["cross_slice"]
    bias = 10 * 4 * 3  # the output bias and its two Adam moments, whole on every device
    assert default["state_bytes_per_device"] < (out["state_bytes"] - bias) / 16 + bias + 64
    assert across["state_bytes_per_device"] < (out["state_bytes"] - bias) / 32 + bias + 64

"""jaxaccel.aot: targets, compile figures, capacity errors, the command line; compiles for TPU and
NVIDIA GPU where their compilers are installed (libtpu: the ``tpu`` extra; the CUDA plugin: ``cuda``).
Each XLA:TPU compile of these tiny programs takes seconds on a 2-core machine: kept to a few."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxaccel import aot

ROOT = Path(__file__).resolve().parents[1]
needs_tpu = pytest.mark.skipif(aot.missing_compiler("tpu") is not None,
                               reason="libtpu is not installed (pip install 'jaxaccel[tpu]')")
needs_cuda = pytest.mark.skipif(aot.missing_compiler("cuda") is not None,
                                reason="the CUDA plugin is not installed (pip install 'jaxaccel[cuda]')")


def _aot_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxaccel.aot", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# ----------------------------------------------------------------------------------------------
# Targets (no compiler needed).

def test_topologies_parse_into_targets():
    tpu = aot.parse_target("v5e:4x4", slices="2")
    assert (tpu.platform, tpu.name, tpu.slices, tpu.label) == ("tpu", "v5e:4x4", 2, "v5e:4x4 x 2 slices")
    assert tpu.device_memory_bytes is None  # XLA:TPU checks capacity itself
    gpu = aot.parse_target("cuda:1x2x8")
    assert (gpu.platform, gpu.name, gpu.label) == ("cuda", "1x2x8", "cuda:1x2x8")
    assert gpu.device_memory_bytes == 84929347584 and "H100" in gpu.gpu_config


def test_a_target_config_file_gives_the_gpu_and_its_memory(tmp_path):
    config = tmp_path / "small.txtpb"
    config.write_text(aot.H100_80GB.replace("device_memory_size: 84929347584", "device_memory_size: 1000"))
    assert aot.parse_target("cuda:1x1x2", target_config=str(config)).device_memory_bytes == 1000


@pytest.mark.parametrize("topology,extra,message", [
    ("cuda:8", {}, "cuda:PxHxD"),
    ("cuda:1x0x8", {}, "each >= 1"),
    ("cuda:1x1x8", {"slices": 2}, "slices= is for TPU topologies"),
    ("v5e:2x2", {"slices": "two"}, "slices='two'"),
    ("v5e:2x2", {"slices": 0}, "slices=0"),
    ("v5e:2x2", {"target_config": "x.txtpb"}, "target_config= describes a GPU"),
    ("cuda:1x1x8", {"target_config": "/nonexistent.txtpb"}, "cannot read it"),
    ("v5e", {}, "expected a TPU topology"),
])
def test_malformed_targets_are_refused(topology, extra, message):
    with pytest.raises(aot.AotError, match=message.replace("(", r"\(").replace("?", r"\?")):
        aot.parse_target(topology, **extra)


def test_a_missing_compiler_exits_3_naming_the_extra(monkeypatch, capsys):
    import jax  # noqa: F401 - first: importing jax imports an installed libtpu, which sets TPU_LIBRARY_PATH
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("libtpu", "jax_cuda12_plugin",
                                                                         "jax_cuda13_plugin") else real(name, *a))
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    assert aot.main(["exp=mnist_mlp", "topology=v5e:2x2"]) == 3
    assert capsys.readouterr().err == "error: compiling for TPU needs libtpu: pip install 'jaxaccel[tpu]'\n"
    assert aot.main(["exp=mnist_mlp", "topology=cuda:1x1x8"]) == 3
    assert "pip install 'jaxaccel[cuda]'" in capsys.readouterr().err
    with pytest.raises(aot.MissingDependency, match=r"jaxaccel\[tpu\]"):
        aot.make_devices(aot.parse_target("v5e:2x2"))


def test_command_line_errors_exit_2(capsys):
    assert aot.main(["exp=mnist_mlp"]) == 2
    assert aot.main(["exp=mnist_mlp", "topology=cuda:8"]) == 2
    assert aot.main(["exp=mnist_mlpp", "topology=v5e:2x2"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors)
    assert "Did you mean mnist_mlp" in errors[2]


def test_state_bytes_and_replicated_leaves_follow_the_shardings():
    import jax
    from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P
    mesh = AbstractMesh((4,), ("data",))
    whole, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = {"w": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=split),
             "b": jax.ShapeDtypeStruct((4,), np.float32, sharding=whole),
             "step": jax.ShapeDtypeStruct((), np.int32, sharding=whole),
             "key": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=whole)}
    assert aot.state_bytes_per_device(state) == 2 * 4 * 4 + 4 * 4 + 4 + 8  # a quarter of w; a key is 2 words
    assert aot.state_bytes_total(state) == 8 * 4 * 4 + 4 * 4 + 4 + 8
    assert aot.replicated_leaves(state) == {"['b']": [4]}  # scalars are not listed


# ----------------------------------------------------------------------------------------------
# TPU: the real XLA:TPU compiler, in this process.

def _mlp_step_functions(devices, fsdp: bool):
    """A tiny Flax MLP train step (value_and_grad + optax adam) with its state replicated or
    sharded FSDP-style (MeshParallel's rule) over ``devices``; the batch split over them."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    from jaxaccel.parallel import MeshParallel

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(128)(nn.relu(nn.Dense(512)(x)))

    model, tx, par = MLP(), optax.adam(1e-3), MeshParallel(fsdp=fsdp, devices=devices)

    def init(key):
        params = model.init(key, jnp.zeros((1, 256)))["params"]
        return {"params": params, "opt": tx.init(params)}

    def step(state, x, y):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2))(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

    abstract = jax.eval_shape(init, jax.random.key(0))
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=par.leaf_sharding(a)), abstract)
    batch = lambda n: jax.ShapeDtypeStruct((64, n), jnp.float32, sharding=par.batch_sharding)  # noqa: E731
    fn = aot.Function(step, (state, batch(256), batch(128)), out_shardings=(par.state_sharding(abstract), par.replicated),
                      donate_argnums=(0,))
    return {"step": fn}, state


@needs_tpu
def test_fsdp_mlp_step_compiles_for_v5e_2x2_with_a_quarter_of_the_state_per_device():
    target = aot.parse_target("v5e:2x2")
    devices = aot.make_devices(target)
    assert len(devices) == 4 and devices[0].platform == "tpu" and "v5" in devices[0].device_kind
    figures, states = {}, {}
    for fsdp in (False, True):
        functions, states[fsdp] = _mlp_step_functions(devices, fsdp)
        figures[fsdp] = aot.compile_functions(functions)["step"]
    replicated, sharded = figures[False], figures[True]
    # Params + Adam moments: every leaf's largest axis divides by 4, so exactly a quarter of each
    # (Adam's 4-byte step count stays whole).
    assert (aot.state_bytes_per_device(states[True]) - 4) * 4 == aot.state_bytes_per_device(states[False]) - 4
    assert aot.replicated_leaves(states[True]) == {}
    assert len(aot.replicated_leaves(states[False])) == 12  # 4 params x (value, mu, nu)
    # XLA:TPU's own figures agree: the donated state is aliased, its arguments shrink ~4x.
    for f in (replicated, sharded):
        assert f["alias_bytes"] > 0.9 * aot.state_bytes_per_device(states[f is sharded])
        assert f["flops"] > 0 and f["estimated_seconds"] > 0 and f["compile_seconds"] > 0 and "problem" not in f
    assert sharded["argument_bytes"] < 0.3 * replicated["argument_bytes"]
    report = aot.build_report(target, devices, {"fsdp": True}, states[True], {"step": sharded})
    assert report["ok"] and report["devices"] == 4 and report["topology"] == "v5e:2x2"
    assert json.loads(json.dumps(report)) == report
    assert "step" in aot.format_table(report)


@needs_tpu
def test_what_does_not_fit_tpu_hbm_is_reported_not_raised():
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    devices = aot.make_devices(aot.parse_target("v5e:2x2"))
    whole = NamedSharding(Mesh(np.asarray(devices), ("data",)), P())
    huge = aot.Function(lambda x: jnp.broadcast_to(x, (40, 2 ** 28)) * 2.0,  # 40 GiB on each 16 GiB chip
                        (jax.ShapeDtypeStruct((2 ** 28,), jnp.float32, sharding=whole),), out_shardings=whole)
    small = aot.Function(lambda x: x + 1, (jax.ShapeDtypeStruct((8,), jnp.float32, sharding=whole),))
    results = aot.compile_functions({"huge": huge, "small": small})
    assert results["huge"]["problem"] == "does not fit" and "RESOURCE_EXHAUSTED" in results["huge"]["error"]
    assert "problem" not in results["small"]
    assert "DOES NOT FIT" in aot.format_table(aot.build_report(aot.parse_target("v5e:2x2"), devices, {}, {}, results))


@needs_tpu
def test_int8_paths_compile_for_tpu(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import aot_int8_paths
    devices = aot.make_devices(aot.parse_target("v5e:2x2"))
    functions = aot_int8_paths.int8_functions(devices, tmp_path)
    results = aot.compile_functions(functions)
    assert all("problem" not in f for f in results.values()), results
    # XLA:TPU keeps the exact s8 x s8 -> s32 convolution.
    hlo = aot_int8_paths.compiled_text(functions["int8_conv"])
    assert " s32[" in hlo and "convolution(" in hlo


@needs_tpu
def test_cli_writes_aot_json_for_an_fsdp_run(tmp_path):
    # 64 steps in one group: one step-group executable (a TPU plan compiles one per power of two).
    result = _aot_cli("exp=mnist_mlp", "topology=v5e:2x2", "parallel.fsdp=true", "functions=train_steps",
                      f"workdir={tmp_path}", "model.features=[64,32]", "train.steps=64", "train.log_every_steps=64")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "aot.json").read_text())
    assert {"topology", "devices", "plan", "state_bytes_per_device", "functions"} <= set(report)
    assert list(report["functions"]) == ["train_steps_n64"] and report["devices"] == 4
    assert report["plan"]["fsdp"] and report["plan"]["mesh"] == {"data": 1, "fsdp": 4}
    # Biases of 10 classes and the step counters stay whole; everything else is split in 4.
    assert report["state_bytes_per_device"] < 0.26 * report["state_bytes_replicated"]
    assert set(report["replicated_leaves"]) == {".params['Dense_2']['bias']", ".opt_state.inner_state[0].mu['Dense_2']['bias']",
                                                ".opt_state.inner_state[0].nu['Dense_2']['bias']"}
    assert "train_steps" in result.stdout and "libtpu" not in result.stderr.lower()


@needs_tpu
def test_mnist_cnn_fsdp_on_v5e_4x4_holds_at_most_a_twelfth_of_the_state_per_device():
    """The issue's target, from the shardings alone (no compile needed)."""
    import jaxaccel
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_cnn"), ["parallel.fsdp=true"])
    built = aot.build_functions(cfg, aot.make_devices(aot.parse_target("v5e:4x4")))
    assert aot.state_bytes_per_device(built.state) <= aot.state_bytes_total(built.state) / 12
    # The TPU plan: XLA's convolution, the per-step guard, device loops with compiled-in trip counts.
    assert (built.plan["conv"], built.plan["guard"], built.plan["static_trip_count"]) == ("xla", "step", True)
    assert built.plan["int8_conv_result"] == "int32" and built.plan["eval_batch_size"] == 1008
    assert {"eval", "report_float", "report_int8"} <= set(built.functions)
    assert any(name.startswith("train_steps_n") for name in built.functions)


# ----------------------------------------------------------------------------------------------
# NVIDIA GPU: the real XLA:GPU compiler, in a fresh process (jax_platforms=cpu before JAX starts).

@needs_cuda
def test_int8_paths_compile_for_an_8_gpu_h100_target():
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "aot_int8_paths.py"), "cuda:1x1x8"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu",
                                 "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert all("problem" not in f for f in out["functions"].values()), out["functions"]
    assert all(f["flops"] is None for f in out["functions"].values())  # XLA:GPU gives no cost analysis
    # cuDNN's int8 convolution: s8 operands as they are, an f32 result.
    cudnn = [line for line in out["int8_conv_hlo"].splitlines() if "__cudnn$convForward" in line]
    assert len(cudnn) == 1 and "= (f32[8,28,28,32]" in cudnn[0] and "f32[8,28,28,1]" not in out["int8_conv_hlo"]
    # A bare s32 result is what XLA:GPU cannot lower (CPU and TPU use it, converted to f32 after).
    assert out["bare_s32_conv"]["problem"] == "does not compile"
    assert "integer convolutions" in out["bare_s32_conv"]["error"]


@needs_cuda
def test_what_does_not_fit_a_gpu_is_reported(tmp_path):
    config = tmp_path / "small_gpu.txtpb"
    config.write_text(aot.H100_80GB.replace("device_memory_size: 84929347584", "device_memory_size: 1000000"))
    result = _aot_cli("exp=mnist_mlp", "topology=cuda:1x1x2", f"target_config={config}", "functions=eval",
                      f"workdir={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: on cuda:1x1x2: eval does not fit")
    report = json.loads((tmp_path / "aot.json").read_text())
    assert not report["ok"] and report["device_memory_bytes"] == 1000000
    assert report["functions"]["eval"]["total_bytes"] > 1000000


def test_a_function_that_cannot_be_lowered_is_reported_not_raised():
    import jax
    import jax.numpy as jnp
    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    broken = aot.Function(lambda x: x.reshape(3), (x,))  # fails while tracing, before any compiler
    fine = aot.Function(jax.jit(lambda x: x * 2), (x,))
    results = aot.compile_functions({"broken": broken, "fine": fine})
    assert results["broken"]["problem"] == "does not compile"
    assert results["broken"]["error"].startswith("TypeError: cannot reshape array of shape (4,)")
    assert results["fine"]["argument_bytes"] == results["fine"]["output_bytes"] == 16


def test_one_step_group_per_family_represents_the_run():
    from jaxaccel import aot_run
    names = ["train_steps_n4", "train_steps_n64", "train_steps_n16", "train_steps_guarded_x1",
             "train_steps_guarded_x10", "copy_state", "eval", "report_float", "report_int8"]
    assert aot_run.representatives(names) == ["train_steps_n64", "train_steps_guarded_x10", "copy_state", "eval",
                                              "report_float", "report_int8"]


def test_datasets_not_prepared_here_take_their_shapes_from_the_catalog(tmp_path):
    from jaxaccel import aot_run
    from jaxaccel.data import DataError, Decoding
    sizes, source = aot_run.dataset_sizes("cifar10", str(tmp_path), Decoding())
    assert source == "TFDS catalog"
    assert (sizes.input_shape, sizes.input_dtype, sizes.num_classes, sizes.num_train) == ((32, 32, 3), "uint8", 10, 50000)
    text, _ = aot_run.dataset_sizes("ag_news_subset", str(tmp_path), Decoding(max_length=64))
    assert (text.input_shape, text.input_dtype) == ((64,), "int32")
    prepared, source = aot_run.dataset_sizes("mnist", None, Decoding())
    assert source == "prepared files" and prepared.num_train == 60000
    with pytest.raises(DataError, match="not prepared"):
        aot_run.dataset_sizes("imagenet2012", str(tmp_path), Decoding())


def test_the_plan_has_the_runs_surgery_points():
    # A shrinking run ends a step group at each shrink: the AOT compile must plan the same groups.
    import jax

    import jaxaccel
    from jaxaccel import aot_run, setup
    cfg = jaxaccel.experiments.get("mnist_mlp_shrink")
    _, plan, _ = aot_run.build_functions(cfg, jax.devices())
    assert plan["surgery_points"] == list(setup.build(cfg).plan.surgery_points) != []

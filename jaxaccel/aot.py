"""Ahead-of-time compilation for hardware this machine does not have: TPU topologies, NVIDIA GPUs.

    python -m jaxaccel.aot exp=NAME topology=v5e:4x4 [slices=N] [key=value ...]
    python -m jaxaccel.aot exp=NAME topology=cuda:1x1x8 [target_config=FILE] [key=value ...]

builds the run's functions with abstract inputs laid out on the target's devices, compiles each with
the real XLA:TPU (libtpu) or XLA:GPU (the CUDA plugin) compiler, prints one table and writes the
same as JSON to ``<workdir>/aot.json``: per function the per-device argument, output, temporary
and code bytes, FLOPs and XLA's time estimate (TPU only), and the compile time; the plan, the mesh,
the train state's bytes per device and its leaves that stay replicated.

A TPU topology is any name ``jax.experimental.topologies`` accepts (``v5e:2x2`` ... ``v5e:16x16``,
``v6e:4x4``, ``v5p:2x2x1``, ``v4:2x2x1``; ``slices=N`` for N slices). ``cuda:PxHxD`` is P
partitions x H hosts x D GPUs per host of an H100 80GB, or of the GPU a ``GpuTargetConfigProto``
text file describes (``target_config=FILE``).

What it tells: that the run compiles for the target, and how many bytes each device needs. XLA:TPU
refuses at compile time a program that does not fit the chip's HBM; for GPUs (no such check) the
program's total is compared with the target's ``device_memory_size``. What it cannot tell: speed
(XLA's estimate is a roofline, not a measurement) and anything about the host (data loading).

Exit status: 0 everything compiled and fits; 2 a bad command line, or something does not fit or
does not compile (the table and aot.json say which); 3 the compiler for the target is not
installed (``pip install 'jaxaccel[tpu]'`` / ``'jaxaccel[cuda]'``) or the data is missing.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["AotError", "MissingDependency", "Target", "Function", "Built", "parse_target", "make_devices",
           "compile_functions", "state_bytes_per_device", "replicated_leaves", "build_report", "format_table",
           "build_functions", "main", "H100_80GB"]


class AotError(Exception):
    """A bad target, or a function that does not fit or does not compile (exit 2)."""


class MissingDependency(Exception):
    """The compiler for the target is not installed (exit 3); the message names the extra."""


# The H100 80GB (SXM) that topology=cuda:PxHxD compiles for unless target_config=FILE says otherwise.
H100_80GB = """gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 8
}
runtime_version {
  major: 12
  minor: 8
}
device_description_str: "NVIDIA H100 80GB HBM3"
"""

_TPU_EXAMPLES = "v5e:2x2, v5e:4x4, v6e:8x8, v5p:2x2x1, v4:2x2x1"


# ----------------------------------------------------------------------------------------------
# Targets and their devices.

@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for. ``platform``: "tpu" or "cuda"; ``name``: the TPU topology name or the
    GPU topology "PxHxD"; ``gpu_config``: the GpuTargetConfigProto text (cuda only)."""
    platform: str
    name: str
    slices: int = 1
    gpu_config: str | None = None
    gpu_config_source: str | None = None

    @property
    def label(self) -> str:
        if self.platform == "cuda":
            return f"cuda:{self.name}"
        return self.name + (f" x {self.slices} slices" if self.slices > 1 else "")

    @property
    def device_memory_bytes(self) -> int | None:
        """Memory of one GPU from the target config (TPU: None, XLA:TPU checks HBM itself)."""
        found = re.search(r"device_memory_size:\s*(\d+)", self.gpu_config or "")
        return int(found.group(1)) if found else None


def parse_target(topology: str, slices: int | str | None = None, target_config: str | None = None) -> Target:
    """The target a ``topology=`` (and ``slices=``, ``target_config=``) names; :class:`AotError` if
    malformed. TPU names are checked by libtpu when the devices are made."""
    try:
        slices = 1 if slices in (None, "") else int(slices)
    except ValueError:
        raise AotError(f"slices={slices!r}: expected a whole number of TPU slices (>= 1)") from None
    if slices < 1:
        raise AotError(f"slices={slices}: expected a whole number of TPU slices (>= 1)")
    if topology.startswith("cuda:"):
        found = re.fullmatch(r"cuda:(\d+)x(\d+)x(\d+)", topology)
        if not found or min(map(int, found.groups())) < 1:
            raise AotError(f"topology={topology}: a GPU target is cuda:PxHxD (partitions x hosts x GPUs per "
                           "host, each >= 1), e.g. cuda:1x1x8")
        if slices != 1:
            raise AotError("slices= is for TPU topologies; a GPU target gives its hosts in cuda:PxHxD")
        text, source = H100_80GB, "built-in H100 80GB"
        if target_config:
            try:
                text, source = Path(target_config).read_text(), target_config
            except OSError as e:
                raise AotError(f"target_config={target_config}: cannot read it ({e.strerror})") from None
            if "gpu_device_info" not in text:
                raise AotError(f"target_config={target_config}: not a GpuTargetConfigProto in text form "
                               "(no gpu_device_info)")
        return Target("cuda", "x".join(found.groups()), 1, text, source)
    if target_config:
        raise AotError("target_config= describes a GPU; give it with topology=cuda:PxHxD")
    if not re.fullmatch(r"[A-Za-z0-9_ ]+[=_:][0-9x]+(_twisted|_untwisted)?", topology):
        raise AotError(f"topology={topology}: expected a TPU topology ({_TPU_EXAMPLES}) or cuda:PxHxD")
    return Target("tpu", topology, slices)


def missing_compiler(platform: str) -> str | None:
    """Why the compiler for ``platform`` cannot load (None: it is installed)."""
    if platform == "tpu":
        if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
            return "compiling for TPU needs libtpu: pip install 'jaxaccel[tpu]'"
        return None
    if not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        return "compiling for NVIDIA GPUs needs the CUDA plugin of jaxlib: pip install 'jaxaccel[cuda]'"
    return None


def make_devices(target: Target) -> list:
    """The target's (compile-only) devices. A CUDA target needs ``jax_platforms=cpu`` set before
    JAX starts (``python -m jaxaccel.aot`` does it): otherwise the CUDA plugin looks for a GPU."""
    problem = missing_compiler(target.platform)
    if problem:
        raise MissingDependency(problem)
    import jax
    from jax.experimental import topologies
    try:
        if target.platform == "tpu":
            kw = {"num_slices": target.slices} if target.slices > 1 else {}
            return list(topologies.get_topology_desc(topology_name=target.name, platform="tpu", **kw).devices)
        return list(topologies.get_topology_desc(platform="cuda", target_config=target.gpu_config,
                                                 topology=target.name).devices)
    except NotImplementedError:
        raise AotError(f"topology={target.label}: the CUDA plugin did not register its compiler; compile for "
                       "GPUs in a process that set jax_platforms=cpu before JAX started "
                       "(python -m jaxaccel.aot does)") from None
    except jax.errors.JaxRuntimeError as e:
        hint = f" (TPU topologies: {_TPU_EXAMPLES})" if target.platform == "tpu" else ""
        raise AotError(f"topology={target.label}: {_first_line(e)}{hint}") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ----------------------------------------------------------------------------------------------
# Compiling functions and reading their figures.

@dataclasses.dataclass
class Function:
    """One function to compile: ``fn`` (jitted, or plain with ``in_shardings``/``out_shardings``)
    and ``args``, pytrees of ``jax.ShapeDtypeStruct`` whose ``sharding`` places them on the
    target's devices."""
    fn: Callable
    args: tuple
    in_shardings: Any = None
    out_shardings: Any = None
    donate_argnums: tuple[int, ...] = ()

    @classmethod
    def of(cls, spec: "Function | tuple | dict") -> "Function":
        """From a Function, its keyword arguments, ``(jitted, args)`` or
        ``(fn, in_shardings, out_shardings, args)``."""
        if isinstance(spec, Function):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        if len(spec) == 2:
            return cls(spec[0], tuple(spec[1]))
        fn, in_shardings, out_shardings, args = spec
        return cls(fn, tuple(args), in_shardings, out_shardings)

    def lower(self):
        import jax
        jitted = self.fn
        if not hasattr(jitted, "lower"):
            kw = {k: v for k, v in (("in_shardings", self.in_shardings), ("out_shardings", self.out_shardings))
                  if v is not None}
            jitted = jax.jit(self.fn, donate_argnums=self.donate_argnums, **kw)
        return jitted.lower(*self.args)


def _figures(compiled, seconds: float) -> dict[str, Any]:
    """Per-device bytes (memory_analysis), FLOPs and XLA's time estimate (cost_analysis; None where
    the backend gives none, as XLA:GPU), compile seconds."""
    mem = compiled.memory_analysis()
    out = {"argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
           "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
           "code_bytes": int(mem.generated_code_size_in_bytes)}
    # Donated (aliased) arguments share their buffers with outputs: count them once.
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                          + out["temp_bytes"] + out["code_bytes"])
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        cost = None
    cost = (cost[0] if cost else None) if isinstance(cost, (list, tuple)) else cost
    get = lambda key: float(cost[key]) if cost and cost.get(key, -1) >= 0 else None  # noqa: E731
    out.update(flops=get("flops"), bytes_accessed=get("bytes accessed"), estimated_seconds=get("optimal_seconds"),
               compile_seconds=round(seconds, 3))
    return out


def compile_functions(functions: Mapping[str, Any], device_memory_bytes: int | None = None,
                      compiler_options: dict | None = None) -> dict[str, dict[str, Any]]:
    """Compile every function; returns its figures by name. A function that does not compile gets
    ``{"error": ..., "problem": "does not compile"}``; one that runs out of device memory
    (XLA:TPU's RESOURCE_EXHAUSTED, or a total above ``device_memory_bytes``) ``"does not fit"``.
    Nothing is raised: the caller reports every function, then decides."""
    import jax
    results: dict[str, dict[str, Any]] = {}
    for name, spec in functions.items():
        t0 = time.perf_counter()
        try:
            compiled = Function.of(spec).lower().compile(compiler_options=compiler_options)
        except jax.errors.JaxRuntimeError as e:
            fit = "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e)
            results[name] = {"problem": "does not fit" if fit else "does not compile", "error": _error_text(e)}
            continue
        except Exception as e:  # noqa: BLE001 - lowering: no rule for the platform, a sharding that cannot be
            results[name] = {"problem": "does not compile", "error": f"{type(e).__name__}: {_error_text(e)}"}
            continue
        figures = _figures(compiled, time.perf_counter() - t0)
        if device_memory_bytes and figures["total_bytes"] > device_memory_bytes:
            figures.update(problem="does not fit", error=f"needs {_bytes(figures['total_bytes'])} per device, "
                                                         f"the device has {_bytes(device_memory_bytes)}")
        results[name] = figures
    return results


def _error_text(error: BaseException, lines: int = 3) -> str:
    kept = [line.strip() for line in str(error).strip().splitlines() if line.strip()][:lines]
    return " ".join(kept)[:600]


# ----------------------------------------------------------------------------------------------
# State bytes and the report.

def _leaf_bytes(shape: tuple[int, ...], dtype: Any) -> int:
    import jax
    import numpy as np
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))  # one key's raw words
        return math.prod(shape) * data.size * data.dtype.itemsize
    return math.prod(shape) * np.dtype(dtype).itemsize


def state_bytes_per_device(state: Any) -> int:
    """Bytes one device holds of ``state``, a pytree of ShapeDtypeStructs (or arrays) with shardings."""
    import jax
    total = 0
    for leaf in jax.tree.leaves(state):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        total += _leaf_bytes(tuple(shape), leaf.dtype)
    return total


def state_bytes_total(state: Any) -> int:
    """Bytes of one whole copy of ``state``: what each device holds when it is replicated."""
    import jax
    return sum(_leaf_bytes(tuple(leaf.shape), leaf.dtype) for leaf in jax.tree.leaves(state))


def replicated_leaves(state: Any) -> dict[str, list[int]]:
    """Paths and shapes of the non-scalar leaves every device holds whole (FSDP found no axis the
    device count divides, or the state is not sharded at all)."""
    import jax
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        sharding = getattr(leaf, "sharding", None)
        if math.prod(leaf.shape) > 1 and (sharding is None or sharding.is_fully_replicated):
            found[jax.tree_util.keystr(path)] = list(leaf.shape)
    return found


def build_report(target: Target, devices: list, plan: Mapping[str, Any], state: Any,
                 functions: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The aot.json contents."""
    return {
        "topology": target.label, "platform": target.platform, "slices": target.slices,
        "devices": len(devices), "device_kind": devices[0].device_kind,
        "hosts": len({d.process_index for d in devices}),
        "device_memory_bytes": target.device_memory_bytes,
        "gpu_target_config": target.gpu_config_source,
        "plan": dict(plan),
        "state_bytes_per_device": state_bytes_per_device(state),
        "state_bytes_replicated": state_bytes_total(state),
        "replicated_leaves": replicated_leaves(state),
        "functions": dict(functions),
        "ok": not any("problem" in f for f in functions.values()),
    }


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_table(report: Mapping[str, Any]) -> str:
    """The report as text: a header and one row per function."""
    memory = (f", {_bytes(report['device_memory_bytes'])} each" if report["device_memory_bytes"]
              else " (XLA:TPU checks HBM capacity at compile)" if report["platform"] == "tpu" else "")
    plan = " ".join(f"{k}={v}" for k, v in report["plan"].items())
    lines = [f"target {report['topology']}: {report['devices']} x {report['device_kind']} on "
             f"{report['hosts']} host(s){memory}",
             f"plan: {plan}",
             f"train state per device: {_bytes(report['state_bytes_per_device'])} "
             f"(one whole copy: {_bytes(report['state_bytes_replicated'])}; "
             f"{len(report['replicated_leaves'])} non-scalar leaves replicated)", ""]
    head = ("function", "arguments", "outputs", "temp", "code", "total/device", "GFLOP", "XLA est.", "compile")
    rows = [head]
    for name, f in report["functions"].items():
        if "argument_bytes" not in f:
            rows.append((name, f"{f['problem'].upper()}: {f['error']}"))
            continue
        est = f"{f['estimated_seconds'] * 1e3:.3f} ms" if f["estimated_seconds"] is not None else "-"
        rows.append((name, _bytes(f["argument_bytes"]), _bytes(f["output_bytes"]), _bytes(f["temp_bytes"]),
                     _bytes(f["code_bytes"]), _bytes(f["total_bytes"]) + (" DOES NOT FIT" if "problem" in f else ""),
                     f"{f['flops'] / 1e9:.3f}" if f["flops"] is not None else "-", est,
                     f"{f['compile_seconds']:.1f} s"))
    widths = [max(len(r[i]) for r in rows if len(r) == len(head) and i < len(r)) for i in range(len(head))]
    for row in rows:
        if len(row) == len(head):
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        else:
            lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The run's functions.

@dataclasses.dataclass
class Built:
    """What :func:`build_functions` returns: the functions to compile, the plan the run would
    follow on the target, and its abstract train state (with shardings)."""
    functions: dict[str, Function]
    plan: dict[str, Any]
    state: Any


def build_functions(cfg: Any, devices: list) -> Built:
    """The functions a run of ``cfg`` compiles, built for ``devices`` as the run would build them.

    PHASE 1 (jaxaccel.aot_run): a first version that rebuilds the step groups, the evaluation and
    the compression report's inference from the plan, optimizer, step and model pieces the trainer
    uses. The trainer's setup should provide them itself (same plan, defaults and shardings)."""
    from jaxaccel import aot_run
    functions, plan, state = aot_run.build_functions(cfg, devices)
    return Built({name: Function.of(spec) for name, spec in functions.items()}, plan, state)


# ----------------------------------------------------------------------------------------------
# Command line.

USAGE = """usage: python -m jaxaccel.aot exp=NAME topology=TOPOLOGY [slices=N] [target_config=FILE]
                              [functions=NAME,...] [key=value ...]

TOPOLOGY: a TPU topology (v5e:2x2, v5e:4x4, v6e:8x8, v5p:2x2x1, v4:2x2x1, ...; slices=N for N
slices) or cuda:PxHxD (partitions x hosts x GPUs per host; an H100 80GB unless target_config=FILE
gives a GpuTargetConfigProto text). functions= compiles only those (default: every function the
run compiles). Other keys are the run's (python -m jaxaccel.run --help).
Writes <workdir>/aot.json. Exit 0 compiled and fits; 2 bad arguments, does not fit or does not
compile; 3 compiler or data not installed."""

_OWN_KEYS = ("topology", "slices", "target_config", "functions")


def _select(functions: dict[str, Any], names: str) -> dict[str, Any]:
    """The functions ``functions=a,b`` names: each name itself, or the family it begins
    (``train_steps`` selects ``train_steps_n100``, ``train_steps_guarded_x10``, ...)."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    chosen = {k: v for k, v in functions.items() if any(k == n or k.startswith(n + "_") for n in wanted)}
    missing = [n for n in wanted if not any(k == n or k.startswith(n + "_") for k in functions)]
    if missing or not wanted:
        raise AotError(f"functions={names}: this run compiles {', '.join(functions)}")
    return chosen


def _prepare_process(target: Target) -> None:
    """Before JAX starts in this process: CPU as the local backend (the CUDA plugin would look for a
    GPU, the TPU runtime for chips), several compile-only libtpu users side by side (the lockfile
    is for processes that drive chips), and no libtpu warnings about the (absent) TPU host."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    import jax
    from jax._src import xla_bridge
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in _OWN_KEYS and "=" in a}
    rest = [a for a in argv if a.split("=", 1)[0] not in _OWN_KEYS]
    exp = [a for a in rest if a.startswith("exp=")]
    if len(exp) != 1 or "topology" not in own:
        return _fail(2, "give exp=NAME and topology=TOPOLOGY (python -m jaxaccel.aot --help)")
    from jaxaccel import experiments
    from jaxaccel import storage
    from jaxaccel.config import ConfigError
    from jaxaccel.data import DataError
    try:
        target = parse_target(own["topology"], own.get("slices"), own.get("target_config"))
        cfg = experiments.override(experiments.get(exp[0][4:]), [a for a in rest if not a.startswith("exp=")])
        if missing_compiler(target.platform):
            raise MissingDependency(missing_compiler(target.platform))
        _prepare_process(target)
        devices = make_devices(target)
        built = build_functions(cfg, devices)
        if "functions" in own:
            built.functions = _select(built.functions, own["functions"])
    except (AotError, ConfigError) as e:
        return _fail(2, str(e))
    except (MissingDependency, DataError) as e:
        return _fail(3, str(e))
    results = compile_functions(built.functions, target.device_memory_bytes)
    report = build_report(target, devices, built.plan, built.state, results)
    workdir = storage.path(cfg.workdir or f"runs/{cfg.experiment}")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "aot.json").write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"written: {workdir / 'aot.json'}")
    if not report["ok"]:
        bad = [f"{name} {f['problem']}" for name, f in results.items() if "problem" in f]
        return _fail(2, f"on {target.label}: {'; '.join(bad)} (see {workdir / 'aot.json'})")
    return 0


if __name__ == "__main__":
    # Through the imported module: run as __main__, this file's classes (Function, AotError) would
    # be other objects than those jaxaccel.aot_run imports.
    from jaxaccel import aot
    sys.exit(aot.main())

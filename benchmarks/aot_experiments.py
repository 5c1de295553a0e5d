"""Every registered experiment compiled ahead of time for one target, one table row each.

    python benchmarks/aot_experiments.py --topology cuda:1x1x8 [--every-length] [--experiments A B]

Needs the target's compiler: libtpu (``pip install -e '.[tpu]'``) for TPU topologies, the CUDA
plugin (``.[cuda]``) for ``cuda:PxHxD`` (run with JAX_PLATFORMS=cpu). Compiles, per experiment, what
``python -m jaxaccel.aot`` would, but by default only the longest of the step-group executables
that differ in their compiled-in length (``--every-length``: all of them): the step group,
evaluation and the compression report's float and int8 inference (also the int8 export's).
Prints the plan's choices, per-device bytes (the largest function) and compile seconds; exit 1 if
any function does not compile or does not fit.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--experiments", nargs="*", default=None)
    parser.add_argument("--every-length", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TFDS_DATA_DIR", str(ROOT.parent / "shared" / "tfds"))
    from jaxaccel import aot
    target = aot.parse_target(args.topology)
    if aot.missing_compiler(target.platform):
        print(aot.missing_compiler(target.platform), file=sys.stderr)
        return 3
    aot._prepare_process(target)
    import jaxaccel
    from jaxaccel import aot_run
    devices = aot.make_devices(target)
    print(f"# benchmarks/aot_experiments.py --topology {args.topology}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{len(devices)} x {devices[0].device_kind}, load {os.getloadavg()[0]:.1f}\n")
    print("| experiment | functions compiled | loop, conv, guard, int8 conv result | largest per device "
          "| state per device | compile s | result |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    failed = False
    for name in args.experiments or jaxaccel.experiments.names():
        built = aot.build_functions(jaxaccel.experiments.get(name), devices)
        names = list(built.functions) if args.every_length else aot_run.representatives(list(built.functions))
        results = aot.compile_functions({n: built.functions[n] for n in names}, target.device_memory_bytes)
        problems = [f"{n}: {f['problem']} ({f['error'].splitlines()[0][:120]})" for n, f in results.items() if "problem" in f]
        failed |= bool(problems)
        plan = built.plan
        largest = max((f.get("total_bytes", 0) for f in results.values()), default=0)
        seconds = sum(f.get("compile_seconds", 0) for f in results.values())
        print(f"| {name} | {', '.join(names)} | {plan['loop']} {'static' if plan['static_trip_count'] else 'dynamic'}, "
              f"{plan['conv']}, {plan['guard']}, {plan['int8_conv_result']} | {largest / 2**20:.1f} MiB | "
              f"{aot.state_bytes_per_device(built.state) / 2**20:.2f} MiB | {seconds:.0f} | "
              f"{'; '.join(problems) or 'compiles' + (', fits' if target.device_memory_bytes else '')} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

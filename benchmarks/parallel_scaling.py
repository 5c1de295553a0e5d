"""Steps/s at 1, 2, 4 and 8 emulated CPU devices at the same global batch.

Each point is a real run (``python -m jaxaccel.run``) in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``; ``train_seconds`` from its summary.json
(compile and evaluation excluded). Rounds alternate the device counts so drift on a shared
machine hits every count alike; we print medians and each count's cost relative to 1 device.
Emulated devices share the same cores, so this measures the overhead of partitioning the step
(collectives, smaller per-device matmuls), not a speedup.

    python benchmarks/parallel_scaling.py --devices 1 2 4 8 --repeats 3 --modes jit pmap
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(exp: str, devices: int, mode: str, steps: int, extra: list[str]) -> float:
    """Training steps per second of one run."""
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        env.setdefault("TFDS_DATA_DIR", str(ROOT.parent / "shared" / "tfds"))
        cmd = [sys.executable, "-m", "jaxaccel.run", f"exp={exp}", f"train.steps={steps}", f"workdir={workdir}",
               f"parallel.mode={mode}", "parallel.check_replicas=false", "checkpoint.every_steps=100000", *extra]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        summary = json.loads((Path(workdir) / "summary.json").read_text())
        return summary["steps"] / summary["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exp", default="mnist_mlp")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", default=["jit"], choices=["jit", "pmap", "fsdp"])
    parser.add_argument("--steps", type=int, default=468, help="training steps per run (468 = one MNIST epoch at batch 128)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="more key=value overrides for every run")
    args = parser.parse_args()
    points = [(mode, n) for mode in args.modes for n in args.devices]
    rates: dict[tuple[str, int], list[float]] = {p: [] for p in points}
    for r in range(args.repeats):
        for mode, n in points if r % 2 == 0 else points[::-1]:
            extra = ["parallel.fsdp=true"] if mode == "fsdp" else []
            rates[(mode, n)].append(one_run(args.exp, n, "jit" if mode == "fsdp" else mode, args.steps,
                                            extra + args.extra))
            print(f"round {r}: {mode} x{n}: {rates[(mode, n)][-1]:.1f} steps/s", flush=True)
    base = statistics.median(rates[(args.modes[0], args.devices[0])])
    print(f"\n{args.exp}, global batch as configured, {args.steps} steps, medians of {args.repeats}\n")
    print(f"| mode | devices | steps/s (median) | runs | step time vs {args.modes[0]} x{args.devices[0]} |")
    print("| --- | --- | --- | --- | --- |")
    for mode, n in points:
        med = statistics.median(rates[(mode, n)])
        runs = ", ".join(f"{x:.0f}" for x in rates[(mode, n)])
        print(f"| {mode} | {n} | {med:.1f} | {runs} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()

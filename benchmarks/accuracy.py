"""Holds every experiment to its docstring: runs its command and compares accuracy and runtime.

    python benchmarks/accuracy.py [NAME ...] [--seeds 0 1 2]

Runs `python -m jaxaccel.run exp=NAME seed=S` in a fresh workdir for each seed (by default the
seeds its docstring's claim rests on: 0, 1, 2 where it says "mean of 3 seeds", else 0), then prints a
Markdown table: expected vs measured accuracy (mean over seeds), the whole command's wall time
and the training time. Exits 1 if a mean accuracy is below the docstring's ">= X%" floor.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jaxaccel


def run(name: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jaxaccel.run", f"exp={name}", f"seed={seed}",
                        f"workdir={workdir}"], check=True, capture_output=True)
        summary = json.loads((Path(workdir) / "summary.json").read_text())
        summary["wall_seconds"] = time.perf_counter() - start
        return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="seeds for every experiment (default: those its docstring claims)")
    args = parser.parse_args()
    # Experiments without a measured floor (their data is not on this machine) run only when named.
    names = args.names or [n for n in jaxaccel.experiments.names()
                           if not jaxaccel.experiments.info(n).unavailable and not jaxaccel.experiments.info(n).not_measured]
    print("| experiment | expected | measured (mean of seeds) | per seed | sparsity | export bytes | command wall s | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    failed = []
    for name in names:
        info = jaxaccel.experiments.info(name)
        seeds = args.seeds or ([0, 1, 2] if "mean of 3 seeds" in info.accuracy else [0])
        runs = [run(name, seed) for seed in seeds]
        accs = [r["test_accuracy"] for r in runs]
        mean = statistics.mean(accs)
        sparsity = statistics.mean(r["sparsity"] for r in runs)
        if info.expected_accuracy and mean < info.expected_accuracy:
            failed.append(name)
        if info.expected_sparsity is not None and sparsity < info.expected_sparsity - 1e-4:
            failed.append(f"{name} (sparsity)")
        print(f"| {name} | {info.accuracy} | {100 * mean:.2f}% | {', '.join(f'{100 * a:.2f}' for a in accs)} | "
              f"{100 * sparsity:.2f}% | {runs[0]['compressed_bytes']:,} | "
              f"{statistics.median(r['wall_seconds'] for r in runs):.1f} | "
              f"{statistics.median(r['train_seconds'] for r in runs):.1f} |", flush=True)
    if failed:
        print(f"below the docstring floor: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

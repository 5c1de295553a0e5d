"""CPU speed of this checkout against an earlier commit, side by side: does anything get slower?

    python benchmarks/before_after.py --before 5ffb53d [--experiments mnist_mlp mnist_cnn mnist_fast]
                                      [--rounds 3] [--epochs 2]

Checks the earlier commit out into a temporary git worktree, then runs each experiment through
its command line (``python -m jaxaccel.run exp=NAME train.epochs=E``) in the earlier checkout and
in this one, alternating (before, after, before, ...) so drifts in the machine's load hit both,
each run a fresh process with its own workdir. Reports the median seconds of the last epoch
(``summary.json`` ``epoch_seconds[-1]``: compile, the first epoch's warm-up and evaluation excluded)
and of the whole command, and the after/before ratios. Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(checkout: Path, exp: str, epochs: int) -> tuple[float, float, float]:
    """(last epoch's seconds, wall seconds of the command, seconds from process start to the first
    step) of one run in ``checkout``."""
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "jaxaccel.run", f"exp={exp}", f"workdir={workdir}",
                                 "train.steps=null", f"train.epochs={epochs}"],
                                cwd=checkout, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode:
            raise SystemExit(f"{checkout}: {exp} failed ({result.returncode}):\n{result.stderr[-2000:]}")
        summary = json.loads((Path(workdir) / "summary.json").read_text())
        return summary["epoch_seconds"][-1], wall, summary["seconds_to_first_step"]["from_process_start"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier commit")
    parser.add_argument("--experiments", nargs="+", default=["mnist_mlp", "mnist_cnn", "mnist_fast"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TFDS_DATA_DIR", str(ROOT.parent / "shared" / "tfds"))
    after_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        # The experiments install as jaxaccel.experiment_defs (a package-dir mapping, not a folder).
        (before / "jaxaccel" / "experiment_defs").symlink_to("../experiments")
        try:
            times = {(e, w): [] for e in args.experiments for w in ("before", "after")}
            for _ in range(args.rounds):
                for exp in args.experiments:
                    for which, checkout in (("before", before), ("after", ROOT)):
                        times[(exp, which)].append(run(checkout, exp, args.epochs))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    print(f"\n# benchmarks/before_after.py: {args.before} (before) vs {after_commit} (after, with uncommitted "
          f"changes if any), {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}, medians of {args.rounds} alternating rounds\n")
    print("| experiment | last epoch before | after | after / before | command before | after | after / before "
          "| to first step before | after | epochs (before; after) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for exp in args.experiments:
        (eb, wb, fb), (ea, wa, fa) = ([statistics.median(t[i] for t in times[(exp, w)]) for i in (0, 1, 2)]
                                      for w in ("before", "after"))
        runs = "; ".join(", ".join(f"{t[0]:.2f}" for t in times[(exp, w)]) for w in ("before", "after"))
        print(f"| {exp} | {eb:.2f} s | {ea:.2f} s | {ea / eb:.2f}x | {wb:.1f} s | {wa:.1f} s | {wa / wb:.2f}x | "
              f"{fb:.1f} s | {fa:.1f} s | {runs} |")


if __name__ == "__main__":
    main()

"""What a model change buys: training speed per step after it, and the export's size and inference
speed, against the dense experiment of the same workload, side by side on one machine.

    python benchmarks/surgery_speed.py [--pairs mnist_lowrank:mnist_mlp ...] [--repeats 3] [--out DIR]

Each pair is ``TECHNIQUE_EXPERIMENT:DENSE_EXPERIMENT`` (default: low-rank and channel shrinking of
LeNet-300-100 against ``mnist_mlp``, shrinking and low-rank of the flax-example CNN against ``mnist_cnn``). Runs
alternate (dense, technique, dense, ...), each a fresh ``python -m jaxaccel.run`` with its own
workdir, so drifts of the machine's load hit both.

* Training: seconds per step of the epochs run wholly after the technique's last model change
  (``summary.json``: ``epoch_seconds``, and the steps of its ``surgery`` records), against every
  epoch of the dense run but its first; the median epoch per run, the median over runs; the
  speed-up is dense / technique. The whole run's training seconds are reported too.
* Export: parameters and bytes of ``export/`` (``summary.json``: ``param_count``, ``compressed_bytes``), and the
  median time of one ``jaxaccel.export.load(...)(images)`` call on a batch of ``--batch`` test
  images (compiled first; calls alternate between the two exports).

Run it on a quiet machine; it prints a markdown table.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's jaxaccel, also when run as a script

DEFAULT_PAIRS = ["mnist_lowrank:mnist_mlp", "mnist_mlp_shrink:mnist_mlp", "mnist_cnn_shrink:mnist_cnn",
                 "mnist_cnn_lowrank:mnist_cnn"]


def run(exp: str, workdir: Path, seed: int) -> dict:
    """Train ``exp`` into ``workdir`` through the command line; returns its summary."""
    cmd = [sys.executable, "-m", "jaxaccel.run", f"exp={exp}", f"workdir={workdir}", f"seed={seed}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return json.loads((workdir / "summary.json").read_text())


def step_seconds(summary: dict) -> float:
    """Median seconds per step over the epochs run wholly after the last model change (every epoch
    but the first for a run without one)."""
    epochs = summary["epoch_seconds"]
    per_epoch = summary["steps"] // len(epochs)
    changes = [line["step"] for line in summary.get("surgery") or []]
    first = -(-max(changes) // per_epoch) if changes else 1  # index of the first epoch after it
    after = epochs[first:]
    if not after:
        raise SystemExit(f"no whole epoch after the last model change (step {max(changes)})")
    return statistics.median(after) / per_epoch


def inference_seconds(workdirs: list[Path], images: np.ndarray, calls: int = 20) -> list[float]:
    """Median seconds of one call of each export on ``images``, calls alternating between them."""
    from jaxaccel import export
    served = [export.load(w) for w in workdirs]
    for model in served:
        model(images)  # compile
    times: list[list[float]] = [[] for _ in served]
    for _ in range(calls):
        for model, out in zip(served, times):
            start = time.perf_counter()
            model(images)
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def compare(technique: str, dense: str, root: Path, repeats: int, batch: int) -> dict:
    runs: dict[str, list[dict]] = {dense: [], technique: []}
    for seed in range(repeats):
        for exp in (dense, technique):
            runs[exp].append(run(exp, root / f"{exp}-{seed}", seed))
    from jaxaccel import data
    images = data.load("mnist").test_inputs[:batch]
    infer = inference_seconds([root / f"{dense}-0", root / f"{technique}-0"], images)

    def med(exp, key):
        return statistics.median(key(s) for s in runs[exp])

    row = {"technique": technique, "dense": dense}
    for exp, tag in ((dense, "dense"), (technique, "tech")):
        row[f"{tag}_step_ms"] = 1e3 * med(exp, step_seconds)
        row[f"{tag}_train_s"] = med(exp, lambda s: s["train_seconds"])
        row[f"{tag}_accuracy"] = statistics.mean(s["test_accuracy"] for s in runs[exp])
        row[f"{tag}_params"] = runs[exp][0]["param_count"]
        row[f"{tag}_export_bytes"] = runs[exp][0]["compressed_bytes"]
    row["dense_infer_ms"], row["tech_infer_ms"] = 1e3 * infer[0], 1e3 * infer[1]
    return row


def table(rows: list[dict], batch: int) -> str:
    lines = ["| technique vs dense | step ms (dense / tech) | speed-up per step | training s (dense / tech) | "
             "accuracy (dense / tech) | params ratio | export bytes (dense / tech) | "
             f"inference ms at batch {batch} (dense / tech) | inference speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['technique']} vs {r['dense']} | {r['dense_step_ms']:.2f} / {r['tech_step_ms']:.2f} | "
            f"{r['dense_step_ms'] / r['tech_step_ms']:.2f}x | {r['dense_train_s']:.1f} / {r['tech_train_s']:.1f} | "
            f"{100 * r['dense_accuracy']:.2f} / {100 * r['tech_accuracy']:.2f} | "
            f"{r['tech_params'] / r['dense_params']:.3f} | {r['dense_export_bytes']} / {r['tech_export_bytes']} | "
            f"{r['dense_infer_ms']:.2f} / {r['tech_infer_ms']:.2f} | {r['dense_infer_ms'] / r['tech_infer_ms']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS, help="TECHNIQUE_EXP:DENSE_EXP")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    os.environ.setdefault("TFDS_DATA_DIR", str(ROOT.parent / "shared" / "tfds"))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        rows = []
        for pair in args.pairs:
            technique, dense = pair.split(":")
            rows.append(compare(technique, dense, root / technique, args.repeats, args.batch))
            print(table(rows[-1:], args.batch), flush=True)
        print(f"\n{args.repeats} alternating runs per experiment (accuracy: their mean)\n")
        print(table(rows, args.batch))


if __name__ == "__main__":
    main()

"""What each acceleration option costs or saves per training epoch, side by side with dense fp32.

    python benchmarks/training_overheads.py [--repeats 3] [--model mlp]

Runs LeNet-300-100 (or --model cnn with --steps) through jaxaccel.train for each variant,
alternating variants round by round, and reports the median seconds of a steady-state epoch (the
second of two: compile, evaluation and the executables' first run excluded; with --steps, the
train_seconds of that many steps) and the ratio to dense fp32. Variants: sparsity masks applied every step,
gradual pruning (mask recomputations in the epoch), bf16 (f32 accumulation), fp16 (+ dynamic loss
scaling), int8 QAT (fake quant).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import jaxaccel

VARIANTS = {
    "dense fp32": [],
    # Pruned once at step 0, then the masks applied at every step: the per-step cost of sparsity.
    "sparsity masks (90%)": ["sparsity.method=magnitude", "sparsity.target=0.9", "sparsity.schedule=one_shot",
                             "sparsity.start=0"],
    # Gradual pruning with 4 mask recomputations (sorts of every kernel) inside the timed epoch.
    "gradual pruning (4 updates)": ["sparsity.method=magnitude", "sparsity.target=0.9", "sparsity.start=468",
                                    "sparsity.end=868", "sparsity.update_every=100"],
    "bf16": ["precision.params=bfloat16", "precision.compute=bfloat16"],
    "fp16 + loss scaling": ["precision.params=float16", "precision.compute=float16"],
    "int8 QAT": ["quant.mode=qat"],
}


def epoch_seconds(exp: str, overrides: list[str], steps: int | None) -> float:
    length = [f"train.steps={steps}"] if steps else ["train.epochs=2"]
    with tempfile.TemporaryDirectory() as workdir:
        cfg = jaxaccel.experiments.override(jaxaccel.experiments.get(exp), [
            f"workdir={workdir}", "checkpoint.every_steps=100000", *length, *overrides])
        summary = jaxaccel.train(cfg)
        return summary["train_seconds"] if steps else summary["epoch_seconds"][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--steps", type=int, default=None, help="steps per run instead of one epoch")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants to run (dense fp32, the baseline, always runs)")
    args = parser.parse_args()
    chosen = {k: v for k, v in VARIANTS.items() if k == "dense fp32" or k in args.variants}
    exp = {"mlp": "mnist_mlp", "cnn": "mnist_cnn"}[args.model]
    times = {k: [] for k in chosen}
    for _ in range(args.repeats):
        for name, overrides in chosen.items():
            times[name].append(epoch_seconds(exp, overrides, args.steps))
    base = statistics.median(times["dense fp32"])
    print(f"| variant ({exp}, {args.steps or 'one epoch of'} steps) | median s | vs dense fp32 | runs |")
    print("| --- | --- | --- | --- |")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {med / base:.2f}x time | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()

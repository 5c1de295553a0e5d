"""One epoch of the same training in jaxaccel, a plain JAX loop and PyTorch, side by side in one run.

Same model (LeNet-300-100 ``mlp`` or the flax-example ``cnn``), batch (128), data (real MNIST,
uint8 in memory, scaled to [0, 1] inside the model), optimizer (Adam, lr 1e-3, cosine decay) and
length (one epoch, 468 steps, or ``--steps``) for all three:

- jaxaccel: ``jaxaccel.train`` on the experiment ``mnist_<model>`` for two epochs; the second
  epoch's training seconds (``summary["epoch_seconds"][1]``: no compile, no evaluation, and after
  the executables' first run, as the other two loops' timed epochs follow an untimed step).
- plain JAX: the flax-example loop (``epoch_speed.plain_epoch``): a jitted step per batch, batches
  sliced from host NumPy arrays, ``nn.Conv`` as XLA's convolution.
- PyTorch (optional: ``pip install 'jaxaccel[bench]'``): the usual eager loop over tensors
  preloaded in memory, NCHW, ``torch.optim.Adam``, all cores (``torch.get_num_threads()``).

Runs alternate (jaxaccel, plain, torch, jaxaccel, ...) and we report medians and ratios; also each
one's achieved model FLOP/s (jaxaccel's XLA count of the step, the same count for all three) and
its fraction of the measured f32 2048x2048 matmul peak.

    python benchmarks/baselines.py [--models mlp cnn] [--rounds 3] [--steps N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import jaxaccel  # noqa: E402
from epoch_speed import machine, plain_epoch  # noqa: E402
from jaxaccel import data as data_lib  # noqa: E402

try:
    import torch
except ImportError:  # an optional extra: the table then says so
    torch = None


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Best f32 FLOP/s of an n x n matmul through XLA on this machine."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def engine_run(cfg, steps: int | None) -> tuple[float, float]:
    """(seconds, flops_per_step) of one jaxaccel run: the second epoch of a two-epoch run (steady
    state, as the other loops' timed epochs, which follow an untimed first step), or with
    ``steps`` the train_seconds of that many steps."""
    length = f"train.steps={steps}" if steps else "train.epochs=2"
    with tempfile.TemporaryDirectory() as workdir:
        cfg = jaxaccel.experiments.override(cfg, [f"workdir={workdir}", length, "checkpoint.every_steps=100000"])
        summary = jaxaccel.train(cfg)
    seconds = summary["train_seconds"] if steps else summary["epoch_seconds"][1]
    return seconds, summary.get("flops_per_step", 0.0)


def torch_model(name: str):
    nn = torch.nn

    class Scale(nn.Module):
        def forward(self, x):
            return x.float() / 255.0

    if name == "mlp":
        return nn.Sequential(Scale(), nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                             nn.Linear(100, 10))
    return nn.Sequential(Scale(), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.Linear(256, 10))


def torch_epoch(name: str, ds, batch: int, steps: int) -> float:
    """One epoch (``steps`` steps) of the PyTorch loop; returns its wall time."""
    torch.manual_seed(0)
    model = torch_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    images = torch.from_numpy(ds.train_inputs).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW, preloaded
    labels = torch.from_numpy(ds.train_labels.astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()
    order = torch.randperm(len(labels))

    def step(i):
        idx = order[i * batch:(i + 1) * batch]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(images[idx]), labels[idx])
        loss.backward()
        opt.step()
        return loss

    step(0)  # untimed, as the JAX loops' first run: kernels and buffers set up
    t = time.perf_counter()
    for i in range(steps):
        loss = step(i)
        sched.step()
    float(loss.detach())
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="steps per run instead of one epoch")
    args = parser.parse_args()
    peak = matmul_peak()
    print(f"# {machine()}; torch {torch.__version__ + f' ({torch.get_num_threads()} threads)' if torch else 'NOT INSTALLED'}")
    print(f"# f32 2048x2048 matmul peak through XLA: {peak / 1e9:.0f} GFLOP/s; load {os.getloadavg()}", flush=True)
    if torch is None:
        print("# PyTorch is not installed: its column is empty (pip install 'jaxaccel[bench]' adds it)")
    results = {}
    for name in args.models:
        cfg = jaxaccel.experiments.get(f"mnist_{name}")
        ds = data_lib.load(cfg.data.name, cfg.data.dir, cfg.data.cache_dir)
        steps = args.steps or len(ds.train_labels) // cfg.train.batch_size
        flops = {}

        def jaxaccel_run():
            seconds, flops["step"] = engine_run(cfg, args.steps)
            return seconds

        runs = {"jaxaccel": jaxaccel_run, "plain JAX": lambda: plain_epoch(cfg, ds, args.steps)}
        if torch is not None:
            runs["PyTorch"] = lambda: torch_epoch(name, ds, cfg.train.batch_size, steps)
        times = {k: [] for k in runs}
        for r in range(args.rounds):
            for label, fn in runs.items():
                times[label].append(fn())
                print(f"# round {r + 1} {name} {label}: {times[label][-1]:.3f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {"steps": steps, "flops_per_step": flops["step"], "median_s": med, "runs_s": times}
        print(f"\n{name}: {steps} steps of batch {cfg.train.batch_size}; medians of {args.rounds}; load {os.getloadavg()}")
        print("| loop | s | jaxaccel speed-up | model GFLOP/s | of matmul peak |")
        print("| --- | --- | --- | --- | --- |")
        for label, s in med.items():
            rate = flops["step"] * steps / s
            print(f"| {label} | {s:.3f} | {s / med['jaxaccel']:.2f}x | {rate / 1e9:.1f} | {rate / peak:.1%} |")
    print(json.dumps({"matmul_peak_flops": peak, **results}, indent=1))


if __name__ == "__main__":
    main()

"""Seconds per training epoch: jaxaccel's engine vs a plain JAX loop, side by side in one run.

The plain loop is the usual flax-example loop: one jitted step per batch, batches sliced from
host NumPy arrays and transferred each step, state not donated. jaxaccel keeps the dataset on the
device and runs groups of steps per compiled call. Runs alternate (plain, jaxaccel, plain, ...)
so drift on a shared machine hits both; we report medians and the ratio.

    python benchmarks/epoch_speed.py [--models mlp cnn] [--repeats 3] [--variants] [--steps N]

--variants also times the engine's loop choices (device_loop / unroll K) for each model.
Needs TFDS_DATA_DIR pointing at prepared MNIST (e.g. ../shared/tfds).
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxaccel
from jaxaccel import data as data_lib
from jaxaccel import step as step_lib
from jaxaccel.models import build_model
from jaxaccel.optim import make_optimizer

EXPERIMENT = {"mlp": "mnist_mlp", "cnn": "mnist_cnn"}


def plain_epoch(cfg, ds, steps: int | None = None) -> float:
    """One epoch (or ``steps`` steps) of the plain loop; returns its wall time (compile excluded)."""
    conv = {"conv": "xla"} if "conv" in type(cfg.model).model_fields else {}
    model = build_model(cfg.model.model_copy(update=conv), ds.num_classes)  # flax's nn.Conv as is
    steps = steps or len(ds.train_labels) // cfg.train.batch_size
    tx = make_optimizer(cfg.optim, steps)
    params = model.init(jax.random.key(0), jnp.zeros((1, *ds.input_shape), jnp.uint8))["params"]
    state = step_lib.TrainState.create(params, tx)
    step = jax.jit(functools.partial(step_lib.train_step, rng=jax.random.key(0), apply_fn=model.apply, tx=tx))
    b = cfg.train.batch_size
    order = np.random.default_rng(0).permutation(len(ds.train_labels))

    def batch(i):
        idx = order[i * b:(i + 1) * b]
        return {"inputs": ds.train_inputs[idx], "labels": ds.train_labels[idx]}

    jax.block_until_ready(step(state, batch(0)))  # compile
    t = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, batch(i))
    jax.block_until_ready(state)
    return time.perf_counter() - t


def engine_epoch(cfg, overrides=(), steps: int | None = None) -> float:
    """One steady-state epoch through jaxaccel.train: the second epoch of a two-epoch run
    (``summary["epoch_seconds"][1]``; no compile, no evaluation, and like the plain loop's timed
    epoch, after the executables' first run). With ``steps``: train_seconds of that many steps.
    Also prints the compile time, which the loop choice changes a lot."""
    length = f"train.steps={steps}" if steps else "train.epochs=2"
    with tempfile.TemporaryDirectory() as workdir:
        cfg = jaxaccel.experiments.override(cfg, [f"workdir={workdir}", length,
                                                  "checkpoint.every_steps=100000", *overrides])
        summary = jaxaccel.train(cfg)
        print(f"#   {' '.join(overrides) or 'default'}: compile {summary['compile_seconds']:.1f} s")
        return summary["train_seconds"] if steps else summary["epoch_seconds"][1]


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name"))
    except Exception:  # noqa: BLE001 - only a label
        model = platform.processor()
    return f"{model}, {jax.local_device_count()} {jax.default_backend()} device(s), jax {jax.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="steps per run instead of one epoch")
    args = parser.parse_args()
    print(f"# {machine()}")
    results = {}
    for name in args.models:
        cfg = jaxaccel.experiments.get(EXPERIMENT[name])
        ds = data_lib.load(cfg.data.name, cfg.data.dir, cfg.data.cache_dir)
        runs = {"plain": lambda: plain_epoch(cfg, ds, args.steps), "jaxaccel": lambda: engine_epoch(cfg, (), args.steps)}
        if args.variants:
            for loop, k in (("device_loop", None), ("unroll", 10), ("unroll", 20), ("unroll", 40)):
                extra = [f"train.loop={loop}"] + ([f"train.steps_per_call={k}"] if k else [])
                runs[f"{loop}{k or ''}"] = functools.partial(engine_epoch, cfg, extra, args.steps)
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for label, fn in runs.items():
                times[label].append(fn())
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {k: {"median_s": med[k], "runs_s": times[k], "speedup_vs_plain": med["plain"] / med[k]}
                         for k in runs}
        for label in runs:
            print(f"{name:4s} {label:10s} median {med[label]:7.3f} s/{'epoch' if not args.steps else f'{args.steps} steps'}  "
                  f"({med['plain'] / med[label]:.2f}x plain)  runs {[round(t, 3) for t in times[label]]}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

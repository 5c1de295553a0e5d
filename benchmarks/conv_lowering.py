"""Convolution lowerings on XLA:CPU: ms per training step of a CNN for each (lowering, loop, dtype).

Each variant is the engine's own compiled step group (``step.make_train_steps`` over the real
MNIST arrays on device, Adam, batch 128) built from ``jaxaccel.models``; only ``model.conv``, the
loop (a device loop of K steps or K unrolled steps) and the precision policy change. Variants
alternate round by round (drift on a shared machine hits all of them); medians of the rounds.

    python benchmarks/conv_lowering.py [--model cnn] [--rounds 5] [--steps 20] [--variants im2col:device_loop xla:unroll ...]

A variant is ``conv:loop[:bf16]`` with conv in {xla, im2col} and loop in {device_loop, unroll}.
Needs TFDS_DATA_DIR pointing at prepared MNIST (e.g. ../shared/tfds).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel import data as data_lib
from jaxaccel import step as step_lib
from jaxaccel.config import ModelConfig, OptimConfig, PrecisionConfig, model_config
from jaxaccel.models import build_model
from jaxaccel.optim import make_optimizer

# xla:device_loop (13-14x slower than xla:unroll, benchmarks/README.md) only when asked: it takes minutes.
DEFAULT = ["xla:unroll", "im2col:device_loop", "im2col:unroll", "im2col:device_loop:bf16"]


def build(variant: str, model_cfg: ModelConfig, ds, batch: int, steps: int):
    """A compiled ``steps``-step group and its initial arguments; also returns compile seconds."""
    conv, loop, *dtype = variant.split(":")
    precision = PrecisionConfig(params="bfloat16", compute="bfloat16") if dtype == ["bf16"] else None
    model = build_model(model_cfg.model_copy(update={"conv": conv}), ds.num_classes, precision)
    tx = make_optimizer(OptimConfig(name="adam"), 1000)
    params = model.init(jax.random.key(0), jnp.zeros((1, *ds.input_shape), jnp.uint8))["params"]
    state = step_lib.TrainState.create(params, tx)
    step_fn = functools.partial(step_lib.train_step, apply_fn=model.apply, tx=tx, precision=precision)
    run = step_lib.make_train_steps(step_fn, batch_size=batch, batch_sharding=None, step_key=jax.random.key(1),
                                    unroll=steps if loop == "unroll" else None)
    images, labels = jnp.asarray(ds.train_inputs), jnp.asarray(ds.train_labels)
    perm = jax.random.permutation(jax.random.key(2), len(ds.train_labels))
    args = (state, images, labels, perm, np.int32(0), np.int32(steps))
    t = time.perf_counter()
    compiled = jax.jit(run).lower(*args).compile()
    return compiled, args, time.perf_counter() - t


def time_group(compiled, args) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call. CPU time (all threads) is less distorted than wall
    time when other processes load the machine."""
    jax.block_until_ready(compiled(*args))  # warm-up call
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=["cnn", "small_cnn"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=DEFAULT)
    args = parser.parse_args()
    ds = data_lib.load("mnist")
    model_cfg = model_config(name=args.model)
    built = {}
    for v in args.variants:
        compiled, call_args, seconds = build(v, model_cfg, ds, args.batch, args.steps)
        flops = compiled.cost_analysis()["flops"]
        built[v] = (compiled, call_args)
        print(f"# {v:18s} compile {seconds:6.1f} s, XLA flops per group {flops / 1e9:.2f} G", flush=True)
    times, cpu = {v: [] for v in built}, {v: [] for v in built}
    for _ in range(args.rounds):
        for v, (compiled, call_args) in built.items():
            wall, cpu_s = time_group(compiled, call_args)
            times[v].append(1000 * wall / args.steps)
            cpu[v].append(1000 * cpu_s / args.steps)
    base, base_cpu = statistics.median(times[args.variants[0]]), statistics.median(cpu[args.variants[0]])
    print(f"load average {os.getloadavg()}")
    print(f"| variant | ms/step (median of {args.rounds}) | rounds | vs {args.variants[0]} | CPU ms/step | CPU vs {args.variants[0]} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for v, ts in times.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[v])
        print(f"| {v} | {med:.1f} | {', '.join(f'{t:.0f}' for t in ts)} | {base / med:.2f}x | {med_cpu:.1f} | "
              f"{base_cpu / med_cpu:.2f}x |")


if __name__ == "__main__":
    main()

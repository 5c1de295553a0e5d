"""Inference f32 vs int8 (int32 accumulation), side by side, at MNIST size and where matmuls dominate.

    python benchmarks/int8_inference.py

MNIST size: LeNet-300-100 at batch 128 and 1. Matmul-dominated: a 4096-4096-4096-10 MLP on
64x64 inputs at batch 256. Both run the same flax module: float32 params through ``model.apply``,
int8 kernels + scales through :func:`jaxaccel.precision.int8_apply` (activations quantized per
tensor on the fly). Medians of 20 timed calls after warm-up; ratio = f32 time / int8 time.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel import precision as prec
from jaxaccel.config import QuantConfig
from jaxaccel.models import MLP


def median_seconds(fn, x, repeats: int = 20) -> float:
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    cfg = QuantConfig(mode="ptq")
    print("| model | batch | f32 ms | int8 ms | int8 speed-up | argmax agreement |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, model, shape, batches in (("LeNet-300-100", MLP(features=(300, 100), num_classes=10), (28, 28, 1), (1, 128)),
                                        ("MLP 4096x3", MLP(features=(4096, 4096), num_classes=10), (64, 64, 1), (256,))):
        params = model.init(jax.random.key(0), jnp.zeros((1, *shape), jnp.uint8))["params"]
        qparams, scales = prec.quantize_params(params, cfg)
        f32 = jax.jit(lambda x: model.apply({"params": params}, x))
        int8 = jax.jit(lambda x: prec.int8_apply(model, qparams, scales, x, cfg=cfg))
        for batch in batches:
            x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, *shape), np.uint8))
            t32, t8 = median_seconds(f32, x), median_seconds(int8, x)
            agree = float(np.mean(np.argmax(f32(x), -1) == np.argmax(int8(x), -1)))
            print(f"| {name} | {batch} | {1e3 * t32:.3f} | {1e3 * t8:.3f} | {t32 / t8:.2f}x | {agree:.3f} |")


if __name__ == "__main__":
    main()

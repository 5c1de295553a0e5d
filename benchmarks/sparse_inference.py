"""Sparse vs dense CPU inference of an MLP from the compressed export (jaxaccel.sparsity).

Usage: python benchmarks/sparse_inference.py [--reps 9] [--models lenet wide] [--batches 1 128]
(about 2 minutes on 2 cores).

Models: ``lenet`` is LeNet-300-100 on 28x28 uint8 images; ``wide`` is a single 4096x4096 Dense
layer on 64x64 uint8 images (a matmul-dominated size). Weights are the models' random init,
magnitude-pruned per layer (unstructured) or to 2:4 along the contracting axis; timing does not
depend on trained values. The dense baseline is ``jax.jit(models.MLP.apply)`` on the
dense-with-zeros params, i.e. what ``jaxaccel.export.load`` runs.

Each cell is the median over at least ``--reps`` interleaved rounds (routes take turns, so load
from other processes hits all routes alike; cheap rows get up to 5x more rounds) of the mean time
of a block of calls (~1 ms), after warm-up/compilation.
Jax routes get device-resident inputs and are timed to ``block_until_ready``; the SciPy route gets
the NumPy array. Every route's logits are checked against the baseline (allclose, same argmax)
before timing. Prints Markdown.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
import warnings
from functools import partial
from typing import Any, Callable

import numpy as np

SPARSITIES: tuple[float | str, ...] = (0.5, 0.8, 0.9, 0.95, 0.98, "2:4")
ROUTE_ORDER = ("scipy", "ell", "bcsr", "bcoo")
# Routes that materialize a (batch, nnz)-sized gather: skipped where that is hundreds of MB and
# seconds per call (wide layer at batch 128) - they lose by a wide margin well before that.
_GATHER_LIMIT = 64 << 20  # floats


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informational only
        return platform.processor() or "unknown"


def _prune(w: np.ndarray, mode: float | str) -> np.ndarray:
    """Magnitude pruning of one kernel: a fraction of zeros, or 2:4 along axis 0 (contracting)."""
    if mode == "2:4":
        groups = np.abs(w.T.reshape(w.shape[1], -1, 4))
        drop = np.argsort(groups, axis=-1, kind="stable")[..., :2]
        keep = np.ones_like(groups, dtype=bool)
        np.put_along_axis(keep, drop, False, axis=-1)
        return np.where(keep.reshape(w.shape[1], -1).T, w, 0).astype(w.dtype)
    k = int(round(mode * w.size))
    if k == 0:
        return w
    threshold = np.partition(np.abs(w).ravel(), k - 1)[k - 1]
    return np.where(np.abs(w) > threshold, w, 0).astype(w.dtype)


def _time_rounds(fns: dict[str, Callable[[], Any]], reps: int, max_reps: int | None = None,
                 row_budget_s: float = 1.5, sample_s: float = 1e-3,
                 stat: Callable[[list[float]], float] = np.median) -> dict[str, float]:
    """Seconds per call of each fn: ``stat`` over rounds of interleaved samples.

    Each round times every fn once (rotating the order, so load from other processes hits all
    alike); a sample is a block of calls lasting about ``sample_s``. At least ``reps`` rounds;
    more, up to ``max_reps``, while the rounds so far took under ``row_budget_s`` (cheap rows get
    more samples, which steadies their medians on a shared machine).
    """
    inner = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        inner[name] = max(1, int(sample_s / max(time.perf_counter() - t, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    start = time.perf_counter()
    for r in range(max(reps, max_reps or reps)):
        if r >= reps and time.perf_counter() - start > row_budget_s:
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = fns[name], inner[name]
            t = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t) / n)
    return {name: float(stat(s)) for name, s in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--models", nargs="+", default=["lenet", "wide"], choices=["lenet", "wide"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 128])
    parser.add_argument("--sparsities", nargs="+", default=[str(s) for s in SPARSITIES])
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import scipy
    from flax import traverse_util

    from jaxaccel.models import MLP
    from jaxaccel.sparsity import export as sparse_export
    from jaxaccel.sparsity import inference as sparse_inference

    warnings.simplefilter("ignore")  # SparseEfficiencyWarning chatter from jax.experimental.sparse
    sparsities = [s if s == "2:4" else float(s) for s in args.sparsities]
    specs = {"lenet": (MLP(features=(300, 100), num_classes=10), (28, 28, 1)),
             "wide": (MLP(features=(), num_classes=4096), (64, 64, 1))}
    print(f"CPU: {_cpu_model()}, {len(os.sched_getaffinity(0))} usable cores; "
          f"python {platform.python_version()}, jax {jax.__version__}, numpy {np.__version__}, "
          f"scipy {scipy.__version__}; reps={args.reps}; load average at start "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}\n")
    print("| model | sparsity | stored form (bytes vs dense) | batch | dense µs | "
          + " | ".join(f"{r} µs (speedup)" for r in ROUTE_ORDER) + " |")
    print("|---|---|---|---|---|" + "---|" * len(ROUTE_ORDER))
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    target_fns: dict[str, Callable[[], Any]] = {}
    for model_name in args.models:
        module, image_shape = specs[model_name]
        init = module.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.uint8))["params"]
        base = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(init, sep="/").items()}
        apply = jax.jit(module.apply)
        for mode in sparsities:
            flat = {k: _prune(v, mode) if k.endswith("kernel") else v + 0.01 for k, v in base.items()}
            arrays, meta = sparse_export.compress(flat)
            forms = "/".join(sorted({t["form"] for k, t in meta["tensors"].items() if k.endswith("kernel")}))
            size = sparse_export.nbytes(arrays) / sum(v.nbytes for v in flat.values())
            dense_params = {"params": traverse_util.unflatten_dict(
                {k: jnp.asarray(v) for k, v in flat.items()}, sep="/")}
            routes = {r: sparse_inference.SparseMLP(arrays, meta, r) for r in ROUTE_ORDER}
            nnz = sum(int(np.count_nonzero(v)) for k, v in flat.items() if k.endswith("kernel"))
            for batch in args.batches:
                images = rng.integers(0, 256, size=(batch, *image_shape), dtype=np.uint8)
                device_images = jax.device_put(images)
                ref = np.asarray(apply(dense_params, device_images))
                # partial binds now: target_fns outlives this loop iteration.
                fns: dict[str, Callable[[], Any]] = {
                    "dense": partial(_blocking, partial(apply, dense_params), device_images)}
                for name, model in routes.items():
                    if name in ("ell", "bcoo") and nnz * batch > _GATHER_LIMIT:
                        continue
                    if name == "scipy":  # NumPy in, NumPy out: already complete on return
                        fns[name] = partial(model.forward, images)
                    else:
                        fns[name] = partial(_blocking, model.forward, device_images)
                    out = np.asarray(fns[name]())
                    # float32 sums in another order: ~1e-6 relative; argmax must not move.
                    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
                    assert (out.argmax(1) == ref.argmax(1)).all(), (model_name, mode, batch, name)
                if (model_name, mode, batch) == ("lenet", 0.9, 1):
                    target_fns = fns
                times = _time_rounds(fns, args.reps, max_reps=5 * args.reps)
                dense_t = times["dense"]
                cells = [f"{times[r] * 1e6:,.0f} ({dense_t / times[r]:.2f}x)" if r in times else "skipped"
                         for r in ROUTE_ORDER]
                label = f"{mode:.0%}" if isinstance(mode, float) else mode
                print(f"| {model_name} | {label} | {forms} ({size:.2f}x) | {batch} | {dense_t * 1e6:,.0f} | "
                      + " | ".join(cells) + " |", flush=True)
    if target_fns:  # the project's target, re-timed with many more (cheap) rounds
        reps = 10 * args.reps
        med = _time_rounds(target_fns, reps, row_budget_s=0)
        best = _time_rounds(target_fns, reps, row_budget_s=0, stat=np.min)
        print(f"\nTarget check, LeNet-300-100 at 90% sparsity, batch 1, {reps} interleaved rounds:")
        for name in target_fns:
            print(f"- {name}: median {med[name] * 1e6:,.1f} µs ({med['dense'] / med[name]:.2f}x vs dense), "
                  f"best {best[name] * 1e6:,.1f} µs ({best['dense'] / best[name]:.2f}x)")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average at end "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")


def _blocking(fn: Callable[[Any], Any], x: Any) -> Any:
    return fn(x).block_until_ready()


if __name__ == "__main__":
    main()

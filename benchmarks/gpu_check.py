"""What to measure on a real NVIDIA GPU (issue 16), in one run designed to finish in under 8 minutes
on one H200, printed as one markdown table with each row's expected outcome:

  int8 convolution   the platform's int8 conv (s8 x s8 -> f32 on GPU) vs im2col + int8 dot vs the
                     f32 conv: exact (equal to the int32 sum), and their times
  conv lowering      mnist_cnn step time with model.conv=xla (cuDNN) vs im2col
  loop kinds         a device loop with its trip count a runtime value vs compiled in; mnist_cnn's
                     device loop vs unrolled blocks
  guard kinds        a matmul-heavy MLP: precision.guard=rollback vs step, time and peak memory
  precision          fp32 vs bf16 step time, mnist_cnn and the matmul-heavy MLP
  N:M masks          the MLP with 2:4 masks on every kernel vs dense (masks cost, never speed up)
  resume             mnist_cnn killed while checkpointing and resumed vs uninterrupted, with
                     --xla_gpu_deterministic_ops=true: bitwise equal parameters

    python benchmarks/gpu_check.py [--out table.md]      # on the GPU machine
    python benchmarks/gpu_check.py --quick               # a smoke test of the script on any machine

Every training row is its own process (``jaxaccel.train`` through the public API, sized with
``train.steps`` overrides), so each reports its own peak device memory; step times come from the
last whole epoch (``summary.json``'s ``epoch_seconds``; the first includes XLA's set-up). With
``--quick`` the models and step counts are tiny and the verdicts are not judged.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "GPU_CHECK_RESULT "
ROOT = Path(__file__).resolve().parents[1]
BIG_MLP = ["model.features=[4096,4096,4096]", "train.batch_size=1024"]  # 58 steps an epoch
BF16 = ["precision.params=bfloat16", "precision.compute=bfloat16", "precision.accumulation=float32"]
DETERMINISTIC = "--xla_gpu_deterministic_ops=true"


# ----------------------------------------------------------------------------------------------
# Children: one training run, or the int8 convolution check.

def _child_train(spec: dict) -> dict:
    import jax

    import jaxaccel
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get(spec["exp"]),
                                        [f"workdir={spec['workdir']}", *spec["overrides"]])
    summary = jaxaccel.train(cfg)
    plan = json.loads((Path(spec["workdir"]) / "config.json").read_text())["plan"]
    stats = jax.local_devices()[0].memory_stats() or {}
    epochs = summary.get("epoch_seconds") or []
    step_seconds = (epochs[-1] / plan["steps_per_epoch"] if len(epochs) >= 2
                    else summary["train_seconds"] / max(summary["steps"], 1))
    return {"step_ms": 1e3 * step_seconds, "peak_bytes": stats.get("peak_bytes_in_use"),
            "steps": summary["steps"], "test_accuracy": summary["test_accuracy"], "backend": jax.default_backend(),
            "loop": plan["loop"]}


def _child_int8(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from jaxaccel.models import im2col_conv
    from jaxaccel.precision import int8_conv_accumulate
    batch, hw, cin, cout = spec["shape"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(-127, 128, (batch, hw, hw, cin)), jnp.int8)
    w = jnp.asarray(rng.integers(-127, 128, (3, 3, cin, cout)), jnp.int8)
    args = ((1, 1), "SAME")
    dn = {"dimension_numbers": ("NHWC", "HWIO", "NHWC")}
    forms = {
        "int8 conv (platform's)": jax.jit(lambda x, w: int8_conv_accumulate(x, w, *args, **dn)),
        "im2col + int8 dot": jax.jit(lambda x, w: im2col_conv()(x, w, *args, preferred_element_type=jnp.int32,
                                                               **dn).astype(jnp.float32)),
        "f32 conv": jax.jit(lambda x, w: lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32),
                                                                  *args, **dn)),
    }
    out, results = {}, {}
    for name, fn in forms.items():
        try:
            out[name] = np.asarray(fn(x, w))
        except Exception as e:  # noqa: BLE001 - a form this backend cannot compile is a result
            results[name] = {"error": str(e).splitlines()[0][:200]}
            continue
        times = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            fn(x, w).block_until_ready()
            times.append(time.perf_counter() - t0)
        results[name] = {"ms": 1e3 * float(np.median(times))}
    exact = out.get("im2col + int8 dot")  # the int32 sum (every |partial sum| < 2**24: exact in f32)
    for name in out:
        results[name]["exact"] = bool(exact is not None and np.array_equal(out[name], exact))
    return {"forms": results, "backend": jax.default_backend()}


def _child_loop(spec: dict) -> dict:
    """A device loop of ``n`` small matmuls with its trip count a runtime argument vs compiled in."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    n, size = spec["n"], spec["size"]
    w = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)) / size ** 0.5, jnp.float32)
    body = lambda i, x: jnp.tanh(x @ w)  # noqa: E731
    runtime = jax.jit(lambda x, count: jax.lax.fori_loop(0, count, body, x))
    static = jax.jit(lambda x: jax.lax.fori_loop(0, n, body, x))
    x = jnp.ones((size, size), jnp.float32)
    calls = {"runtime trip count": lambda: runtime(x, np.int32(n)), "compiled-in trip count": lambda: static(x)}
    out = {}
    for name, call in calls.items():
        call().block_until_ready()
        times = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            call().block_until_ready()
            times.append(time.perf_counter() - t0)
        out[name] = 1e6 * float(np.median(times)) / n
    return {"us_per_iteration": out, "backend": jax.default_backend()}


def _child_params(workdir: str) -> str:
    import hashlib

    import numpy as np
    with np.load(Path(workdir) / "export" / "params.npz") as npz:
        digest = hashlib.sha256()
        for key in sorted(npz.files):
            digest.update(key.encode() + np.ascontiguousarray(npz[key]).tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# The parent: starts the children, never touches a device itself.

class Runner:
    def __init__(self, quick: bool, deadline: float, root: Path):
        self.quick, self.deadline, self.root = quick, deadline, root
        self.count = 0

    def child(self, kind: str, spec: dict, env: dict | None = None, timeout: float = 240) -> dict:
        left = self.deadline - time.monotonic()
        if left < 20:
            return {"error": "skipped: out of time"}
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # this checkout's jaxaccel
        result = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True,
                                text=True, timeout=min(timeout, left),
                                env={**os.environ, "PYTHONPATH": path, **(env or {})})
        lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
        if result.returncode or not lines:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"exit {result.returncode}: {tail[:200]}", "returncode": result.returncode}
        return json.loads(lines[-1][len(MARK):])

    def train(self, exp: str, overrides: list[str], env: dict | None = None, workdir: Path | None = None) -> dict:
        self.count += 1
        workdir = workdir or self.root / f"run{self.count}"
        size = (["train.steps=6", "train.log_every_steps=3"] if self.quick else [])
        if self.quick and any(o.startswith("model.features") for o in overrides):
            overrides = [o for o in overrides if not o.startswith(("model.features", "train.batch_size"))]
            overrides += ["model.features=[64,64]", "train.batch_size=256"]
        return self.child("train", {"exp": exp, "overrides": [*overrides, *size], "workdir": str(workdir)}, env)


def _ms(result: dict) -> str:
    return result["error"] if "error" in result else f"{result['step_ms']:.3f} ms/step"


def _gib(result: dict) -> str:
    peak = result.get("peak_bytes")
    return "-" if peak is None else f"{peak / 2 ** 30:.2f} GiB peak"


def _ratio(a: dict, b: dict) -> float | None:
    return a["step_ms"] / b["step_ms"] if "step_ms" in a and "step_ms" in b else None


def _verdict(ok: bool | None, quick: bool) -> str:
    if quick:
        return "not judged (--quick)"
    return "-" if ok is None else ("yes" if ok else "**NO**")


def check(runner: Runner) -> list[tuple[str, str, str, str, str]]:
    q = runner.quick
    rows = []
    # 3 epochs (468 steps at batch 128; 58 at 1024), one group per epoch: one executable to compile.
    steps_cnn = [] if q else ["train.steps=1404", "train.log_every_steps=468", "checkpoint.every_steps=1404"]
    steps_mlp = [] if q else ["train.steps=174", "train.log_every_steps=58", "checkpoint.every_steps=174"]

    # int8 convolution path
    shape = [8, 12, 8, 16] if q else [256, 28, 32, 64]
    int8 = runner.child("int8", {"shape": shape, "repeats": 3 if q else 50})
    if "error" in int8:
        rows.append(("int8 convolution", f"{shape}", int8["error"], "compiles, exact", _verdict(False, q)))
    else:
        forms = int8["forms"]
        text = "; ".join(f"{k}: " + (v["error"] if "error" in v else f"{v['ms']:.3f} ms{'' if v['exact'] else ' INEXACT'}")
                         for k, v in forms.items())
        ok = all("error" not in v and v["exact"] for k, v in forms.items() if k != "f32 conv")
        rows.append(("int8 convolution", f"[N,H,W,Cin]->Cout {shape}, {int8['backend']}", text,
                     "the platform's int8 conv (s8xs8->f32 on GPU) and im2col+int8 dot compile and equal the "
                     "int32 sum bitwise", _verdict(ok, q)))

    # conv lowering, loop kinds, precision (mnist_cnn)
    cnn_xla = runner.train("mnist_cnn", ["model.conv=xla", "train.loop=device_loop", *steps_cnn])
    cnn_im2col = runner.train("mnist_cnn", ["model.conv=im2col", "train.loop=device_loop", *steps_cnn])
    r = _ratio(cnn_im2col, cnn_xla)
    rows.append(("conv lowering", "mnist_cnn, device_loop: model.conv=xla vs im2col",
                 f"xla {_ms(cnn_xla)}, im2col {_ms(cnn_im2col)}" + (f" (im2col/xla {r:.2f}x)" if r else ""),
                 "xla (cuDNN) faster than im2col: model.conv=auto picks xla off CPU", _verdict(r and r > 1.0, q)))
    loop = runner.child("loop", {"n": 20 if q else 500, "size": 64 if q else 256, "repeats": 3 if q else 20})
    if "error" in loop:
        rows.append(("loop kinds", "fori_loop of 256x256 matmuls", loop["error"], "-", _verdict(None, q)))
    else:
        us = loop["us_per_iteration"]
        r = us["runtime trip count"] / us["compiled-in trip count"]
        rows.append(("loop kinds", "fori_loop of 256x256 matmuls: trip count a runtime argument vs compiled in",
                     "; ".join(f"{k} {v:.1f} us/iteration" for k, v in us.items()) + f" ({r:.2f}x)",
                     "a runtime trip count reads the loop predicate back to the host every iteration: slower",
                     _verdict(r > 1.1, q)))
    cnn_unroll = runner.train("mnist_cnn", ["model.conv=xla", "train.loop=unroll", "train.steps_per_call=10", *steps_cnn])
    r = _ratio(cnn_unroll, cnn_xla)
    rows.append(("loop kinds", "mnist_cnn, conv=xla: device_loop (trip count compiled in off CPU) vs unroll x10",
                 f"device_loop {_ms(cnn_xla)}, unroll {_ms(cnn_unroll)}" + (f" (unroll/device_loop {r:.2f}x)" if r else ""),
                 "the device loop (the default off CPU) within 5% of unrolled blocks, or faster",
                 _verdict(r and r >= 0.95, q)))
    cnn_bf16 = runner.train("mnist_cnn", ["model.conv=xla", "train.loop=device_loop", *BF16, *steps_cnn])
    r = _ratio(cnn_xla, cnn_bf16)
    rows.append(("precision", "mnist_cnn, conv=xla: fp32 vs bf16",
                 f"fp32 {_ms(cnn_xla)}, bf16 {_ms(cnn_bf16)}" + (f" (fp32/bf16 {r:.2f}x)" if r else ""),
                 "bf16 not slower (a small CNN is not matmul-bound)", _verdict(r and r >= 0.95, q)))

    # guard kinds, precision, N:M (a matmul-heavy MLP)
    mlp = "MLP 784-64x2-10, batch 256" if q else "MLP 784-4096x3-10, batch 1024"
    mlp_rollback = runner.train("mnist_mlp", [*BIG_MLP, "precision.guard=rollback", *steps_mlp])
    mlp_step = runner.train("mnist_mlp", [*BIG_MLP, "precision.guard=step", *steps_mlp])
    r = _ratio(mlp_rollback, mlp_step)
    more = (mlp_rollback.get("peak_bytes") or 0) > (mlp_step.get("peak_bytes") or 0)
    rows.append(("guard kinds", f"{mlp}: guard=rollback vs step",
                 f"rollback {_ms(mlp_rollback)}, {_gib(mlp_rollback)}; step {_ms(mlp_step)}, {_gib(mlp_step)}",
                 "rollback holds one more copy of the state and is not faster off CPU: step is the GPU default",
                 _verdict((r is not None and r >= 0.95 and more) if r else None, q)))
    mlp_bf16 = runner.train("mnist_mlp", [*BIG_MLP, "precision.guard=step", *BF16, *steps_mlp])
    r = _ratio(mlp_step, mlp_bf16)
    rows.append(("precision", f"{mlp}, guard=step: fp32 vs bf16",
                 f"fp32 {_ms(mlp_step)}, bf16 {_ms(mlp_bf16)}" + (f" (fp32/bf16 {r:.2f}x)" if r else ""),
                 "bf16 at least 1.5x faster (tensor cores; fp32 may already use TF32)", _verdict(r and r >= 1.5, q)))
    nm = ["sparsity.method=magnitude", "sparsity.structure=nm", "sparsity.n=2", "sparsity.m=4",
          "sparsity.schedule=one_shot", "sparsity.start=0"]
    mlp_nm = runner.train("mnist_mlp", [*BIG_MLP, "precision.guard=step", *nm, *steps_mlp])
    r = _ratio(mlp_nm, mlp_step)
    rows.append(("N:M masks", f"{mlp}, guard=step: 2:4 masked vs dense",
                 f"2:4 {_ms(mlp_nm)}, dense {_ms(mlp_step)}" + (f" (overhead {100 * (r - 1):+.1f}%)" if r else ""),
                 "masked steps cost at most 10% more (dense math, no 2:4 kernels)", _verdict(r and r <= 1.10, q)))

    # resume determinism
    env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {DETERMINISTIC}".strip()}
    short = ["model.conv=xla", f"train.steps={8 if q else 300}", "train.log_every_steps=50",
             f"checkpoint.every_steps={4 if q else 100}"]
    whole, cut = runner.root / "resume_whole", runner.root / "resume_cut"
    first = runner.child("train", {"exp": "mnist_cnn", "overrides": short, "workdir": str(whole)}, env)
    at = 4 if q else 200
    killed = runner.child("train", {"exp": "mnist_cnn", "overrides": short, "workdir": str(cut)},
                          {**env, "JAXACCEL_FAULT": f"save@{at}"})
    resumed = runner.child("train", {"exp": "mnist_cnn", "overrides": short, "workdir": str(cut)}, env)
    same = None
    if "error" not in first and "error" not in resumed and killed.get("returncode") == -9:
        same = _child_params(str(whole)) == _child_params(str(cut))
    what = ("killed: " + ("yes" if killed.get("returncode") == -9 else str(killed)) +
            f"; parameters after resume {'bitwise equal' if same else 'DIFFER' if same is False else 'not compared'}")
    rows.append(("resume determinism", f"mnist_cnn, SIGKILL during the step-{at} checkpoint, {DETERMINISTIC}",
                 what, "bitwise equal to the uninterrupted run", _verdict(same, q)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script on any machine")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--budget-seconds", type=float, default=460, help="rows still to run after this are skipped")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec = args.child[0], json.loads(args.child[1])
        result = {"train": _child_train, "int8": _child_int8, "loop": _child_loop}[kind](spec)
        print(MARK + json.dumps(result), flush=True)
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        rows = check(Runner(args.quick, started + args.budget_seconds, Path(tmp)))
    lines = ["| check | configuration | measured | expected | as expected |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join(lines) + f"\n\n({time.monotonic() - started:.0f} s{', --quick' if args.quick else ''})\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

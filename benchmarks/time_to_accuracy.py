"""Time to a target test accuracy: dense training against each technique, on one model and machine.

    python benchmarks/time_to_accuracy.py [--workload mlp|cnn] [--target 0.98] [--repeats 3]
                                          [--techniques dense masks nm bf16 qat shrink lowrank]
                                          [--whole] [--out DIR] [--set key=value ...]

The workload is an experiment (``mlp``: ``mnist_mlp``, LeNet-300-100; ``cnn``: ``mnist_cnn``).
Each technique adds the config section of the experiment that tunes it (``masks``: the
``sparsity`` of ``mnist_sparse``, magnitude pruning to 90%; ``nm``: 2:4 from ``mnist_nm``;
``bf16``: the ``precision`` of ``mnist_bf16``; ``qat``: the int8 ``quant`` of ``mnist_qat``;
``shrink``: the channel ``sparsity`` with ``shrink=true`` of ``mnist_<workload>_shrink``;
``lowrank``: the ``lowrank`` section of ``mnist_<workload>_lowrank`` or ``mnist_lowrank``) to the
workload's experiment, so model, data, optimizer and length stay the workload's. ``--whole`` runs
a technique's experiment as it is instead, when its model is the workload's (e.g.
``mnist_cnn_shrink`` against ``mnist_cnn``). A technique whose experiment is not registered, or
whose section this checkout's config does not know, is skipped with a note.

Every run is a fresh ``python -m jaxaccel.run`` process with its own workdir; runs alternate
(dense, masks, ..., dense, masks, ...; repeat r uses ``seed=r``) so drifts of the machine's load
hit all techniques. Time to target: the ``train_seconds`` of the first test line of
``metrics.jsonl`` at or above the target (training loop only: compile, evaluation and any
recompile after a model change excluded). Test lines come at each epoch end, so the time
resolves to an epoch. Reports medians over the repeats (a run that never reaches the target counts
as infinitely slow), the ratio to dense, the final accuracy and the final nonzero parameters.
``--out DIR`` keeps the runs (``python -m jaxaccel.report DIR`` plots accuracy against training
time); without it they go into a temporary directory. Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's jaxaccel, also when run as a script

WORKLOADS = {"mlp": ("mnist_mlp", 0.98), "cnn": ("mnist_cnn", 0.99)}  # experiment, default target
# technique -> (experiments that tune it, most specific first; the config section taken from it)
TECHNIQUES = {
    "dense": ((), None),
    "masks": (("mnist_sparse",), "sparsity"),
    "nm": (("mnist_nm",), "sparsity"),
    "bf16": (("mnist_bf16",), "precision"),
    "qat": (("mnist_qat",), "quant"),
    "shrink": (("mnist_{w}_shrink",), "sparsity"),
    "lowrank": (("mnist_{w}_lowrank", "mnist_lowrank"), "lowrank"),
}


def flatten(section: str, values: dict) -> list[str]:
    """``{"a": 1, "b": {"c": "x"}}`` -> ``["section.a=1", "section.b.c=\\"x\\""]``: JSON values, which
    the command line's YAML parser reads back as they were (strings such as ``"10.69%"`` too)."""
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += flatten(f"{section}.{key}", value)
        else:
            out.append(f"{section}.{key}={json.dumps(value)}")
    return out


def _raw_config(name: str) -> dict:
    """The ``config`` dict an experiment file writes (only the fields it changes)."""
    return importlib.import_module(f"jaxaccel.experiment_defs.{name}").config


def plan(technique: str, workload: str, whole: bool, extra: list[str] = ()) -> tuple[str, list[str], str]:
    """``(experiment, overrides, description)`` of one technique's runs (``extra``: the overrides
    every run adds); raises LookupError with the reason when this checkout cannot run it."""
    import jaxaccel
    from jaxaccel.config import ConfigError

    base, _ = WORKLOADS[workload]
    candidates, section = TECHNIQUES[technique]
    if section is None:
        return base, [], base
    registered = jaxaccel.experiments.names()
    source = next((c.format(w=workload) for c in candidates if c.format(w=workload) in registered), None)
    if source is None:
        raise LookupError(f"no experiment {' or '.join(c.format(w=workload) for c in candidates)} registered "
                          "(not merged into this checkout yet?)")
    raw = _raw_config(source)
    if whole and raw.get("model") == _raw_config(base).get("model"):
        exp, overrides, what = source, [], f"{source} (whole)"
    else:
        if section not in raw:
            raise LookupError(f"experiment {source} has no {section!r} section")
        exp, overrides, what = base, flatten(section, raw[section]), f"{base} + {section} of {source}"
    try:  # validated here, so an unknown key is a note, not a failed run
        jaxaccel.experiments.override(jaxaccel.experiments.get(exp), [*overrides, *extra])
    except ConfigError as e:
        raise LookupError(f"this checkout's config refuses it: {e}") from None
    return exp, overrides, what


def run_once(exp: str, overrides: list[str], extra: list[str], seed: int, workdir: Path) -> dict:
    """One run through the command line; its time to each accuracy, final accuracy and parameters."""
    from jaxaccel import report

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "jaxaccel.run", f"exp={exp}", *overrides, f"seed={seed}",
                             f"workdir={workdir}", *extra], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"failed": f"exit {result.returncode}: {tail}"}
    run = report.load_run(workdir)
    return {"curve": report.time_curve(run), "accuracy": run.summary["test_accuracy"],
            "train_seconds": run.summary["train_seconds"], "nonzero_params": run.nonzero_params,
            "recompile_seconds": run.summary.get("surgery_compile_seconds", 0.0)}  # after a shrink/factorization


def time_to(curve: list[tuple[float, float]], target: float) -> float:
    """Training seconds of the first evaluation at or above ``target``; inf when none is."""
    return next((seconds for seconds, accuracy in curve if accuracy >= target), math.inf)


def _seconds(s: float) -> str:
    return "not reached" if math.isinf(s) else f"{s:.2f} s"


def _ratio(a: float, b: float) -> str:
    return "-" if math.isinf(a) or math.isinf(b) or not b else f"{a / b:.2f}x"


def table(results: dict[str, list[dict]], what: dict[str, str], target: float) -> str:
    """The Markdown table of the medians (failed runs left out of them, and counted)."""
    rows = [f"| technique | runs of | time to {100 * target:g}% (median) | vs dense | reached | final accuracy "
            "(median) | training s (median) | vs dense | recompile s (not in training s) | nonzero params "
            "| time to target per run |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    med = {}
    for tech, runs in results.items():
        ok = [r for r in runs if "failed" not in r]
        if not ok:
            rows.append(f"| {tech} | {what[tech]} | all {len(runs)} failed: {runs[0]['failed']} | | | | | | | | |")
            continue
        times = [time_to(r["curve"], target) for r in ok]
        med[tech] = (statistics.median(times), statistics.median(r["train_seconds"] for r in ok))
        dense = med.get("dense", (math.nan, math.nan))
        failed = f", {len(runs) - len(ok)} failed" if len(ok) < len(runs) else ""
        rows.append(f"| {tech} | {what[tech]} | {_seconds(med[tech][0])} | {_ratio(med[tech][0], dense[0])} | "
                    f"{sum(not math.isinf(t) for t in times)}/{len(ok)}{failed} | "
                    f"{100 * statistics.median(r['accuracy'] for r in ok):.2f}% | {med[tech][1]:.2f} | "
                    f"{_ratio(med[tech][1], dense[1])} | {statistics.median(r['recompile_seconds'] for r in ok):.2f} | "
                    f"{statistics.median(r['nonzero_params'] for r in ok):,.0f} | "
                    f"{', '.join(_seconds(t).replace(' s', '') for t in times)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="mlp")
    parser.add_argument("--techniques", nargs="+", choices=list(TECHNIQUES), default=list(TECHNIQUES))
    parser.add_argument("--target", type=float, default=None, help="test accuracy (fraction; default 0.98 mlp, 0.99 cnn)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--whole", action="store_true", help="run a technique's experiment as it is when its model "
                                                             "is the workload's")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run "
                        "(e.g. train.epochs=1 for a smoke test)")
    args = parser.parse_args()
    os.environ.setdefault("TFDS_DATA_DIR", str(ROOT.parent / "shared" / "tfds"))
    if "dense" not in args.techniques:
        args.techniques.insert(0, "dense")  # the ratios are to it
    target = args.target if args.target is not None else WORKLOADS[args.workload][1]
    plans, what = {}, {}
    for tech in args.techniques:
        try:
            plans[tech] = plan(tech, args.workload, args.whole, args.set)
            what[tech] = plans[tech][2]
        except LookupError as e:
            print(f"# skipped {tech}: {e}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        results = {tech: [] for tech in plans}
        for r in range(args.repeats):
            for tech, (exp, overrides, _) in plans.items():
                workdir = out / f"{tech}-{r}"
                if workdir.exists():
                    raise SystemExit(f"{workdir} exists: give --out a fresh directory")
                results[tech].append(run_once(exp, overrides, args.set, r, workdir))
                print(f"#   {tech} repeat {r}: {json.dumps({k: v for k, v in results[tech][-1].items() if k != 'curve'})}",
                      flush=True)
    print(f"\n# benchmarks/time_to_accuracy.py --workload {args.workload}: {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, medians of {args.repeats} alternating rounds"
          f"{', overrides ' + ' '.join(args.set) if args.set else ''}\n")
    print(table(results, what, target))


if __name__ == "__main__":
    main()

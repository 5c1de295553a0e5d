"""Run one experiment at several config points, each into its own run directory.

    python -m jaxaccel.sweep exp=mnist_sparse 'sparsity.target=[0.5,0.8,0.9,0.95,0.98]' [key=value ...] [--out DIR]

A value given as a YAML list for a field that holds one value (a number, a string, a bool) is
swept; a field that holds a list (``model.features``, ``sparsity.include``) is swept with a list of
lists: ``'model.features=[[100],[300,100]]'``, while ``model.features=[64]`` just sets it. Several
swept keys run their cartesian product. Every other ``key=value`` applies to all points.

Each point runs as ``python -m jaxaccel.run`` in a subprocess (a failing point cannot take the
others down) into ``DIR/<key>=<value>[,...]`` (default DIR: ``runs/sweep_<exp>``), with its output
in ``run.log`` there; ``DIR/sweep.json`` lists the points and their exit status. Then
``python -m jaxaccel.report DIR`` tabulates and plots them. DIR may be a URL (``gs://bucket/sweep``):
each ``run.log`` is then written locally and uploaded when its point ends. All points are validated before the
first runs. Running the same sweep again resumes each point from its checkpoints (a finished point
is only evaluated and exported again). Exit status: 0 all points done, 2 bad command line or
config, 1 a point failed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
import types
import typing
from typing import Any

from jaxaccel import experiments
from jaxaccel import storage
from jaxaccel.config import ConfigError, field_info, parse_overrides
from jaxaccel.storage import StoragePath

__all__ = ["points", "main"]


def _field_is_list(key: str) -> bool:
    """Whether the config field ``key`` (dotted, public names) holds a list."""
    field = field_info(key)
    if field is None:  # unknown key: the config validation below names it
        return False
    model = field.annotation
    origin = typing.get_origin(model)
    return origin is list or (origin in (typing.Union, types.UnionType)
                              and any(typing.get_origin(a) is list for a in typing.get_args(model)))


def _is_sweep(key: str, value: Any) -> bool:
    if not isinstance(value, list):
        return False
    if _field_is_list(key):
        return bool(value) and all(isinstance(v, list) for v in value)
    return True


def _text(value: Any) -> str:
    """A value as an override string that YAML reads back as the same value."""
    return json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value


def points(args: list[str]) -> tuple[list[str], list[list[str]]]:
    """``(fixed, swept)``: the overrides every point shares, and per point one ``key=value`` of
    each swept key (``[[]]`` when nothing is swept)."""
    fixed, swept = [], []
    for arg, (key, value) in zip(args, parse_overrides(args)):
        if _is_sweep(key, value):
            if not value:
                raise ConfigError(f"{key}: an empty list sweeps nothing")
            swept.append([f"{key}={_text(v)}" for v in value])
        else:
            fixed.append(arg)
    return fixed, [list(combo) for combo in itertools.product(*swept)]


def _dirname(swept: list[str]) -> str:
    """``sparsity.target=0.9`` from the swept overrides, in characters any filesystem takes."""
    name = ",".join(swept) or "run"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)


def _run_point(exp: str, point: list[str], workdir: StoragePath) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "jaxaccel.run", f"exp={exp}", *point, f"workdir={workdir}"]
    # The run's output goes to a real file; in a URL workdir it is uploaded as run.log when the point ends.
    with storage.staged(workdir / "run.log") as log_path, log_path.open("w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ).returncode


def _tail(path: StoragePath, lines: int = 3) -> str:
    return "\n".join("    " + l for l in path.read_text().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m jaxaccel.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="+", metavar="exp=NAME | key=value")
    parser.add_argument("--out", help="directory of the runs (default: runs/sweep_<exp>)")
    parsed = parser.parse_args(argv)
    exp = [a for a in parsed.args if a.startswith("exp=")]
    if len(exp) != 1:
        print("error: give exactly one exp=NAME (python -m jaxaccel.run --list shows them)", file=sys.stderr)
        return 2
    name, overrides = exp[0][4:], [a for a in parsed.args if not a.startswith("exp=")]
    try:
        fixed, todo = points(overrides)
        for swept in todo:  # every point must be a valid config before any runs
            experiments.override(experiments.get(name), fixed + swept)
        out = storage.path(parsed.out or f"runs/sweep_{name}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = []
    for i, swept in enumerate(todo, 1):
        workdir = out / _dirname(swept)
        print(f"[{i}/{len(todo)}] {' '.join(swept) or name} -> {workdir}", flush=True)
        start = time.perf_counter()
        code = _run_point(name, fixed + swept, workdir)
        seconds = time.perf_counter() - start
        summary = workdir / "summary.json"
        if code == 0 and summary.exists():
            s = json.loads(summary.read_text())
            print(f"    done in {seconds:.0f}s: test accuracy {s['test_accuracy']:.4f}, sparsity {s['sparsity']:.4f}", flush=True)
        else:
            print(f"    FAILED (exit {code}) after {seconds:.0f}s; last lines of {workdir / 'run.log'}:\n"
                  f"{_tail(workdir / 'run.log')}", flush=True)
        results.append({"swept": swept, "overrides": fixed + swept, "workdir": str(workdir), "exit_status": code, "seconds": seconds})
    (out / "sweep.json").write_text(json.dumps({"experiment": name, "points": results}, indent=2))
    failed = [r for r in results if r["exit_status"] != 0]
    report_out = "report" if storage.is_url(out) else out / "report"  # the report writes locally
    print(f"{len(results) - len(failed)} of {len(results)} points done; "
          f"report: python -m jaxaccel.report {out} --out {report_out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Start-up of the command line with warm caches: where the seconds before the first step go.

Runs ``python -m jaxaccel.run exp=EXP ARGS`` ``--runs`` times in fresh processes (the first warms
the compilation and data caches and is not counted; a fresh workdir each time, so nothing resumes)
and reports medians of: the whole command, process start -> first training step
(``summary.json: seconds_to_first_step``), of which compile (mostly cache loads), the training
loop, and everything after it (final evaluation, checkpoint, export, compression report). Also the
import time of ``jaxaccel.trainer`` by top-level package (``python -X importtime``).

    python benchmarks/startup.py [--exp mnist_fast] [--runs 4] [ARGS ...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def one_run(exp: str, args: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as workdir:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jaxaccel.run", f"exp={exp}", f"workdir={workdir}", *args],
                       check=True, capture_output=True)
        wall = time.perf_counter() - t
        s = json.loads((Path(workdir) / "summary.json").read_text())
    first = s["seconds_to_first_step"]
    return {"command": wall, "to_first_step": first["from_process_start"],
            "before_train_call": first["from_process_start"] - first["from_train_call"],
            "compile": s["compile_seconds"], "train": s["train_seconds"],
            "after_training": wall - first["from_process_start"] - s["train_seconds"]}


def import_times(module: str = "jaxaccel.trainer") -> dict[str, float]:
    """Cumulative import seconds by top-level package (own time summed over its modules)."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                         capture_output=True, text=True, check=True).stderr
    own = defaultdict(float)
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            own[m.group(2).split(".")[0]] += int(m.group(1)) / 1e6
    return dict(sorted(own.items(), key=lambda kv: -kv[1])[:8])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", default="mnist_fast")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("args", nargs="*", help="extra key=value overrides")
    a = parser.parse_args()
    one_run(a.exp, a.args)  # warms the caches
    runs = [one_run(a.exp, a.args) for _ in range(a.runs - 1)]
    print(f"exp={a.exp} {' '.join(a.args)}; medians of {len(runs)} warm runs; load {os.getloadavg()}")
    print("| phase | s |\n| --- | --- |")
    for key in runs[0]:
        print(f"| {key} | {statistics.median(r[key] for r in runs):.2f} |")
    print("import seconds by package (own time):", {k: round(v, 2) for k, v in import_times().items()})


if __name__ == "__main__":
    main()

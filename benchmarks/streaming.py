"""The streaming input pipeline against the resident one, side by side.

    python benchmarks/streaming.py [--repeats 3] [--sections epoch workers synthetic] [--quick]

epoch      seconds of a steady-state epoch (the second of two: compile, the first evaluation and the
           executables' first run excluded) of mnist_mlp, mnist_cnn and mnist_fast with
           data.pipeline=resident and =stream, alternated round by round, medians; and the peak RSS
           of each run (the training process, and separately its largest Grain worker process).
workers    the pipeline alone, no training: examples/s of Grain reading and decoding MNIST's
           training batches (all rows of a 128 batch, as one process reads them) against the number
           of decoding threads (data.workers) and worker processes (data.worker_processes).
synthetic  a labelled 64x64x3 PNG dataset in TFDS's array_record form written here (--synthetic-gb
           on disk, default 2 GB, and half of it), trained --synthetic-steps steps with
           data.pipeline=auto under a device budget a quarter of its decoded size, so auto streams:
           the pipeline auto chose, peak RSS against the decoded size (bounded, and the same for both
           sizes), and training examples/s against the pipeline-only rate on that data.

Every training run is its own process (``python -c``, so peak RSS is that run's). --quick: one
round of a few steps and a ~20 MB synthetic dataset; a smoke test that every section runs, whose
numbers mean nothing. Run it on a quiet machine: the two pipelines share the CPU with everything.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's jaxaccel, also for the in-process pipeline measurements
EXPERIMENTS = ("mnist_mlp", "mnist_cnn", "mnist_fast")
PIPELINES = ("resident", "stream")
IMAGE_BYTES = 64 * 64 * 3

_RUNNER = r"""
import json, resource, sys, time
import jaxaccel
cfg = jaxaccel.experiments.override(jaxaccel.experiments.get(sys.argv[1]), sys.argv[2:])
t = time.perf_counter()
summary = jaxaccel.train(cfg)
config = json.loads(open(cfg.workdir + "/config.json").read())
print("BENCH " + json.dumps({
    "wall": time.perf_counter() - t, "train_seconds": summary["train_seconds"], "steps": summary["steps"],
    "epoch_seconds": summary["epoch_seconds"], "examples_per_second": summary["examples_per_second"],
    "data": config["data"], "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "worker_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def run(exp: str, overrides: list[str]) -> dict:
    """One training run in a fresh process; its BENCH record."""
    with tempfile.TemporaryDirectory() as workdir:
        result = subprocess.run([sys.executable, "-c", _RUNNER, exp, f"workdir={workdir}",
                                 "checkpoint.every_steps=1000000", *overrides],
                                capture_output=True, text=True, cwd=ROOT)
    lines = [l for l in result.stdout.splitlines() if l.startswith("BENCH ")]
    if result.returncode or not lines:
        raise SystemExit(f"{exp} {' '.join(overrides)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][6:])


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


# ---------------------------------------------------------------------------------------------

def epoch_section(repeats: int, quick: bool) -> None:
    length = ["train.steps=20"] if quick else ["train.steps=null", "train.epochs=2"]
    seconds = {(e, p): [] for e in EXPERIMENTS for p in PIPELINES}
    rss = {}
    for _ in range(repeats):
        for exp in EXPERIMENTS:
            for pipeline in PIPELINES:  # alternated, so drifts in the machine's load hit both
                record = run(exp, [*length, f"data.pipeline={pipeline}"])
                seconds[(exp, pipeline)].append(record["train_seconds"] if quick else record["epoch_seconds"][1])
                rss[(exp, pipeline)] = max(rss.get((exp, pipeline), (0, 0)), (record["rss"], record["worker_rss"]))
    what = "train_seconds of 20 steps" if quick else "s/epoch (second epoch)"
    print(f"\n### Epoch time, resident vs stream ({what}, medians of {repeats})\n")
    print("| experiment | resident | stream | stream / resident | peak RSS resident | peak RSS stream (+ worker) | runs (resident; stream) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for exp in EXPERIMENTS:
        r, s = (statistics.median(seconds[(exp, p)]) for p in PIPELINES)
        runs = "; ".join(", ".join(f"{t:.2f}" for t in seconds[(exp, p)]) for p in PIPELINES)
        print(f"| {exp} | {r:.2f} | {s:.2f} | {s / r:.2f}x | {_mb(rss[(exp, 'resident')][0])} | "
              f"{_mb(rss[(exp, 'stream')][0])} (+ {_mb(rss[(exp, 'stream')][1])}) | {runs} |")


# ---------------------------------------------------------------------------------------------

def pipeline_rate(name: str, data_dir: str | None, workers: int, processes: int, steps: int,
                  batch: int = 128) -> float:
    """Examples/s of Grain alone reading and decoding ``steps`` training batches (after 5 warm-up ones)."""
    import numpy as np

    from jaxaccel import data as data_lib
    from jaxaccel import streaming
    from jaxaccel.trainer import epoch_order
    sizes = streaming.read_sizes(name, data_dir, data_lib.Decoding())
    records = streaming.Records(sizes, "train", data_dir, data_lib.Decoding())
    records.open()
    rows = streaming.StepRows(records, epoch_order, 0, batch, sizes.num_train // batch, np.arange(batch))
    it = streaming.step_batches(rows, 0, steps + 5, workers, processes, buffer=2 * workers * max(processes, 1))
    try:
        for _ in range(5):
            next(it)
        t = time.perf_counter()
        for _ in range(steps):
            next(it)
        return steps * batch / (time.perf_counter() - t)
    finally:
        getattr(it, "close", lambda: None)()


def workers_section(quick: bool) -> None:
    settings = [(1, 0), (2, 0), (1, 1)] if quick else [(1, 0), (2, 0), (4, 0), (8, 0), (1, 2), (2, 2), (4, 4)]
    steps = 10 if quick else 200
    print(f"\n### Pipeline only: MNIST training batches of 128, decoded (examples/s over {steps} batches)\n")
    print("| data.workers (threads) | data.worker_processes | examples/s |")
    print("| --- | --- | --- |")
    for workers, processes in settings:
        rate = pipeline_rate("mnist", None, workers, processes, steps)
        print(f"| {workers} | {processes} | {rate:,.0f} |")


# ---------------------------------------------------------------------------------------------

def synthetic_section(gigabytes: float, steps: int, directory: str | None, quick: bool) -> None:
    from jaxaccel import prepare
    root = Path(directory or tempfile.mkdtemp(prefix="jaxaccel-synthetic-"))
    counts = [1500, 3000] if quick else [int(gigabytes / 2 * 1e9 / IMAGE_BYTES), int(gigabytes * 1e9 / IMAGE_BYTES)]
    steps = 20 if quick else steps
    rows = []
    try:
        for count in counts:
            name = f"synthetic_images{count}"
            data_dir = root / name
            if not (data_dir / name / "1.0.0" / "dataset_info.json").exists():
                t = time.perf_counter()
                prepare.synthetic_images(data_dir, name=name, num_train=count, num_test=1000)
                print(f"wrote {count:,} train images to {data_dir} in {time.perf_counter() - t:.0f}s", flush=True)
            on_disk = sum(p.stat().st_size for p in (data_dir / name / "1.0.0").iterdir())
            decoded = (count + 1000) * (IMAGE_BYTES + 4)
            record = run("mnist_mlp", [f"data.name={name}", f"data.dir={data_dir}", "data.pipeline=auto",
                                       f"data.device_budget_bytes={decoded // 4}", f"train.steps={steps}",
                                       "train.log_every_steps=50", "model.features=[256]"])
            rate = pipeline_rate(name, str(data_dir), os.cpu_count() or 1, 0, 20 if quick else 100)
            rows.append((count, on_disk, decoded, record, rate))
    finally:
        if directory is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n### Synthetic 64x64x3 PNGs, {steps} steps of a 12288-256-100-10 MLP, data.pipeline=auto, "
          "budget = decoded / 4\n")
    print("| train images | on disk | decoded | auto chose | peak RSS (+ worker) | RSS / decoded | "
          "training ex/s | pipeline-only ex/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for count, on_disk, decoded, record, rate in rows:
        print(f"| {count:,} | {_mb(on_disk)} | {_mb(decoded)} | {record['data']['pipeline']} | {_mb(record['rss'])} "
              f"(+ {_mb(record['worker_rss'])}) | {record['rss'] / decoded:.2f} | "
              f"{record['examples_per_second']:,.0f} | {rate:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", nargs="+", choices=["epoch", "workers", "synthetic"],
                        default=["epoch", "workers", "synthetic"])
    parser.add_argument("--synthetic-gb", type=float, default=2.0, help="size on disk of the larger synthetic dataset")
    parser.add_argument("--synthetic-steps", type=int, default=300)
    parser.add_argument("--synthetic-dir", default=None, help="keep (and reuse) the synthetic datasets here")
    parser.add_argument("--quick", action="store_true", help="a smoke test of every section (numbers mean nothing)")
    args = parser.parse_args()
    os.environ.setdefault("TFDS_DATA_DIR", str(ROOT.parent / "shared" / "tfds"))
    print(f"# benchmarks/streaming.py, {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs{' (--quick: numbers mean nothing)' if args.quick else ''}")
    if "epoch" in args.sections:
        epoch_section(1 if args.quick else args.repeats, args.quick)
    if "workers" in args.sections:
        workers_section(args.quick)
    if "synthetic" in args.sections:
        synthetic_section(args.synthetic_gb, args.synthetic_steps, args.synthetic_dir, args.quick)


if __name__ == "__main__":
    main()

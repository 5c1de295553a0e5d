"""Results of runs as a Markdown table and PNG plots.

    python -m jaxaccel.report RUN_DIR... [--out DIR]

Each RUN_DIR is a run directory (it holds ``config.json``, ``metrics.jsonl`` and, once finished,
``summary.json``) or any directory above runs, such as the one ``python -m jaxaccel.sweep``
writes: it is searched for the runs inside. RUN_DIRs may be URLs (``gs://bucket/runs``, read
through :mod:`jaxaccel.storage`). Writes into ``--out`` (a local directory, default ``report``):

- ``report.md``: one row per run (experiment, test accuracy, measured sparsity next to the target,
  compressed size, examples/s, training seconds, steps, model, accuracy against a dense run of the
  same model and data when the inputs hold one), the failed points of a sweep, and the plots below;
- ``training_curves.png``: training loss, and training and test accuracy, against the step;
- ``accuracy_vs_sparsity.png`` and ``accuracy_vs_size.png``: final test accuracy against the
  measured sparsity, and against the size of the dense fp32 / sparse / int8 / sparse+int8 forms of
  each model (the ``compression`` entry of ``summary.json``, each with its measured accuracy);
- ``accuracy_vs_time.png``: test accuracy against the training seconds at each evaluation (the
  ``train_seconds`` of ``metrics.jsonl``'s test lines: compile and evaluation excluded), one curve
  per run: time-to-accuracy;
- ``accuracy_vs_params.png``: final test accuracy against the nonzero parameters of the final model
  (``param_count`` of ``summary.json`` less the exact zeros counted at the last evaluation), marked
  by kind: dense, pruned (masks), shrunk (channels removed), low-rank (factorized).

Needs matplotlib (``pip install 'jaxaccel[report]'``). Exit status: 0 done, 2 bad arguments or
matplotlib missing, 1 anything else.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Any

from jaxaccel import storage
from jaxaccel.storage import StoragePath

__all__ = ["Run", "find_runs", "load_run", "table", "dense_reference", "failed_points", "time_curve", "plot", "main"]

_FORMS = {"dense_fp32": ("dense fp32", "o"), "sparse": ("sparse", "s"), "int8": ("int8", "^"),
          "sparse_int8": ("sparse+int8", "D")}
_KINDS = {"dense": "o", "pruned": "s", "shrunk": "v", "low-rank": "D"}  # accuracy_vs_params markers


@dataclasses.dataclass
class Run:
    """What one run directory holds; ``summary`` is empty for an unfinished run."""
    path: StoragePath
    label: str
    experiment: str
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # config.json's resolved "config"

    @property
    def model(self) -> str:
        """``model.name`` (an import path for your own model), '' when unknown."""
        return self.config.get("model", {}).get("name", "")

    @property
    def target_sparsity(self) -> float | None:
        """The sparsity the run aimed at: ``sparsity.target`` (1 - n/m for N:M), 0 for a dense
        run, None when it has none (a penalty with a threshold) or is unknown."""
        sp = self.config.get("sparsity")
        if not sp:
            return None
        if sp.get("structure") == "nm":
            return 1 - sp["n"] / sp["m"]
        if "target" in sp:
            return sp["target"]
        return 0.0 if sp.get("method", "none") == "none" and not sp.get("threshold") else None

    @property
    def kind(self) -> str:
        """How the run makes its model smaller: ``low-rank`` (a factorization among the model
        changes of ``summary.json``, or a ``lowrank`` section with a rank or energy), ``shrunk`` (a
        shrink among the changes, or ``sparsity.shrink``), ``pruned`` (a nonzero sparsity target,
        or zeros measured), else ``dense`` (bf16 and QAT runs included: same parameters)."""
        changes = {(c.get("surgery") or {}).get("kind") for c in self.summary.get("surgery") or []
                   if isinstance(c, dict)}
        lowrank = self.config.get("lowrank") or {}
        if "lowrank" in changes or any(lowrank.get(k) for k in ("rank", "energy", "from_start")):
            return "low-rank"
        if "shrink" in changes or (self.config.get("sparsity") or {}).get("shrink"):
            return "shrunk"
        if self.target_sparsity or self.summary.get("sparsity"):
            return "pruned"
        return "dense"

    @property
    def nonzero_params(self) -> int | None:
        """Parameters of the final model that are not exact zeros: ``summary.json``'s
        ``param_count`` (the final shapes, after any shrink or factorization) less the zeros of the
        last evaluation line (``zero_params``, counted over the prunable weights); None unfinished."""
        if "param_count" not in self.summary:
            return None
        zeros = next((m["zero_params"] for m in reversed(self.metrics)
                      if m.get("split") == "test" and "zero_params" in m), 0)
        return self.summary["param_count"] - zeros

    @property
    def dense(self) -> bool:
        """A dense reference point: finished, no sparsity asked for, not shrunk or factorized."""
        return bool(self.summary) and self.target_sparsity == 0.0 and self.kind == "dense"


def _is_run(path: StoragePath) -> bool:
    return (path / "config.json").exists() or (path / "metrics.jsonl").exists()


def find_runs(paths: list[str | StoragePath]) -> list[StoragePath]:
    """The run directories named by ``paths`` (local or URLs, ``gs://bucket/runs``): each one
    itself if it is a run, else the runs under it (not descending into a run, whose
    ``pretrained/`` belongs to it)."""
    found = []
    for path in map(storage.path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory")
        if _is_run(path):
            found.append(path)
            continue
        for root, dirs in storage.walk_dirs(path):
            if _is_run(root):
                found.append(root)
                dirs.clear()
    return found


def load_run(path: StoragePath, label: str | None = None) -> Run:
    """Read one run directory (any of its three files may be missing)."""
    def read_json(name):
        file = path / name
        return json.loads(file.read_text()) if file.exists() else {}
    metrics_file = path / "metrics.jsonl"
    lines = metrics_file.read_text().splitlines() if metrics_file.exists() else []
    summary, config = read_json("summary.json"), read_json("config.json")
    experiment = config.get("experiment") or summary.get("experiment", "")
    return Run(path, label or path.name, experiment, [json.loads(l) for l in lines if l.strip()], summary,
               config.get("config", {}))


def _labels(paths: list[StoragePath]) -> list[str]:
    """Short unique names: the paths relative to their common parent."""
    if len(paths) == 1:
        return [paths[0].name or str(paths[0])]
    full = [_absolute(p) for p in paths]
    common = Path(os.path.commonpath(full))
    return [str(f.relative_to(common)) or p.name for f, p in zip(full, paths)]


def _absolute(path: StoragePath) -> PurePosixPath:
    """A local path resolved; a URL as the path ``/scheme/bucket/...``, so URLs and local paths
    share one kind of common parent (``os.path.commonpath`` would fold ``gs://`` into ``gs:/``)."""
    if storage.is_url(path):
        scheme, rest = str(path).split("://", 1)
        return PurePosixPath("/", scheme, rest)
    return path.resolve()


# ---------------------------------------------------------------------------------------------
# Table.

def _bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def dense_reference(run: Run, runs: list[Run]) -> Run | None:
    """The dense run among ``runs`` to compare ``run`` with: same model and dataset, no sparsity
    (the first such one; None when the inputs hold none, or ``run`` is dense itself)."""
    if run.dense:
        return None
    data = run.config.get("data", {}).get("name")
    return next((r for r in runs if r.dense and r.model == run.model
                 and r.config.get("data", {}).get("name") == data), None)


def _sparsity_cell(run: Run) -> str:
    target = run.target_sparsity
    achieved = f"{100 * run.summary['sparsity']:.2f}%"
    # A shrinking run reaches its target by removing the pruned units: its zeros are gone.
    removed = ", pruned units removed" if run.kind == "shrunk" else ""
    return achieved if target is None else f"{achieved} (target {100 * target:.2f}%{removed})"


def _versus_dense(run: Run, runs: list[Run]) -> str:
    ref = dense_reference(run, runs)
    if ref is None:
        return "dense reference" if run.dense else "-"
    delta = 100 * (run.summary["test_accuracy"] - ref.summary["test_accuracy"])
    return f"{delta:+.2f} pts vs {ref.label} ({100 * ref.summary['test_accuracy']:.2f}%)"


def table(runs: list[Run]) -> str:
    """The Markdown table: one row per run, '-' where a finished run's summary is missing. The
    sparsity column gives the measured sparsity next to the run's target; the last column compares
    the accuracy with a dense run of the same model and data when the inputs hold one."""
    rows = ["| run | experiment | test accuracy | sparsity (target) | compressed size (dense fp32 / it) | examples/s "
            "| train s | steps | model | accuracy vs dense |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        s = run.summary
        if not s:
            rows.append(f"| {run.label} | {run.experiment} | - (unfinished: no summary.json) | - | - | - | - | - | "
                        f"{run.model or '-'} | - |")
            continue
        size = (f"{_bytes(s['compressed_bytes'])} ({s['model_bytes'] / s['compressed_bytes']:.2f}x)"
                if s.get("compressed_bytes") else "-")
        rows.append(f"| {run.label} | {run.experiment} | {100 * s['test_accuracy']:.2f}% | "
                    f"{_sparsity_cell(run)} | {size} | {s['examples_per_second']:,.0f} | "
                    f"{s['train_seconds']:.1f} | {s['steps']} | {run.model or '-'} | {_versus_dense(run, runs)} |")
    return "\n".join(rows) + "\n"


def failed_points(paths: list[str | StoragePath]) -> str:
    """Markdown lines for the failed points of the sweeps (``sweep.json``) among ``paths``."""
    lines = []
    for path in map(storage.path, paths):
        if (path / "sweep.json").exists():
            for point in json.loads((path / "sweep.json").read_text())["points"]:
                if point["exit_status"]:
                    log = storage.path(point["workdir"]) / "run.log"
                    last = log.read_text().strip().splitlines()[-1:] if log.exists() else []
                    lines.append(f"- `{' '.join(point.get('swept', point['overrides']))}`: exit {point['exit_status']}: "
                                 f"{' '.join(last)} ({log})")
    return "\n**Failed sweep points**\n\n" + "\n".join(lines) + "\n" if lines else ""


def time_curve(run: Run) -> list[tuple[float, float]]:
    """``(train_seconds, test accuracy)`` of each test line that carries the training time."""
    return [(m["train_seconds"], m["accuracy"]) for m in run.metrics
            if m.get("split") == "test" and "train_seconds" in m]


# ---------------------------------------------------------------------------------------------
# Plots.

def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("jaxaccel.report draws its plots with matplotlib: pip install 'jaxaccel[report]'") from None


def _figure(**kw):
    """A figure outside pyplot: it renders to files with Agg and leaves pyplot's backend and figure
    list alone (the report may run inside a notebook)."""
    from matplotlib.figure import Figure
    return Figure(**kw)


def _colors(n: int) -> list:
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def _plain_log_ticks(axis) -> None:
    """Ticks at 1, 2, 3, 5 x 10^k labelled as plain numbers (0.2, 500) instead of 2 x 10^-1."""
    from matplotlib import ticker
    axis.set_major_locator(ticker.LogLocator(subs=(1, 2, 3, 5)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _training_curves(runs: list[Run], colors: list, path: Path) -> None:
    fig = _figure(figsize=(12, 4.5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for run, color in zip(runs, colors):
        train = [m for m in run.metrics if "split" not in m and "loss" in m]  # not records of a model change
        test = [m for m in run.metrics if m.get("split") == "test"]
        ax_loss.plot([m["step"] for m in train], [m["loss"] for m in train], ".-", color=color, label=run.label)
        if train and "accuracy" in train[0]:
            ax_acc.plot([m["step"] for m in train], [100 * m["accuracy"] for m in train], ".-", color=color, alpha=0.6)
        ax_acc.plot([m["step"] for m in test], [100 * m["accuracy"] for m in test], "o", color=color,
                    markeredgecolor="black", label=run.label)
    ax_loss.set(xlabel="step", ylabel="training loss (cross-entropy, log scale)", title="Training loss", yscale="log")
    _plain_log_ticks(ax_loss.yaxis)
    ax_acc.set(xlabel="step", ylabel="accuracy (%)", title="Accuracy: training (line), test (dots)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize="small", title="run", bbox_to_anchor=(1.02, 1), loc="upper left")
    _save(fig, path)


def _accuracy_vs_sparsity(runs: list[Run], colors: list, path: Path) -> None:
    fig = _figure(figsize=(7, 4.5))
    ax = fig.subplots()
    done = [(r, c) for r, c in zip(runs, colors) if r.summary]
    for experiment in {r.experiment for r, _ in done}:  # a line through each experiment's runs (a sweep)
        points = sorted((100 * r.summary["sparsity"], 100 * r.summary["test_accuracy"])
                        for r, _ in done if r.experiment == experiment)
        if len(points) > 1:
            ax.plot(*zip(*points), color="lightgray", zorder=1)
    for run, color in done:
        x, y = 100 * run.summary["sparsity"], 100 * run.summary["test_accuracy"]
        ax.scatter(x, y, color=color, edgecolor="black", s=50, zorder=2, label=run.label)
        if run.target_sparsity:  # the target, hollow, on the same accuracy: the gap is what was missed
            ax.scatter(100 * run.target_sparsity, y, facecolor="none", edgecolor=color, s=80, zorder=2)
        if run.dense:  # a dense reference point: its accuracy across the plot
            ax.axhline(y, color=color, linestyle="--", linewidth=1, zorder=1)
    ax.set(xlabel="sparsity: exact zeros in the prunable weights (%); hollow: the run's target; dashed: dense",
           ylabel="test accuracy (%)", title="Test accuracy vs sparsity")
    ax.grid(alpha=0.3)
    _legend_or_note(ax, bool(done), title="run", fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    _save(fig, path)


def _accuracy_vs_size(runs: list[Run], colors: list, path: Path) -> None:
    from matplotlib.lines import Line2D
    fig = _figure(figsize=(8, 4.8))
    ax = fig.subplots()
    done = [(r, c) for r, c in zip(runs, colors) if r.summary]
    for run, color in done:
        forms = run.summary.get("compression") or {
            "dense_fp32": {"bytes": run.summary["model_bytes"], "accuracy": run.summary["test_accuracy"]}}
        exported = run.summary.get("compressed_bytes")
        for form, entry in forms.items():
            if entry.get("accuracy") is None:  # a form that could not run on the run's backend
                continue
            name, marker = _FORMS.get(form, (form, "x"))
            # Hollow, so forms of equal size (dense and sparse of a dense model) stay visible.
            ax.scatter(entry["bytes"] / 1e3, 100 * entry["accuracy"], marker=marker, s=60, zorder=2,
                       facecolor="none", edgecolor=color, linewidth=1.5)
        if exported:
            ax.scatter(exported / 1e3, 100 * run.summary["test_accuracy"], marker="*", s=140, color=color,
                       edgecolor="black", linewidth=0.5, zorder=3)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set(xlabel="model size (kB, log scale)", ylabel="test accuracy (%)",
           title="Test accuracy vs size of each stored form")
    ax.grid(alpha=0.3, which="both")
    run_handles = [Line2D([], [], marker="o", linestyle="", color=c, markeredgecolor="black", label=r.label)
                   for r, c in done]
    form_handles = [Line2D([], [], marker=m, linestyle="", markerfacecolor="none", markeredgecolor="black",
                           label=n) for n, m in _FORMS.values()]
    form_handles.append(Line2D([], [], marker="*", linestyle="", color="gray", markersize=11,
                               markeredgecolor="black", label="the exported form"))
    if not done:
        _legend_or_note(ax, False)
        return _save(fig, path)
    first = ax.legend(handles=run_handles, title="run", fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    ax.add_artist(first)
    ax.legend(handles=form_handles, title="form (accuracy measured)", fontsize="small",
              bbox_to_anchor=(1.02, 0), loc="lower left")
    _save(fig, path)


def _accuracy_vs_time(runs: list[Run], colors: list, path: Path) -> None:
    fig = _figure(figsize=(8, 4.5))
    ax = fig.subplots()
    curves = [(r, c, time_curve(r)) for r, c in zip(runs, colors)]
    curves = [(r, c, pts) for r, c, pts in curves if pts]
    for run, color, points in curves:
        seconds, accuracy = zip(*points)
        ax.plot(seconds, [100 * a for a in accuracy], "o-", color=color, markeredgecolor="black",
                markersize=4, label=run.label)
    ax.set(xlabel="training seconds (compile and evaluation excluded)", ylabel="test accuracy (%)",
           title="Time to accuracy: test accuracy at each evaluation")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(title="run", fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    else:
        ax.text(0.5, 0.5, "no test line with train_seconds", transform=ax.transAxes, ha="center")
    _save(fig, path)


def _accuracy_vs_params(runs: list[Run], colors: list, path: Path) -> None:
    from matplotlib.lines import Line2D
    fig = _figure(figsize=(8, 4.8))
    ax = fig.subplots()
    done = [(r, c) for r, c in zip(runs, colors) if r.nonzero_params is not None]
    for run, color in done:
        ax.scatter(run.nonzero_params, 100 * run.summary["test_accuracy"], marker=_KINDS[run.kind], s=60,
                   color=color, edgecolor="black", zorder=2)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set(xlabel="nonzero parameters of the final model (log scale)", ylabel="test accuracy (%)",
           title="Test accuracy vs parameters")
    ax.grid(alpha=0.3, which="both")
    if not done:
        _legend_or_note(ax, False)
        return _save(fig, path)
    run_handles = [Line2D([], [], marker=_KINDS[r.kind], linestyle="", color=c, markeredgecolor="black",
                          label=r.label) for r, c in done]
    kind_handles = [Line2D([], [], marker=m, linestyle="", markerfacecolor="none", markeredgecolor="black",
                           label=k) for k, m in _KINDS.items()]
    first = ax.legend(handles=run_handles, title="run", fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    ax.add_artist(first)
    ax.legend(handles=kind_handles, title="kind", fontsize="small", bbox_to_anchor=(1.02, 0), loc="lower left")
    _save(fig, path)


def _legend_or_note(ax, any_run: bool, **legend) -> None:
    if any_run:
        ax.legend(**legend)
    else:
        ax.text(0.5, 0.5, "no finished run (no summary.json)", transform=ax.transAxes, ha="center")


def _save(fig, path: Path) -> None:
    from matplotlib.legend import Legend
    # "tight" keeps the legends outside the axes; a legend kept with add_artist must be named here
    # or its long run names are cut off.
    legends = [a for ax in fig.axes for a in ax.get_children() if isinstance(a, Legend)]
    fig.savefig(path, dpi=110, bbox_inches="tight", bbox_extra_artists=legends)


def plot(runs: list[Run], out: Path) -> list[Path]:
    """Write the five PNGs into ``out``; returns their paths."""
    _require_matplotlib()
    colors = _colors(len(runs))
    plots = {"training_curves": _training_curves, "accuracy_vs_sparsity": _accuracy_vs_sparsity,
             "accuracy_vs_size": _accuracy_vs_size, "accuracy_vs_time": _accuracy_vs_time,
             "accuracy_vs_params": _accuracy_vs_params}
    for name, draw in plots.items():
        draw(runs, colors, out / f"{name}.png")
    return [out / f"{name}.png" for name in plots]


# ---------------------------------------------------------------------------------------------
# Command line.

def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m jaxaccel.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories holding runs")
    parser.add_argument("--out", default="report", help="output directory (default: report)")
    args = parser.parse_args(argv)
    try:
        _require_matplotlib()  # fail before reading anything
        paths = find_runs(args.runs)
    except (ImportError, FileNotFoundError, storage.UnsupportedURL) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not paths:
        print(f"error: no run directories (with config.json or metrics.jsonl) in {', '.join(args.runs)}",
              file=sys.stderr)
        return 2
    runs = [load_run(p, label) for p, label in zip(paths, _labels(paths))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(runs) + failed_points(args.runs)
    files = plot(runs, out)
    images = "\n".join(f"![{f.stem.replace('_', ' ')}]({f.name})" for f in files)
    (out / "report.md").write_text(f"# Runs\n\n{text}\n{images}\n")
    print(text + f"\nwrote {out / 'report.md'} and {', '.join(f.name for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

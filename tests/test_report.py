"""The sweep runs points into one directory; the report reads it into a table and plots."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from jaxaccel import report, sweep
from jaxaccel.config import ConfigError

TINY = ["model.features=[32]", "train.steps=40", "sparsity.start=0", "sparsity.end=20",
        "sparsity.update_every=10", "train.log_every_steps=10"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Two real points and two that fail when they start (a batch larger than the dataset)."""
    out = tmp_path_factory.mktemp("sweep")
    code = sweep.main(["exp=mnist_sparse", "sparsity.target=[0.5,0.9]", "train.batch_size=[128,100000]",
                       *TINY, "--out", str(out)])
    return out, code


def test_sweep_runs_the_cartesian_product_and_reports_failed_points(swept):
    out, code = swept
    assert code == 1  # two points failed, the others still ran
    points = json.loads((out / "sweep.json").read_text())["points"]
    by_status = {tuple(p["overrides"][-2:]): p["exit_status"] for p in points}
    assert by_status == {("sparsity.target=0.5", "train.batch_size=128"): 0,
                         ("sparsity.target=0.5", "train.batch_size=100000"): 2,
                         ("sparsity.target=0.9", "train.batch_size=128"): 0,
                         ("sparsity.target=0.9", "train.batch_size=100000"): 2}
    for p in points:
        workdir = Path(p["workdir"])
        assert p["overrides"][:len(TINY)] == TINY
        assert (workdir / "summary.json").exists() == (p["exit_status"] == 0)
        if p["exit_status"]:
            assert "larger than the training split" in (workdir / "run.log").read_text()
        else:
            config = json.loads((workdir / "config.json").read_text())["config"]
            assert config["sparsity"]["target"] == float(p["overrides"][-2].split("=")[1])
            assert config["model"]["features"] == [32]


def test_report_tabulates_and_plots_the_sweep(swept, tmp_path):
    out, _ = swept
    assert report.main([str(out), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    for target in ("0.5", "0.9"):
        run = out / f"sparsity.target={target},train.batch_size=128"
        summary = json.loads((run / "summary.json").read_text())
        row = next(l for l in text.splitlines() if l.startswith(f"| {run.name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "mnist_sparse"
        assert cells[2] == f"{100 * summary['test_accuracy']:.2f}%"
        assert cells[3] == f"{100 * summary['sparsity']:.2f}% (target {100 * float(target):.2f}%)"
        assert abs(summary["sparsity"] - float(target)) < 0.01
        assert cells[4].startswith(f"{summary['compressed_bytes'] / 1e3:.1f} kB")
        assert cells[7] == "40"
    table, failed = text.split("**Failed sweep points**")
    assert "100000" not in table  # the failed points left no run to report, but are listed
    assert failed.count("train.batch_size=100000`: exit 2: error: train.batch_size=100000 is larger") == 2
    import matplotlib.image
    for name in ("training_curves", "accuracy_vs_sparsity", "accuracy_vs_size", "accuracy_vs_time",
                 "accuracy_vs_params"):
        assert f"({name}.png)" in text
        height, width, _ = matplotlib.image.imread(tmp_path / f"{name}.png").shape
        assert width > 600 and height > 300


def test_test_lines_carry_the_training_seconds_of_the_summary(swept):
    """time-to-accuracy reads train_seconds off the test lines: it grows, and the last one is the
    summary's (training loop only, compile excluded)."""
    run = next(p for p in swept[0].iterdir() if p.name.endswith("train.batch_size=128"))
    loaded = report.load_run(run)
    curve = report.time_curve(loaded)
    assert curve and [a for _, a in curve] == [m["accuracy"] for m in loaded.metrics if m.get("split") == "test"]
    seconds = [s for s, _ in curve]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert seconds[-1] == loaded.summary["train_seconds"]
    assert seconds[-1] < loaded.summary["train_seconds"] + loaded.summary["compile_seconds"]
    assert loaded.kind == "pruned"
    last = [m for m in loaded.metrics if m.get("split") == "test"][-1]
    assert loaded.nonzero_params == loaded.summary["param_count"] - last["zero_params"]
    assert 0 < last["zero_params"] < last["prunable_params"] < loaded.summary["param_count"]


def _fake_run(root: Path, name: str, config: dict, curve: list[tuple[float, float]], param_count: int,
              zeros: int = 0, changes: tuple[str, ...] = ()) -> Path:
    """A finished run directory written by hand: test lines at the given (seconds, accuracy), and
    a model change of each kind in ``changes`` (lines as jaxaccel.surgery writes them)."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"experiment": name, "config": config}))
    lines = [{"step": 10 * (i + 1), "split": "test", "accuracy": a, "loss": 1.0, "train_seconds": t,
              "zero_params": zeros} for i, (t, a) in enumerate(curve)]
    surgery = [{"step": 15, "split": "surgery", "surgery": {"kind": kind}, "compile_seconds": 0.5,
                "param_count": param_count} for kind in changes]
    lines[1:1] = surgery
    lines.insert(0, {"step": 5, "loss": 2.0, "accuracy": 0.2})
    (run / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    summary = {"test_accuracy": curve[-1][1], "sparsity": 0.0, "param_count": param_count, "train_seconds": curve[-1][0],
               "model_bytes": 4 * param_count, "examples_per_second": 1.0, "steps": 10 * len(curve),
               **({"surgery": surgery} if surgery else {})}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_time_and_parameter_plots_draw_each_run_by_its_kind(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    _fake_run(runs, "dense", {"sparsity": {"method": "none"}}, [(1.0, 0.9), (2.0, 0.97)], 1000)
    _fake_run(runs, "pruned", {"sparsity": {"method": "magnitude", "target": 0.9}}, [(1.5, 0.8), (3.0, 0.96)], 1000, 850)
    _fake_run(runs, "shrunk", {"sparsity": {"structure": "channel", "target": 0.5, "shrink": True}},
              [(0.5, 0.85), (1.0, 0.95), (1.2, 0.965)], 400, changes=("shrink",))
    _fake_run(runs, "lowrank", {"lowrank": {"rank": 8}}, [(0.7, 0.9), (1.4, 0.955)], 300)
    _fake_run(runs, "factored", {"lowrank": {"at": "50%"}}, [(0.7, 0.9), (1.4, 0.95)], 250, changes=("lowrank",))
    figures = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.__setitem__(path.stem, fig))
    assert report.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    loaded = {r.label: r for r in map(report.load_run, report.find_runs([runs]))}
    assert {k: r.kind for k, r in loaded.items()} == {"dense": "dense", "pruned": "pruned", "shrunk": "shrunk",
                                                      "lowrank": "low-rank", "factored": "low-rank"}
    assert {k: r.nonzero_params for k, r in loaded.items()} == {"dense": 1000, "pruned": 150, "shrunk": 400,
                                                                "lowrank": 300, "factored": 250}
    # One curve per run through its test lines, in the order the runs were found (sorted names).
    time_ax = figures["accuracy_vs_time"].axes[0]
    drawn = {l.get_label(): [*l.get_xdata(), *l.get_ydata()] for l in time_ax.lines}
    assert len(drawn) == 5
    assert drawn["shrunk"] == pytest.approx([0.5, 1.0, 1.2, 85.0, 95.0, 96.5])
    assert drawn["pruned"] == pytest.approx([1.5, 3.0, 80.0, 96.0])
    params_ax = figures["accuracy_vs_params"].axes[0]
    points = sorted(tuple(p) for c in params_ax.collections for p in c.get_offsets())
    assert [x for p in points for x in p] == pytest.approx([150, 96.0, 250, 95.0, 300, 95.5, 400, 96.5, 1000, 97.0])
    assert [k for k, r in loaded.items() if r.dense] == ["dense"]  # a factorized run is no dense reference
    text = (tmp_path / "out" / "report.md").read_text()
    assert "(accuracy_vs_time.png)" in text and "(accuracy_vs_params.png)" in text
    assert "| 0.00% (target 50.00%, pruned units removed) |" in next(l for l in text.splitlines()
                                                                     if l.startswith("| shrunk |"))
    row = next(l for l in text.splitlines() if l.startswith("| lowrank |"))
    assert row.endswith("| -1.50 pts vs dense (97.00%) |")


def test_find_runs_takes_runs_and_directories_of_runs_but_not_what_a_run_holds(tmp_path):
    for run in ("a", "group/b", "group/c", "group/c/pretrained"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "config.json").write_text(json.dumps({"experiment": run}))
    (tmp_path / "group" / "failed").mkdir()  # a sweep point that never started: only run.log
    (tmp_path / "group" / "failed" / "run.log").write_text("error")
    found = report.find_runs([tmp_path / "a", tmp_path / "group"])
    assert found == [tmp_path / "a", tmp_path / "group" / "b", tmp_path / "group" / "c"]
    assert report._labels(found) == ["a", "group/b", "group/c"]


def test_unfinished_run_is_plotted_and_marked_in_the_table(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 10, "loss": 2.0, "accuracy": 0.3}, {"step": 20, "split": "test", "accuracy": 0.5, "loss": 1.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    assert report.main([str(run), "--out", str(tmp_path / "out")]) == 0
    assert "unfinished: no summary.json" in (tmp_path / "out" / "report.md").read_text()


def test_report_without_matplotlib_or_runs_says_so(tmp_path, monkeypatch, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert report.main([str(tmp_path)]) == 2
    assert "pip install 'jaxaccel[report]'" in capsys.readouterr().err


def test_sweep_syntax_lists_of_scalars_sweep_list_fields_need_lists_of_lists():
    assert sweep.points(["model.features=[64]", "train.steps=5"]) == (["model.features=[64]", "train.steps=5"], [[]])
    assert sweep.points(["model.features=[[32],[64,32]]"]) == ([], [["model.features=[32]"], ["model.features=[64,32]"]])
    fixed, todo = sweep.points(["sparsity.target=[0.5,0.9]", "optim.name=[sgd,adam]", "seed=1"])
    assert fixed == ["seed=1"]
    assert todo == [["sparsity.target=0.5", "optim.name=sgd"], ["sparsity.target=0.5", "optim.name=adam"],
                    ["sparsity.target=0.9", "optim.name=sgd"], ["sparsity.target=0.9", "optim.name=adam"]]
    assert sweep.points(["data.dir=[a]"])[1] == [["data.dir=a"]]  # Optional[str] is a scalar field
    with pytest.raises(ConfigError, match="empty list"):
        sweep.points(["seed=[]"])


def test_sweep_refuses_a_bad_point_before_running_any(tmp_path, capsys):
    assert sweep.main(["exp=mnist_sparse", "sparsity.target=[0.5,1.5]", "--out", str(tmp_path / "s")]) == 2
    assert "sparsity.target=1.5 is invalid" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    assert sweep.main(["sparsity.target=[0.5]"]) == 2

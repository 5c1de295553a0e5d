"""Fine-tuning (init.from / include / freeze / pretrain) and TensorBoard event files, on tiny
real runs, and ``fashion_mnist_finetune`` held to its docstring (its runtime is above the 20 s of
tests/test_accuracy.py)."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

import jaxaccel
from jaxaccel.config import ConfigError

TINY = ["model.features=[32]", "train.batch_size=128", "train.log_every_steps=10"]


def _train(workdir: Path, *overrides: str) -> dict:
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"),
                                        [f"workdir={workdir}", *TINY, *overrides])
    return jaxaccel.train(cfg)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 50-step MNIST run with checkpoints at 30 and 50: the model to fine-tune from."""
    workdir = tmp_path_factory.mktemp("source")
    _train(workdir, "train.steps=50", "checkpoint.every_steps=30")
    return workdir


def _params(run: Path) -> dict:
    return jaxaccel.export.load(run).params


def test_freeze_keeps_params_bit_identical_and_include_loads_only_matches(source, tmp_path):
    # Dense_0 is loaded and frozen; Dense_1 (the head) is not loaded, its kernel frozen at the fresh
    # init and its bias trained.
    _train(tmp_path, "train.steps=30", f"init.from={source}", "init.include=[^Dense_0/]",
           "init.freeze=[^Dense_0/,^Dense_1/kernel]")
    before, after = _params(source), _params(tmp_path)
    for name in ("kernel", "bias"):
        assert np.asarray(after["Dense_0"][name]).tobytes() == np.asarray(before["Dense_0"][name]).tobytes()
        assert not np.allclose(after["Dense_1"][name], before["Dense_1"][name])
    # The head kernel was frozen at its fresh initialisation: the same seed's init, never the source.
    import jax
    from jaxaccel.models import build_model
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"), TINY)
    model = build_model(cfg.model, 10, cfg.precision, cfg.quant)
    fresh = model.init(jax.random.fold_in(jax.random.key(cfg.seed), 0), np.zeros((1, 28, 28, 1), np.uint8))
    np.testing.assert_array_equal(after["Dense_1"]["kernel"], fresh["params"]["Dense_1"]["kernel"])


def test_freeze_of_nothing_and_include_without_source_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="init.freeze: 'Conv' matches no parameter; paths: Dense_0/bias"):
        _train(tmp_path, "train.steps=5", "init.freeze=[Conv]")
    with pytest.raises(ConfigError, match="set init.from"):
        jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"), ["init.include=[Dense_0]"])
    with pytest.raises(ConfigError, match="init.freeze.*not a regular expression"):
        jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"), ["init.freeze=['(']"])


def test_an_include_pattern_that_loads_nothing_is_a_config_error(source, tmp_path):
    # One of two patterns is a typo: the run stops naming it instead of leaving that layer fresh.
    with pytest.raises(ConfigError, match=r"init.include: '\^Dense_7/' matches no parameter; paths: Dense_0/bias"):
        _train(tmp_path, "train.steps=5", f"init.from={source}", "init.include=[^Dense_0/,^Dense_7/]")


def test_tensorboard_required_but_missing_says_what_to_install(monkeypatch):
    import importlib.util
    from jaxaccel.metrics import tensorboard_enabled
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else real(name, *a))
    assert tensorboard_enabled(None) is False and tensorboard_enabled(False) is False
    with pytest.raises(ConfigError, match=r"pip install 'jaxaccel\[tensorboard\]'"):
        tensorboard_enabled(True)


def test_tensorboard_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch when installed (~2 s of every run's start-up); the writer hides
    it for that import, and torch stays importable afterwards."""
    pytest.importorskip("torch")
    code = ("import sys; from jaxaccel.metrics import MetricsWriter; "
            f"w = MetricsWriter({str(tmp_path / 'm.jsonl')!r}, tensorboard=True); w.write({{'step': 1, 'loss': 0.5}}); "
            "w.close(); print('torch' in sys.modules); import torch; print(torch.ones(2).sum().item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "2.0"]
    assert list(tmp_path.glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------
# TensorBoard event files, read back without TensorBoard: TFRecord framing + the Event proto.

def _events(run: Path):
    from tensorboardX.proto import event_pb2
    for path in sorted(run.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4


def _scalars(run: Path, purge: bool) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] in file order; with ``purge``, as TensorBoard shows them (a START
    session log at step s hides the earlier events at steps >= s)."""
    out = defaultdict(list)
    for event in _events(run):
        if purge and event.HasField("session_log") and event.session_log.status == event.session_log.START:
            for tag in out:
                out[tag] = [(s, v) for s, v in out[tag] if s < event.step]
        for value in event.summary.value:
            out[value.tag].append((event.step, value.simple_value))
    return out


def _jsonl(run: Path) -> dict[str, list[tuple[int, float]]]:
    out = defaultdict(list)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("step", "split"):
                out[f"{record.get('split', 'train')}/{key}"].append((record["step"], value))
    return out


def _assert_same(events, jsonl):
    assert set(events) == set(jsonl)
    for tag in jsonl:
        assert [s for s, _ in events[tag]] == [s for s, _ in jsonl[tag]], tag
        np.testing.assert_allclose([v for _, v in events[tag]], [v for _, v in jsonl[tag]], rtol=1e-6, err_msg=tag)


def test_tensorboard_events_hold_every_metrics_line(source):
    jsonl = _jsonl(source)
    assert {"train/loss", "train/accuracy", "test/accuracy", "test/sparsity/Dense_0/kernel"} <= set(jsonl)
    _assert_same(_scalars(source, purge=False), jsonl)


def test_tensorboard_shows_each_step_once_after_a_resume(source, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(source, run)
    shutil.rmtree(run / "checkpoints" / "50")  # as if killed after step 50's lines, before its checkpoint
    _train(run, "train.steps=50", "checkpoint.every_steps=30")
    raw, shown = _scalars(run, purge=False), _scalars(run, purge=True)
    assert [s for s, _ in raw["train/loss"]] == [10, 20, 30, 40, 50, 40, 50]
    _assert_same(shown, _jsonl(run))


def test_pretrain_must_name_a_registered_experiment(tmp_path):
    from jaxaccel import finetune
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("fashion_mnist_finetune"),
                                        ["init.pretrain=mnist_mpl train.epochs=1"])
    with pytest.raises(ConfigError, match=r"init.pretrain='mnist_mpl train.epochs=1': unknown experiment 'mnist_mpl'\. Did you mean mnist_mlp"):
        finetune.pretrain(cfg, tmp_path, print)
    assert not (tmp_path / "pretrained").exists()


def test_fashion_mnist_finetune_from_a_1_epoch_mnist_model_meets_its_docstring(tmp_path):
    info = jaxaccel.experiments.info("fashion_mnist_finetune")
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("fashion_mnist_finetune"), [f"workdir={tmp_path}"])
    summary = jaxaccel.train(cfg)
    pretrained = json.loads((tmp_path / "pretrained" / "summary.json").read_text())
    assert pretrained["experiment"] == "mnist_mlp" and pretrained["steps"] == 60000 // 128  # one MNIST epoch
    config = json.loads((tmp_path / "config.json").read_text())["config"]
    assert config["init"]["from"] == str(tmp_path / "pretrained") and config["data"]["name"] == "fashion_mnist"
    assert summary["test_accuracy"] >= info.expected_accuracy, (summary["test_accuracy"], info.accuracy)

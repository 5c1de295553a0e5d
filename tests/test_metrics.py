"""metrics.jsonl, TensorBoard event files (read back without TensorBoard: TFRecord framing and the
Event proto) and their agreement, on tiny real runs."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
import shutil
import struct

import numpy as np
import pytest

from jaxaccel.config import ConfigError
from conftest import train_tiny as _train


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


def test_tensorboard_events_hold_every_metrics_line(tiny_run):
    jsonl = _jsonl(tiny_run)
    assert {"train/loss", "train/accuracy", "test/accuracy", "test/sparsity/Dense_0/kernel"} <= set(jsonl)
    _assert_same(_scalars(tiny_run, purge=False), jsonl)


def test_tensorboard_shows_each_step_once_after_a_resume(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "checkpoints" / "50")  # as if killed after step 50's lines, before its checkpoint
    _train(run, "train.steps=50", "checkpoint.every_steps=30")
    raw, shown = _scalars(run, purge=False), _scalars(run, purge=True)
    assert [s for s, _ in raw["train/loss"]] == [10, 20, 30, 40, 50, 40, 50]
    _assert_same(shown, _jsonl(run))


def test_two_runs_in_one_second_in_one_process_keep_both_event_files(tmp_path, monkeypatch):
    """tensorboardX names an event file by the second, host and our suffix: a run resumed from Python
    within the second of its first start must add a file (sorted after the first), not overwrite it."""
    pytest.importorskip("tensorboardX")
    import time
    from jaxaccel.metrics import MetricsWriter
    monkeypatch.setattr(time, "time", lambda: 1796020715.5)
    path = tmp_path / "metrics.jsonl"
    first = MetricsWriter(path, tensorboard=True)
    first.write({"step": 10, "loss": 2.0})
    first.close()
    second = MetricsWriter(path, resume_step=10, tensorboard=True)
    second.write({"step": 20, "loss": 1.0})
    second.close()
    files = sorted(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 2 and all(".1796020715." in f.name for f in files)
    assert _scalars(tmp_path, purge=True)["train/loss"] == [(10, 2.0), (20, 1.0)]

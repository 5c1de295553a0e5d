"""Shared test setup: real data from ../shared/tfds, nothing downloaded, small shared runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ.setdefault("TFDS_DATA_DIR", str(SHARED / "tfds"))
# Tests never download: TFDS would try only for absent data, which the loader refuses first.
os.environ.setdefault("NO_GCE_CHECK", "true")


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m jaxaccel.run ARGS`` in a subprocess, as a user would call it."""
    return subprocess.run([sys.executable, "-m", "jaxaccel.run", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST as uint8 arrays (decoded once and cached by jaxaccel.data)."""
    from jaxaccel import data
    return data.load("mnist")


@pytest.fixture(scope="session")
def mlp_run(tmp_path_factory):
    """One short real LeNet-300-100 run shared by the tests that inspect a run's outputs."""
    import jaxaccel
    workdir = tmp_path_factory.mktemp("mlp_run")
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"), [
        f"workdir={workdir}", "train.steps=600", "checkpoint.every_steps=250", "train.log_every_steps=50"])
    summary = jaxaccel.train(cfg)
    return workdir, cfg, summary


# A tiny MLP (one hidden layer of 32) for runs whose outputs, not accuracy, are under test.
TINY = ["model.features=[32]", "train.batch_size=128", "train.log_every_steps=10"]


def train_tiny(workdir: Path, *overrides: str) -> dict:
    """Train the tiny MLP on MNIST into ``workdir`` with ``overrides``; returns the summary."""
    import jaxaccel
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"),
                                        [f"workdir={workdir}", *TINY, *overrides])
    return jaxaccel.train(cfg)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A 50-step tiny run with checkpoints at 30 and 50 (the model to fine-tune from, the events to read)."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    train_tiny(workdir, "train.steps=50", "checkpoint.every_steps=30")
    return workdir

"""Evaluation: padding weighs nothing, and any device count evaluates with the default batch sizes."""
from __future__ import annotations

import json

import numpy as np

from conftest import run_cli
from jaxaccel.evaluation import pad_to


def test_padding_reaches_the_multiple_with_weight_zero():
    inputs, labels = np.arange(10 * 3).reshape(10, 3).astype(np.uint8), np.arange(10, dtype=np.int32)
    padded, padded_labels, weights = pad_to(inputs, labels, 4)
    assert padded.shape == (12, 3) and padded_labels.shape == (12,)
    np.testing.assert_array_equal(padded[:10], inputs)
    np.testing.assert_array_equal(weights, [1] * 10 + [0, 0])


def test_sixteen_devices_run_the_default_batch_sizes(tmp_path):
    """mnist_mlp's batch (128) splits over 16 devices; its evaluation batch (1000) does not and is
    padded: every one of the 10,000 test examples is counted once."""
    out = run_cli("exp=mnist_mlp", f"workdir={tmp_path}", "model.features=[16]", "train.steps=20",
                  "parallel.check_replicas=false", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=16"})
    assert out.returncode == 0, out.stderr[-2000:]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["parallel"]["devices"] == 16 and config["config"]["train"]["eval_batch_size"] == 1000
    test = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "split" in l]
    correct = test[-1]["accuracy"] * 10000  # a whole number of the 10,000 examples, none counted twice
    assert 1000 < correct <= 10000 and abs(correct - round(correct)) < 1e-3

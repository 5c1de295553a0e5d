"""CIFAR-10, text and speech experiments end to end through the real loader, trainer and export, on
TFDS's own mock data (the real datasets are not on this machine and nothing may download them).

``tfds.testing.mock_data`` generates examples from each dataset's TFDS code; jaxaccel.data reads
them through the same ``tfds.data_source`` path as prepared data. Tiny widths and a few steps keep
the runs short: they check the pipeline and the options (sparsity, precision, parallelism), not
accuracy.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import jaxaccel
from jaxaccel import data, export, text
from tests.conftest import run_cli

tfds = pytest.importorskip("tensorflow_datasets")
N = 16  # examples per split in the mock


def _mock():
    return tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_CODE)


def _run(tmp_path_factory, exp: str, *overrides: str):
    workdir, empty = tmp_path_factory.mktemp(exp), tmp_path_factory.mktemp("no_data")
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get(exp), [
        f"workdir={workdir}", f"data.dir={empty}", f"data.cache_dir={empty}", "train.steps=2",
        "train.batch_size=8", "train.eval_batch_size=8", *overrides])
    with _mock():
        summary = jaxaccel.train(cfg)
    return workdir, empty, summary


@pytest.fixture(scope="module")
def cifar_sparse(tmp_path_factory):
    """ResNet (1 block per stage, 4 channels) with the experiment's crop+flip, pruned to 50%. (Its
    one-epoch warm-up would be the whole 2-step run, which is refused: one step here.)"""
    return _run(tmp_path_factory, "cifar10_resnet", "model.width=4", "model.depth=1", "optim.warmup=1",
                "sparsity.method=magnitude", "sparsity.target=0.5", "sparsity.schedule=one_shot")


@pytest.fixture(scope="module")
def text_bf16(tmp_path_factory):
    return _run(tmp_path_factory, "ag_news_text", "model.width=8", "model.depth=1", "model.vocab_size=512",
                "data.max_length=32", "precision.params=bfloat16", "precision.compute=bfloat16")


def test_cifar10_resnet_trains_pruned_with_augmentation_and_exports(cifar_sparse):
    workdir, empty, summary = cifar_sparse
    cfg = json.loads((workdir / "config.json").read_text())["config"]
    assert cfg["augment"]["crop_padding"] == 4 and cfg["augment"]["flip"] is True
    assert summary["steps"] == 2 and np.isfinite(summary["test_loss"])
    assert abs(summary["sparsity"] - 0.5) < 0.01 and summary["export_form"] == "sparse"
    model = export.load(workdir)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert model(images).shape == (4, 10)
    assert not any(empty.iterdir())  # mock data is never cached


def test_text_classifier_trains_in_bfloat16_and_exports_int32_inputs(text_bf16):
    workdir, _, summary = text_bf16
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and all(np.isfinite(l["loss"]) for l in lines)
    model = export.load(workdir)
    assert model.meta["input_dtype"] == "int32" and model.meta["image_shape"] == [32]
    tokens = text.tokenize(["stocks rally as markets rise"], 512, 32)
    assert model(tokens).shape == (1, 4)
    with pytest.raises(ValueError, match="int32 inputs of shape"):
        model(np.zeros((1, 32), np.uint8))


def test_loader_tokenizes_text_and_fixes_audio_length_from_mock_records(tmp_path):
    with _mock():
        ds = data.load("ag_news_subset", data_dir=str(tmp_path), decoding=data.Decoding(1000, 24))
        source = tfds.data_source("ag_news_subset", split="test", data_dir=str(tmp_path), download=False)
        records = [source[i] for i in range(N)]
        clips = data.load("speech_commands", data_dir=str(tmp_path))
    assert ds.num_classes == 4 and ds.test_inputs.dtype == np.int32 and ds.test_inputs.shape == (N, 24)
    # Feature keys in sorted order: description, then title.
    want = text.tokenize([f"{r['description']} {r['title']}" for r in records], 1000, 24)
    np.testing.assert_array_equal(ds.test_inputs, want)
    np.testing.assert_array_equal(ds.test_labels, [r["label"] for r in records])
    assert clips.num_classes == 12 and clips.train_inputs.dtype == np.int16
    assert clips.train_inputs.shape == (N, 16000)


def test_speech_kws_runs_under_pmap_on_two_devices(tmp_path):
    """The CLI entry point (run.main) in a fresh process with 2 emulated CPU devices, inside the mock."""
    code = textwrap.dedent(f"""
        import sys
        import tensorflow_datasets as tfds
        from jaxaccel import run
        with tfds.testing.mock_data(num_examples={N}, policy=tfds.testing.MockPolicy.USE_CODE):
            sys.exit(run.main(sys.argv[1:]))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code, "exp=speech_commands_kws", f"workdir={tmp_path / 'run'}",
                           f"data.dir={tmp_path}", "parallel.mode=pmap", "train.steps=2", "train.batch_size=8",
                           "train.eval_batch_size=8", "model.width=4", "model.depth=2"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["parallel"]["mode"] == "pmap" and record["parallel"]["devices"] == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["test_loss"])
    assert json.loads((tmp_path / "run" / "export" / "model.json").read_text())["input_dtype"] == "int16"


def test_absent_cifar10_exits_3_fast_naming_dataset_dir_and_fix(tmp_path):
    start = time.perf_counter()
    proc = run_cli("exp=cifar10_resnet", f"data.dir={tmp_path}", f"workdir={tmp_path / 'run'}")
    assert proc.returncode == 3, proc.stderr
    assert time.perf_counter() - start < 10
    assert "'cifar10'" in proc.stderr and str(tmp_path) in proc.stderr
    assert "tfds build cifar10" in proc.stderr and "jaxaccel[prepare]" in proc.stderr


@pytest.mark.parametrize("exp, override, message", [
    ("ag_news_text", "augment.flip=true", "leave the augment section off"),
    ("speech_commands_kws", "model.name=resnet", "model.name=resnet takes uint8 images"),
])
def test_a_model_or_augmentation_that_does_not_fit_the_data_is_a_config_error(tmp_path, exp, override, message):
    from jaxaccel.config import ConfigError
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get(exp), [
        f"workdir={tmp_path / 'run'}", f"data.dir={tmp_path}", override])
    with _mock(), pytest.raises(ConfigError, match=message):
        jaxaccel.train(cfg)

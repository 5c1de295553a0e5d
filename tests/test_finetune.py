"""Fine-tuning (init.from / include / freeze / pretrain) on tiny real runs, and
``fashion_mnist_finetune`` held to its docstring (its runtime is above the 20 s of
tests/test_accuracy.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import jaxaccel
from jaxaccel.config import ConfigError

from conftest import TINY, train_tiny as _train


def _params(run: Path) -> dict:
    return jaxaccel.export.load(run).params


def test_freeze_keeps_params_bit_identical_and_include_loads_only_matches(tiny_run, tmp_path):
    # Dense_0 is loaded and frozen; Dense_1 (the head) is not loaded, its kernel frozen at the fresh
    # init and its bias trained.
    _train(tmp_path, "train.steps=30", f"init.from={tiny_run}", "init.include=[^Dense_0/]",
           "init.freeze=[^Dense_0/,^Dense_1/kernel]")
    before, after = _params(tiny_run), _params(tmp_path)
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


# ---------------------------------------------------------------------------------------------
# TensorBoard event files, read back without TensorBoard: TFRecord framing + the Event proto.


def test_an_include_pattern_that_loads_nothing_is_a_config_error(tiny_run, tmp_path):
    # One of two patterns is a typo: the run stops naming it instead of leaving that layer fresh.
    with pytest.raises(ConfigError, match=r"init.include: '\^Dense_7/' matches no parameter; paths: Dense_0/bias"):
        _train(tmp_path, "train.steps=5", f"init.from={tiny_run}", "init.include=[^Dense_0/,^Dense_7/]")


def test_pretrain_must_name_a_registered_experiment(tmp_path):
    from jaxaccel import pipeline
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("fashion_mnist_finetune"),
                                        ["init.pretrain=mnist_mpl train.epochs=1"])
    with pytest.raises(ConfigError, match=r"init.pretrain='mnist_mpl train.epochs=1': unknown experiment 'mnist_mpl'\. Did you mean mnist_mlp"):
        pipeline.with_pretraining(cfg, tmp_path, print)
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


def test_init_from_says_why_each_tensor_starts_fresh(tmp_path):
    """Loaded: same path and shape. Fresh, each with its reason: not included, another shape there,
    not in the source, factorized there (the fix: model.ranks), and batch statistics whose layer's
    parameters were not loaded; the statistics of a loaded layer come with it."""
    from jaxaccel import export, finetune
    f32 = lambda *shape: np.full(shape, 2.0, np.float32)  # noqa: E731
    source = {"Dense_0": {"kernel": f32(4, 3), "bias": f32(3)}, "Dense_1": {"U": {"kernel": f32(3, 1)}},
              "Norm_0": {"scale": f32(3)}, "Norm_1": {"scale": f32(3)}}
    stats = {"batch_stats": {"Norm_0": {"mean": f32(3)}, "Norm_1": {"mean": f32(3)}}}
    export.save(tmp_path, source, model={"name": "mlp"}, num_classes=3, image_shape=(4,), model_state=stats)
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    params = {"Dense_0": {"kernel": zeros(4, 3), "bias": zeros(5)}, "Dense_1": {"kernel": zeros(3, 3)},
              "Dense_2": {"kernel": zeros(3, 3)}, "Norm_0": {"scale": zeros(3)}, "Norm_1": {"scale": zeros(3)}}
    state = {"batch_stats": {"Norm_0": {"mean": zeros(3)}, "Norm_1": {"mean": zeros(3)}}}
    said = []
    params, state = finetune.load_init_variables(str(tmp_path), ["^(?!Norm_1/)"], params, state, said.append)
    assert said == ["init.from: 3 tensors loaded; re-initialized: Dense_0/bias (3 there, 5 here); "
                    "Dense_1/kernel (factorized there: give model.ranks as the source's summary.json has them); "
                    "Dense_2/kernel (not in the source); Norm_1/scale (not in init.include); "
                    "batch_stats/Norm_1/mean (its layer's parameters are not loaded)"]
    loaded = {"Dense_0/kernel", "Norm_0/scale", "batch_stats/Norm_0/mean"}
    from jaxaccel import paths
    for name, leaf in paths.named_leaves({**params, **state}):
        np.testing.assert_array_equal(leaf, 2.0 if name in loaded else 0.0, err_msg=name)

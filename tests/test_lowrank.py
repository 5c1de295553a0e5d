"""Low-rank factorization (jaxaccel.lowrank): the factors against NumPy's SVD, ranks by energy, the
FLOP rule, the factorized models (Dense and conv layers, both conv lowerings) against their product
form, the state conversion, from-start training with its export, the config errors; and through
real runs (once the trainer runs surgeons), for a factored Dense layer and a factored convolution:
the change at its step, its export (int8 too), bitwise resume across it, FSDP on two devices."""
from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxaccel
from jaxaccel import durations, export, lowrank, surgery
from jaxaccel.surgeons import surgeons
from jaxaccel import step as step_lib
from jaxaccel.config import ConfigError, LowRankConfig, QuantConfig, model_config
from jaxaccel.models import build_model
from jaxaccel.models.layers import LowRankWarning, saves_flops
from jaxaccel.plan import Plan
from tests.conftest import ROOT, TINY, run_cli, train_tiny


def _with_spectrum(m: int, n: int, singular_values, seed: int = 0) -> np.ndarray:
    """An m x n float32 matrix with the given singular values (random orthonormal bases)."""
    rng = np.random.default_rng(seed)
    k = len(singular_values)
    left, _ = np.linalg.qr(rng.normal(size=(m, k)))
    right, _ = np.linalg.qr(rng.normal(size=(n, k)))
    return (left * np.asarray(singular_values)) @ right.T


def test_factors_are_numpys_best_rank_r_approximation():
    w = np.random.default_rng(1).normal(size=(40, 24)).astype(np.float32)
    left, s, right = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    for rank in (1, 5, 12):
        u, v = lowrank.factor(w, rank)
        assert u.shape == (40, rank) and v.shape == (rank, 24) and u.dtype == v.dtype == np.float32
        best = (left[:, :rank] * s[:rank]) @ right[:rank]
        np.testing.assert_allclose(u @ v, best, atol=1e-5)
        # Eckart-Young: the error is the energy of the dropped singular values.
        np.testing.assert_allclose(np.linalg.norm(w - u @ v), np.sqrt((s[rank:] ** 2).sum()), rtol=1e-4)
        # Split evenly: both factors carry sqrt(S) (u^T u = v v^T = diag(S_r)).
        np.testing.assert_allclose(u.T @ u, np.diag(s[:rank]), atol=1e-4)
        np.testing.assert_allclose(v @ v.T, np.diag(s[:rank]), atol=1e-4)


def test_a_conv_kernel_factors_as_its_matrix():
    kernel = np.random.default_rng(2).normal(size=(3, 3, 4, 16)).astype(np.float32)
    u, v = lowrank.factor(kernel, 6)
    assert u.shape == (3, 3, 4, 6) and v.shape == (1, 1, 6, 16)  # a conv with 6 outputs, then a 1x1 conv
    left, s, right = np.linalg.svd(kernel.reshape(36, 16).astype(np.float64), full_matrices=False)
    product = u.reshape(36, 6) @ v.reshape(6, 16)
    np.testing.assert_allclose(product, (left[:, :6] * s[:6]) @ right[:6], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(kernel.reshape(36, 16) - product), np.sqrt((s[6:] ** 2).sum()),
                               rtol=1e-4)
    np.testing.assert_allclose(lowrank.product_form({"Conv_0": {"U": {"kernel": u}, "V": {"kernel": v}}})
                               ["Conv_0"]["kernel"], product.reshape(3, 3, 4, 16), atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        lowrank.factor(kernel, 17)


@pytest.mark.parametrize("energy, rank", [(0.5, 1), (16 / 30, 1), (0.8, 2), (25 / 30, 2), (0.84, 3), (1.0, 4)])
def test_energy_rank_is_the_smallest_rank_keeping_that_energy(energy, rank):
    # Squares 16, 9, 4, 1 of 30: the first r keep 16/30, 25/30, 29/30, 30/30.
    assert lowrank.energy_rank([2.0, 4.0, 1.0, 3.0], energy) == rank
    w = _with_spectrum(20, 12, [4.0, 3.0, 2.0, 1.0])
    _, ranks, notes = lowrank.factor_params({"Dense_0": {"kernel": w, "bias": np.zeros(12)}},
                                            model_config(name="mlp", features=[]), LowRankConfig(energy=energy, at=1))
    assert ranks == {"Dense_0": rank}
    assert notes["energy_kept"]["Dense_0"] == pytest.approx([16, 25, 29, 30][rank - 1] / 30, rel=1e-6)


def test_a_layer_is_factored_only_when_that_saves_flops():
    assert saves_flops(784, 300, 216) and not saves_flops(784, 300, 217)  # 784*300/1084 = 216.97
    assert saves_flops(300, 100, 74) and not saves_flops(300, 100, 75)    # 75: exactly as many
    model = build_model(model_config(name="mlp", features=[32], ranks={"Dense_0": 8, "Dense_1": 8}), 10)
    with pytest.warns(LowRankWarning, match=r"Dense_1 \(32 x 10\) left dense: rank 8"):
        params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.uint8))["params"]
    assert jax.tree.map(jnp.shape, params) == {
        "Dense_0": {"U": {"kernel": (784, 8)}, "V": {"kernel": (8, 32), "bias": (32,)}},
        "Dense_1": {"kernel": (32, 10), "bias": (10,)}}


@pytest.fixture(scope="module")
def dense_state():
    """A dense MLP (64, 32) with trained-looking spectra, its inputs, and an Adam+cosine state."""
    model_cfg = model_config(name="mlp", features=[64, 32])
    images = jnp.asarray(np.random.default_rng(3).integers(0, 256, (16, 28, 28, 1)), jnp.uint8)
    params = build_model(model_cfg, 10).init(jax.random.key(0), images)["params"]
    tx = optax.adam(optax.cosine_decay_schedule(1e-3, 100))
    state = step_lib.TrainState.create(params, tx)
    # 7 steps taken: the schedule's count must survive the factorization.
    state = state.replace(step=jnp.asarray(7, jnp.int32), opt_state=jax.tree.map(
        lambda x: x + 7 if x.dtype == jnp.int32 else x, state.opt_state))
    return model_cfg, images, tx, state


def test_the_factorized_model_is_its_product_form(dense_state):
    model_cfg, images, tx, state = dense_state
    change = lowrank.LowRankSurgeon(LowRankConfig(rank=6, at=7)).operate(7, state, model_cfg, tx)
    assert change.model.ranks == {"Dense_0": 6, "Dense_1": 6, "Dense_2": 6}  # Dense_2 (32 x 10): 6 < 7.6 saves
    factored = build_model(change.model, 10).apply({"params": change.state.params}, images)
    product = build_model(model_cfg, 10).apply({"params": lowrank.product_form(change.state.params)}, images)
    np.testing.assert_allclose(factored, product, atol=2e-5)
    # ... and the product form is numpy's best rank-6 approximation of each trained kernel.
    for layer in ("Dense_0", "Dense_1", "Dense_2"):
        w = np.asarray(state.params[layer]["kernel"], np.float64)
        left, s, right = np.linalg.svd(w, full_matrices=False)
        np.testing.assert_allclose(lowrank.product_form(change.state.params)[layer]["kernel"],
                                   (left[:, :6] * s[:6]) @ right[:6], atol=1e-5)
        np.testing.assert_array_equal(change.state.params[layer]["V"]["bias"], state.params[layer]["bias"])


def test_the_state_conversion(dense_state):
    model_cfg, _, tx, state = dense_state
    surgeon = lowrank.LowRankSurgeon(LowRankConfig(rank=8, at=7))
    assert surgeon.points(100) == [7] and surgeon.points(7) == [] and not surgeon.due(6)
    assert surgeon.operate(6, state, model_cfg, tx) is None
    with pytest.warns(LowRankWarning, match="Dense_2 left dense"):
        change = surgeon.operate(7, state, model_cfg, tx)
    adam, schedule = change.state.opt_state
    assert int(adam.count) == 0 and all(not np.any(x) for x in jax.tree.leaves(adam.mu))  # re-initialised
    assert jax.tree.structure(adam.mu) == jax.tree.structure(change.state.params)
    assert int(schedule.count) == 7 and int(change.state.step) == 7  # the schedule goes on
    record = change.record
    assert record["kind"] == "lowrank" and record["ranks"] == {"Dense_0": 8, "Dense_1": 8}
    assert "Dense_2" in record["left_dense"]
    after = 8 * (784 + 64) + 64 + 8 * (64 + 32) + 32 + 32 * 10 + 10
    assert record["param_count"] == {"before": 784 * 64 + 64 + 64 * 32 + 32 + 330, "after": after}
    # Once factored, a layer is not factored again (a run resumed at the same step).
    assert surgeon.operate(7, change.state, change.model, tx) is None


def test_surgeons_come_from_the_resolved_config():
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"),
                                        ["lowrank.rank=40", "lowrank.at=2ep"])
    resolved = durations.resolve(cfg, steps_per_epoch=100, total_steps=1000)
    (found,) = surgeons(resolved)
    assert found.name == "lowrank" and found.points(1000) == [200]
    assert surgeons(jaxaccel.experiments.get("mnist_mlp")) == []


def test_the_cnns_factor_their_dense_layers():
    images = jnp.asarray(np.random.default_rng(4).integers(0, 256, (4, 28, 28, 1)), jnp.uint8)
    cfg = model_config(name="small_cnn", channels=[4], features=[32])
    assert cfg.kernel_names() == ["Conv_0/kernel", "Dense_0/kernel", "Dense_1/kernel"]
    params = build_model(cfg, 10).init(jax.random.key(1), images)["params"]
    tx = optax.sgd(0.1)
    change = lowrank.factorize(step_lib.TrainState.create(params, tx), cfg, tx,
                               LowRankConfig(rank=4, at=1, include=["Dense_0/kernel"]))
    assert change.model.ranks == {"Dense_0": 4} and change.state.params["Dense_0"]["U"]["kernel"].shape == (784, 4)  # 14 x 14 x 4 after the pool
    factored = build_model(change.model, 10).apply({"params": change.state.params}, images)
    product = build_model(cfg, 10).apply({"params": lowrank.product_form(change.state.params)}, images)
    np.testing.assert_allclose(factored, product, atol=2e-5)
    assert model_config(name="cnn").kernel_names() == ["Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel",
                                                       "Dense_1/kernel"]


# ---------------------------------------------------------------------------------------------
# Factorized convolutions: small_cnn channels [4, 8] (Conv_0: 9 x 4, factoring pays below rank
# 2.77; Conv_1: 36 x 8, below 5.54), features [16].

CONV_CNN = dict(name="small_cnn", channels=[4, 8], features=[16])


@pytest.mark.parametrize("conv", ["im2col", "xla"])
def test_a_factorized_conv_is_its_product_form(conv):
    """U reshaped to (kh*kw*cin, r) times V reshaped to (r, cout), as the plain conv's kernel,
    gives the factorized model's logits, lowered either way (the factors are lowered as the
    model's plain convs: no lax convolution under im2col)."""
    images = jnp.asarray(np.random.default_rng(6).integers(0, 256, (4, 28, 28, 1)), jnp.uint8)
    cfg = model_config(**CONV_CNN, conv=conv)
    params = build_model(cfg, 10).init(jax.random.key(2), images)["params"]
    tx = optax.sgd(0.1)
    change = lowrank.factorize(step_lib.TrainState.create(params, tx), cfg, tx,
                               LowRankConfig(rank={"Conv_0": 2, "Conv_1": 4}, at=1, include=["^Conv_"]))
    assert change.model.ranks == {"Conv_0": 2, "Conv_1": 4}
    factors = change.state.params
    assert jax.tree.map(jnp.shape, factors["Conv_1"]) == {"U": {"kernel": (3, 3, 4, 4)},
                                                          "V": {"kernel": (1, 1, 4, 8), "bias": (8,)}}
    dense = {**params}
    for layer, (cin, cout, rank) in {"Conv_0": (1, 4, 2), "Conv_1": (4, 8, 4)}.items():
        u = np.asarray(factors[layer]["U"]["kernel"], np.float64).reshape(9 * cin, rank)
        v = np.asarray(factors[layer]["V"]["kernel"], np.float64).reshape(rank, cout)
        dense[layer] = {"kernel": jnp.asarray((u @ v).reshape(3, 3, cin, cout), jnp.float32),
                        "bias": factors[layer]["V"]["bias"]}
        np.testing.assert_allclose(lowrank.product_form(factors)[layer]["kernel"], dense[layer]["kernel"], atol=1e-6)
    model = build_model(change.model, 10)
    factored = model.apply({"params": factors}, images)
    np.testing.assert_allclose(factored, build_model(cfg, 10).apply({"params": dense}, images), atol=2e-5)
    lowered = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, images))(factors))
    assert ("conv_general_dilated" in lowered) == (conv == "xla")
    # QAT regexes see each factor as a layer (<layer>/U, <layer>/V; the pair is no layer of its own).
    for include, quantized in ((["^Conv_1/U$"], True), (["^Conv_1/V$"], True), (["^Conv_1$"], False)):
        qat = build_model(change.model, 10, quant=QuantConfig(mode="qat", include=include, bits=4))
        unchanged = np.allclose(qat.apply({"params": factors}, images), factored, atol=1e-6)
        assert unchanged != quantized, include


def test_the_flax_example_cnn_factors_a_conv_and_a_dense_layer():
    images = jnp.asarray(np.random.default_rng(7).integers(0, 256, (4, 28, 28, 1)), jnp.uint8)
    cfg = model_config(name="cnn", widths=[4, 8, 16])
    params = build_model(cfg, 10).init(jax.random.key(3), images)["params"]
    tx = optax.sgd(0.1)
    change = lowrank.factorize(step_lib.TrainState.create(params, tx), cfg, tx,
                               LowRankConfig(rank=4, at=1, include=["^Conv_1/", "^Dense_0/"]))
    assert change.model.ranks == {"Conv_1": 4, "Dense_0": 4}
    assert change.state.params["Conv_1"]["V"]["kernel"].shape == (1, 1, 4, 8)
    assert change.state.params["Dense_0"]["U"]["kernel"].shape == (392, 4)
    factored = build_model(change.model, 10).apply({"params": change.state.params}, images)
    product = build_model(cfg, 10).apply({"params": lowrank.product_form(change.state.params)}, images)
    np.testing.assert_allclose(factored, product, atol=2e-5)


def test_a_conv_is_factored_only_when_that_saves_flops_and_only_when_selected():
    cfg = model_config(**CONV_CNN, ranks={"Conv_0": 3, "Conv_1": 5})
    with pytest.warns(LowRankWarning, match=r"Conv_0 \(9 x 4\) left dense: rank 3 would not save FLOPs"):
        params = build_model(cfg, 10).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.uint8))["params"]
    assert jax.tree.map(jnp.shape, params)["Conv_0"] == {"kernel": (3, 3, 1, 4), "bias": (4,)}
    assert jax.tree.map(jnp.shape, params)["Conv_1"] == {"U": {"kernel": (3, 3, 4, 5)},
                                                         "V": {"kernel": (1, 1, 5, 8), "bias": (8,)}}
    # The default include picks the Dense kernels only, as before convolutions could be factored.
    assert lowrank.from_start_model(model_config(**CONV_CNN), LowRankConfig(rank=4, from_start=True)).ranks == {
        "Dense_0": 4, "Dense_1": 4}
    chosen = lowrank.from_start_model(model_config(**CONV_CNN),
                                      LowRankConfig(rank=4, from_start=True, include=["Conv_1/kernel"]))
    assert chosen.ranks == {"Conv_1": 4}


def test_the_default_mlp_is_unchanged():
    images = jnp.zeros((2, 28, 28, 1), jnp.uint8)
    params = build_model(model_config(name="mlp"), 10).init(jax.random.key(5), images)["params"]
    assert jax.tree.map(jnp.shape, params) == {"Dense_0": {"kernel": (784, 300), "bias": (300,)},
                                               "Dense_1": {"kernel": (300, 100), "bias": (100,)},
                                               "Dense_2": {"kernel": (100, 10), "bias": (10,)}}


def test_a_factorized_export_stores_and_serves_the_factors(dense_state, tmp_path):
    model_cfg, images, tx, state = dense_state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LowRankWarning)
        change = lowrank.factorize(state, model_cfg, tx, LowRankConfig(rank=8, at=7))
    model = build_model(change.model, 10)
    expected = np.asarray(model.apply({"params": change.state.params}, images))
    common = dict(model=change.model.model_dump(mode="json"), num_classes=10, image_shape=(28, 28, 1))
    export.save(tmp_path / "float", change.state.params, **common)
    loaded = export.load(tmp_path / "float")
    assert loaded.params["Dense_0"]["U"]["kernel"].shape == (784, 8)
    np.testing.assert_allclose(loaded(np.asarray(images)), expected, atol=1e-6)
    with pytest.raises(ValueError, match="unfactorized"):
        loaded.sparse_mlp()
    quant = {"mode": "ptq", "bits": 8, "weights": "per_channel", "activations": "per_tensor", "include": [".*"],
             "start": 0}
    nbytes, form = export.save(tmp_path / "int8", change.state.params, quant=quant, **common)
    int8 = export.load(tmp_path / "int8")
    assert form == "int8" and int8.params["Dense_1"]["V"]["kernel"].dtype == np.int8
    assert int8.scales["Dense_0"]["U"]["kernel"].shape == (1, 8)
    # int8 factors + float32 biases and scales.
    assert nbytes == (lowrank.param_count(change.state.params) - 64 - 32 - 10) + 4 * (64 + 32 + 10) \
        + 4 * (8 + 64 + 8 + 32 + 10)
    assert np.mean(np.argmax(int8(np.asarray(images)), -1) == np.argmax(expected, -1)) >= 0.8


def test_factors_train_from_the_start(tmp_path):
    with pytest.warns(LowRankWarning, match="Dense_1"):
        summary = train_tiny(tmp_path, "lowrank.rank=8", "lowrank.from_start=true", "train.steps=30",
                             "quant.mode=ptq")
    # Dense_0 factored at rank 8 (784 -> 8 -> 32); Dense_1 (32 x 10) left dense.
    assert summary["param_count"] == 8 * 784 + 8 * 32 + 32 + 32 * 10 + 10
    assert summary["test_accuracy"] > 0.25  # chance is 0.1; the dense tiny MLP has 0.59 after 30 steps
    loaded = export.load(tmp_path)
    assert loaded.meta["model"]["ranks"] == {"Dense_0": 8, "Dense_1": 8}
    assert set(loaded.params["Dense_0"]) == {"U", "V"} and loaded.params["Dense_0"]["U"]["kernel"].dtype == np.int8


@pytest.mark.parametrize("overrides, message", [
    (["lowrank.rank=8"], "when to factor"),
    (["lowrank.at=3"], "needs the rank"),
    (["lowrank.rank=8", "lowrank.energy=0.9", "lowrank.at=3"], "set one of them"),
    (["lowrank.energy=0.9", "lowrank.from_start=true"], "singular values"),
    (["lowrank.rank=8", "lowrank.from_start=true", "lowrank.at=3"], "set one of them"),
    (["lowrank.energy=1.5", "lowrank.at=3"], "less than or equal to 1"),
    (["lowrank.rank=0", "lowrank.at=3"], "lowrank.rank"),
    (["lowrank.rank={Dense_0: 8}", "lowrank.at=3"], "gives no rank to Dense_1/kernel"),
    (["lowrank.rank=8", "lowrank.at=3", "lowrank.exclude=[Dense_7]"], "'Dense_7' matches none"),
    (["lowrank.rank=8", "lowrank.at=3", "lowrank.include=[bias]"], "select none"),
    (["lowrank.rank=8", "lowrank.at=3", "model.name=resnet"], "no factorized form"),
    (["lowrank.rank=8", "lowrank.at=3", "sparsity.method=magnitude", "sparsity.target=0.5"], "use one of them"),
    (["lowrank.rank=8", "lowrank.from_start=true", "model.ranks={Dense_0: 4}"], "set the rank in one place"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"), overrides)


def test_a_factorization_outside_the_run_is_refused():
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"), ["lowrank.rank=8", "lowrank.at=100%"])
    with pytest.raises(ConfigError, match=r"lowrank.at='100%' \(step 1000\) leaves no training after"):
        durations.resolve(cfg, steps_per_epoch=100, total_steps=1000)


def test_the_command_line_exits_2_on_a_lowrank_mistake(tmp_path):
    done = run_cli("exp=mnist_mlp", f"workdir={tmp_path}", "lowrank.rank=8")
    assert done.returncode == 2 and "lowrank.at" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------
# Through real runs: the trainer runs the surgeon (jaxaccel.surgery's wiring in jaxaccel.trainer).

RUN = ["train.steps=60", "checkpoint.every_steps=20", "checkpoint.max_to_keep=5", "lowrank.at=25"]
# Per factored layer: the run's overrides, the factored layer's U shape and the model's parameters after.
FACTORED = {
    "dense": (["lowrank.rank=8", "lowrank.include=[Dense_0/kernel]"], "Dense_0", (784, 8),
              8 * (784 + 32) + 32 + 32 * 10 + 10),
    # small_cnn [4, 8] / [16]: Conv_1 (3x3x4 -> 8) at rank 4 (a 3x3 conv to 4 channels, a 1x1 conv to 8).
    "conv": (["model.name=small_cnn", "model.channels=[4,8]", "model.features=[16]", "lowrank.rank=4",
              "lowrank.include=[Conv_1/kernel]"], "Conv_1", (3, 3, 4, 4),
             (9 * 4 + 4) + (36 * 4 + 4 * 8 + 8) + (7 * 7 * 8 * 16 + 16) + (16 * 10 + 10)),
}


@pytest.fixture(scope="module", params=sorted(FACTORED))
def factored_run(request, tmp_path_factory):
    """``(workdir, summary, overrides, layer, U shape, parameters)`` of a run factored at step 25."""
    overrides, layer, u_shape, count = FACTORED[request.param]
    workdir = tmp_path_factory.mktemp(f"factored_{request.param}")
    return workdir, train_tiny(workdir, *RUN, *overrides), [*RUN, *overrides], layer, u_shape, count


def _lines(workdir):
    return [{k: v for k, v in json.loads(line).items() if k not in ("train_seconds", "compile_seconds")}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_factors_at_its_step_and_exports_the_factors(factored_run, mnist):
    workdir, summary, _, layer, u_shape, count = factored_run
    (line,) = [l for l in _lines(workdir) if l.get("split") == "surgery"]
    assert line["step"] == 25 and line["surgery"]["ranks"] == {layer: u_shape[-1]}
    assert summary["model"]["ranks"] == {layer: u_shape[-1]}
    assert summary["param_count"] == count
    assert summary["compression"]["dense_fp32"]["bytes"] == 4 * summary["param_count"]
    # The compression report ran the int8 form of the factorized model (int8_apply on each factor).
    assert abs(summary["compression"]["int8"]["accuracy"] - summary["test_accuracy"]) < 0.05
    loaded = export.load(workdir)
    assert loaded.params[layer]["U"]["kernel"].shape == u_shape
    correct = np.sum(np.argmax(loaded(mnist.test_inputs), -1) == mnist.test_labels)
    assert correct == round(summary["test_accuracy"] * len(mnist.test_labels))


@pytest.mark.parametrize("factored_run", ["conv"], indirect=True)  # dense: test_a_factorized_export_stores_...
def test_an_int8_export_of_factorized_convs_serves_them(factored_run, mnist, tmp_path):
    workdir, summary, _, layer, _, _ = factored_run
    floats = export.load(workdir)
    quant = {"mode": "ptq", "bits": 8, "weights": "per_channel", "activations": "per_tensor", "include": [".*"],
             "start": 0}
    _, form = export.save(tmp_path, floats.params, quant=quant, model=summary["model"], num_classes=10,
                          image_shape=(28, 28, 1))
    int8 = export.load(tmp_path)
    assert form == "int8" and int8.params[layer]["U"]["kernel"].dtype == np.int8
    assert int8.params[layer]["V"]["kernel"].shape == (1, 1, 4, 8) and int8.params[layer]["V"]["kernel"].dtype == np.int8
    assert int8.scales[layer]["U"]["kernel"].shape == (1, 1, 1, 4)  # per output channel of each factor
    assert int8.scales[layer]["V"]["kernel"].shape == (1, 1, 1, 8)
    images = mnist.test_inputs[:1000]
    agree = np.mean(np.argmax(int8(images), -1) == np.argmax(floats(images), -1))
    assert agree >= 0.95


def test_resume_across_the_factorization_is_bitwise(factored_run, tmp_path):
    """Stopped at step 45 (after the change): resumed from the step-40 checkpoint, whose record
    names the factorized model; parameters and every metrics line equal the uninterrupted run's."""
    reference, _, overrides, *_ = factored_run
    original = Plan.next_boundary

    class Stop(Exception):
        pass

    def boundary(self, step):
        if step >= 45:
            raise Stop()
        return original(self, step)

    Plan.next_boundary = boundary
    try:
        with pytest.raises(Stop):
            train_tiny(tmp_path, *overrides)
    finally:
        Plan.next_boundary = original
    train_tiny(tmp_path, *overrides)
    for a, b in zip(jax.tree.leaves(export.load(tmp_path).params), jax.tree.leaves(export.load(reference).params)):
        np.testing.assert_array_equal(a, b)
    assert _lines(tmp_path) == _lines(reference)


@pytest.mark.parametrize("factored_run", ["dense"], indirect=True)
def test_fsdp_on_two_devices_factors_like_one(factored_run, tmp_path):
    reference, summary, overrides, *_ = factored_run
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = run_cli("exp=mnist_mlp", f"workdir={tmp_path}", *TINY, *overrides, "parallel.fsdp=true", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "summary.json").read_text())
    assert two["param_count"] == summary["param_count"] and two["model"]["ranks"] == {"Dense_0": 8}
    for a, b in zip(jax.tree.leaves(export.load(tmp_path).params), jax.tree.leaves(export.load(reference).params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

"""Exports: the compressed form of sparse and quantized runs is what loads, its size is what the
summary reports, and its predictions equal the trained model's; wrong inputs are refused."""
from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

import jaxaccel
from jaxaccel import export
from jaxaccel.checkpoint import Checkpointer
from jaxaccel.models import MLP, build_model

SHORT = ["train.steps=400", "sparsity.start=50", "sparsity.end=300", "sparsity.update_every=50",
         "model.features=[128,64]"]


@pytest.fixture(scope="module")
def sparse_qat_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sparse_qat")
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_sparse_qat"), [f"workdir={workdir}", *SHORT])
    return workdir, cfg, jaxaccel.train(cfg)


def test_sparse_int8_export_is_what_the_summary_says(sparse_qat_run):
    workdir, cfg, summary = sparse_qat_run
    model = export.load(workdir)
    assert model.form == "sparse+int8"
    with np.load(workdir / "export" / "compressed.npz") as npz:
        stored = sum(npz[k].nbytes for k in npz.files)
    assert summary["compressed_bytes"] == stored == summary["compression"]["sparse_int8"]["bytes"]
    assert summary["model_bytes"] / summary["compressed_bytes"] > 10
    kernels = [v for k, v in export.flatten_params(model.params).items() if k.endswith("kernel")]
    assert all(k.dtype == np.int8 for k in kernels)
    # Zero-preserving quantization: the int8 kernels are exactly as sparse as the float ones.
    zeros = sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels)
    assert zeros == pytest.approx(summary["sparsity"], abs=1e-6) and summary["sparsity"] >= 0.9 - 1e-6


def test_int8_export_predicts_like_the_fake_quant_model(sparse_qat_run, mnist):
    workdir, cfg, summary = sparse_qat_run
    with np.load(workdir / "export" / "params.npz") as npz:
        float_params = traverse_util.unflatten_dict({k: npz[k] for k in npz.files}, sep="/")
    qat_model = build_model(cfg.model, 10, None, cfg.quant)  # fake quantization, as trained
    images = mnist.test_inputs[:2000]
    fake = np.asarray(jax.jit(qat_model.apply)({"params": float_params}, images))
    real = export.load(workdir)(images)
    # int8 x int8 -> int32 accumulation equals fake quant up to float rounding of the rescale.
    assert np.mean(np.argmax(real, -1) == np.argmax(fake, -1)) > 0.998
    np.testing.assert_allclose(real, fake, atol=0.05 * np.abs(fake).max())


def test_sparse_export_round_trips_bitwise_and_the_sparse_path_agrees(tmp_path, mnist):
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_sparse"), [f"workdir={tmp_path}", *SHORT])
    summary = jaxaccel.train(cfg)
    model = export.load(tmp_path)
    assert model.form == "sparse" and summary["compressed_bytes"] < 0.25 * summary["model_bytes"]
    with np.load(tmp_path / "export" / "params.npz") as npz:
        dense = {k: npz[k] for k in npz.files}
    for key, value in export.flatten_params(model.params).items():
        np.testing.assert_array_equal(value, dense[key])  # compressed -> dense is exact
    images = mnist.test_inputs[:500]
    np.testing.assert_allclose(model.sparse_mlp()(images), model(images), rtol=1e-4, atol=1e-4)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last_eval = [l for l in lines if l.get("split") == "test"][-1]
    # Reported sparsity is counted from the parameters: compare with the zeros in the checkpointed export.
    kernels = [v for k, v in dense.items() if k.endswith("kernel")]
    assert last_eval["sparsity"] == sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        k = dense[f"{name}/kernel"]
        assert last_eval[f"sparsity/{name}/kernel"] == pytest.approx(np.mean(k == 0))


def test_dense_export_is_not_bigger_than_dense(mlp_run):
    workdir, cfg, summary = mlp_run
    assert export.load(workdir).form == "dense" and summary["compressed_bytes"] == summary["model_bytes"]


def test_export_predicts_what_the_trained_model_predicts(mlp_run, mnist):
    workdir, cfg, summary = mlp_run
    model = export.load(workdir)
    # The reference: the last checkpoint's params, restored by orbax, through the flax module.
    checkpointer = Checkpointer(workdir / "checkpoints", 2)
    restored = checkpointer.manager.restore(600, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    checkpointer.close()
    raw = restored["state"]["params"]
    images = mnist.test_inputs[:512]
    reference = np.asarray(jax.jit(MLP(features=(300, 100), num_classes=10).apply)({"params": raw}, images))
    got = model(images)
    # Same params, same XLA program shape: equal up to the last bits of fusion-order rounding.
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(reference, -1))
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(raw)):
        np.testing.assert_array_equal(a, np.asarray(b))
    accuracy = np.mean(np.argmax(model(mnist.test_inputs), -1) == mnist.test_labels)
    assert abs(accuracy - summary["test_accuracy"]) < 1e-6


def test_export_rejects_wrong_inputs(mlp_run):
    model = export.load(mlp_run[0])
    with pytest.raises(ValueError, match="uint8 images"):
        model(np.zeros((2, 28, 28, 1), np.float32))


def test_load_params_is_the_float_tree_of_any_export(sparse_qat_run, mlp_run):
    """load_params builds no model: the dense run's parameters as stored, and the int8 export's
    kernels dequantized (q * s), pruned zeros kept."""
    workdir, _, _ = mlp_run
    with np.load(workdir / "export" / "params.npz") as npz:
        stored = {k: npz[k] for k in npz.files}
    flat = export.flatten_params(export.load_params(workdir))
    assert flat.keys() == stored.keys() and all(np.array_equal(flat[k], stored[k]) for k in flat)
    qat_dir = sparse_qat_run[0]
    loaded = export.load(qat_dir)
    floats = export.flatten_params(export.load_params(qat_dir))
    for key, q in export.flatten_params(loaded.params).items():
        if key.endswith("kernel"):
            scale = export.flatten_params(loaded.scales)[key.rsplit("/", 1)[0] + "/kernel"]
            np.testing.assert_array_equal(floats[key], q.astype(np.float32) * scale)
            assert floats[key].dtype == np.float32 and np.array_equal(floats[key] == 0, q == 0)


@pytest.mark.parametrize("params, model, message", [
    ({"Dense_0": {0: np.zeros(2)}}, {"name": "mlp"}, "key 0"),
    ({"a/b": {"kernel": np.zeros(2)}}, {"name": "mlp"}, "key 'a/b'"),
    ({"Dense_0": {"kernel": "text"}}, {"name": "mlp"}, "not a numeric array"),
    ({"Dense_0": {"kernel": np.zeros(2)}}, {"name": "no_such_model"}, "load could not read it back"),
])
def test_save_refuses_what_load_could_not_read(tmp_path, params, model, message):
    with pytest.raises(ValueError, match=message):
        export.save(tmp_path / "export", params, model=model, num_classes=10, image_shape=(28, 28, 1))
    assert not (tmp_path / "export").exists()


def test_an_export_naming_an_import_path_is_never_imported_by_default(tmp_path):
    params = {"Dense_0": {"kernel": np.ones((784, 10), np.float32), "bias": np.zeros(10, np.float32)}}
    model = {"name": "no_such_package.net:Net", "kwargs": {}, "conv": "xla", "source": "import"}
    export.save(tmp_path, params, model=model, num_classes=10, image_shape=(28, 28, 1))
    with pytest.raises(ValueError, match="no_such_package.net:Net.*model=.*trust_import=True"):
        export.load(tmp_path)
    with pytest.raises(jaxaccel.config.ConfigError, match="cannot import no_such_package.net"):
        export.load(tmp_path, trust_import=True)  # only with consent is the import even tried
    assert export.flatten_params(export.load_params(tmp_path)).keys() == {"Dense_0/kernel", "Dense_0/bias"}
    # init.from reads an export's parameters without building its model either.
    from jaxaccel import finetune
    target = {"Dense_0": {"kernel": np.zeros((784, 10), np.float32), "bias": np.ones(12, np.float32)},
              "Dense_1": {"kernel": np.zeros((10, 10), np.float32)}}
    said = []
    loaded, state = finetune.load_init_variables(str(tmp_path), [".*"], target, {}, said.append)
    assert state == {}
    np.testing.assert_array_equal(loaded["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
    np.testing.assert_array_equal(loaded["Dense_0"]["bias"], np.ones(12))
    assert said == ["init.from: 1 tensors loaded; re-initialized: Dense_0/bias (10 there, 12 here); "
                    "Dense_1/kernel (not in the source)"]

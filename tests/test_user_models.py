"""Your own model: linen and NNX models this project does not define (tests/user_models.py), by
import path and by object, through training, sparsity, export, sweep and report."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxaccel
from jaxaccel import export, paths, report
from jaxaccel import precision as prec
from jaxaccel import step as step_lib
from jaxaccel.config import ConfigError, PrecisionConfig, model_config
from jaxaccel.models import ImportedModelConfig, UserModel, build_model
from tests import user_models as um
from tests.conftest import ROOT, run_cli

X = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1)), jnp.uint8)
# mnist_sparse's own schedule in fractions of the run; 300 steps need a shorter mask period than 100.
SHORT_SPARSE = ["train.steps=300", "sparsity.update_every=25", "train.log_every_steps=50"]


def _override(exp: str, *overrides: str):
    return jaxaccel.experiments.override(jaxaccel.experiments.get(exp), list(overrides))


def _correct(workdir: Path, model, mnist) -> int:
    """Test images the export at ``workdir``, served by ``model``, classifies right, in the run's
    evaluation batches (int8's per-tensor activation scales are taken over the batch)."""
    served = export.load(workdir, model=model)
    batch = 1000  # train.eval_batch_size
    logits = np.concatenate([served(mnist.test_inputs[i:i + batch]) for i in range(0, len(mnist.test_labels), batch)])
    return int(np.sum(np.argmax(logits, -1) == mnist.test_labels))


def _run_correct(summary: dict, mnist) -> int:
    """Test images the run's final evaluation classified right (its accuracy is a float32 mean)."""
    return round(summary["test_accuracy"] * len(mnist.test_labels))


# ---------------------------------------------------------------------------------------------
# The config: named by import path, imported only when the run is built.

def test_import_path_config_needs_no_import_and_replaces_the_experiments_model_fields():
    cfg = _override("mnist_sparse", "model.name=no_such_package.models:Net", "model.kwargs={width: 4}")
    assert isinstance(cfg.model, ImportedModelConfig) and cfg.model.kwargs == {"width": 4}
    assert "no_such_package" not in sys.modules
    assert cfg.to_dict()["model"] == {"name": "no_such_package.models:Net", "kwargs": {"width": 4}, "conv": "auto",
                                      "source": "import"}
    with pytest.raises(ConfigError, match="cannot import no_such_package.models"):
        build_model(cfg.model, 10)
    with pytest.raises(ConfigError, match="has no attribute 'Nope'"):
        build_model(model_config(name="tests.user_models:Nope"), 10)
    with pytest.raises(ConfigError, match="not a Flax linen or NNX module"):
        build_model(model_config(name="json:JSONDecoder"), 10)
    with pytest.raises(ConfigError, match="model.name"):
        _override("mnist_mlp", "model.name=foo:")


def test_cli_unknown_import_path_is_exit_2_in_one_line(tmp_path):
    result = run_cli("exp=mnist_mlp", "model.name=no_such_package.models:Net", f"workdir={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert "cannot import no_such_package.models" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# The adapter: inputs, parameters, state, conv lowering.

@pytest.mark.parametrize("target", [um.LinenCNN, um.make_cnn, um.NNXMLP, um.NNXCNN, um.LinenCNN(width=4)])
def test_adapter_matches_the_model_called_directly(target):
    model = UserModel(target, 10, conv="xla")
    variables = model.init(jax.random.key(0), X)
    got = model.apply(variables, X)
    floats = X.astype(jnp.float32) / 255.0  # images reach the model as float32 in [0, 1]
    if model.kind == "linen":
        want = model.module.apply(variables, floats)
    else:
        names = paths.leaf_paths(variables["params"])
        assert all(re.fullmatch(r"[\w/]+/(kernel|bias)", n) for n in names), names
        net = target(rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(net)
        nnx.replace_by_pure_dict(state, variables["params"])
        want = nnx.merge(graphdef, state)(floats)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [um.LinenCNN, um.NNXCNN])
def test_im2col_lowering_reaches_plain_convs(target):
    """conv=im2col (the CPU default) routes a user's plain Conv through our im2col lowering: no
    conv_general_dilated is left in the jaxpr, forward or backward, and the logits agree."""
    im2col, xla = UserModel(target, 10, conv="im2col"), UserModel(target, 10, conv="xla")
    variables = im2col.init(jax.random.key(0), X)
    loss = lambda model: lambda p: model.apply({**variables, "params": p}, X).sum()
    assert "conv_general_dilated" in str(jax.make_jaxpr(jax.grad(loss(xla)))(variables["params"]))
    assert "conv_general_dilated" not in str(jax.make_jaxpr(jax.grad(loss(im2col)))(variables["params"]))
    np.testing.assert_allclose(im2col.apply(variables, X), xla.apply(variables, X), rtol=1e-4, atol=1e-4)


def test_raw_inputs_on_request():
    model = UserModel(um.RawInputs, 10)
    assert model.raw_inputs
    model.apply(model.init(jax.random.key(0), X), X)  # the model asserts it got uint8


@pytest.mark.parametrize("target", [um.LinenBNNet, um.NNXBNMLP])
def test_batch_statistics_train_and_a_skipped_step_leaves_them_alone(target):
    """Train mode (dropout, batch statistics updated) exactly when the step passes its key; a
    non-finite step (the guard skips it) leaves the statistics bit-identical."""
    model = UserModel(target, 10)
    variables = dict(model.init(jax.random.key(0), X))
    params = variables.pop("params")
    assert variables, "batch statistics are model state"
    tx = prec.with_precision(optax.sgd(0.1), PrecisionConfig())  # the non-finite guard
    state = step_lib.TrainState.create(params, tx, model_state=variables)
    labels = jnp.arange(4, dtype=jnp.int32)

    def step(scale):
        def apply(v, inputs, **kw):
            return model.apply(v, (inputs.astype(jnp.float32) * scale).astype(jnp.float32), **kw)
        apply.takes_rng = True
        return jax.jit(functools.partial(step_lib.train_step, apply_fn=apply, tx=tx))

    good, _ = step(1.0)(state, {"inputs": X, "labels": labels}, jax.random.key(1))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(good.model_state),
                                                        jax.tree.leaves(state.model_state)))
    again, _ = step(1.0)(state, {"inputs": X, "labels": labels}, jax.random.key(2))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(again.params))]
    assert any(changed), "dropout masks follow the step key"
    skipped, measured = step(jnp.nan)(good, {"inputs": X, "labels": labels}, jax.random.key(1))
    assert float(measured["skipped_steps"]) == 1
    for a, b in zip(jax.tree.leaves(skipped.model_state), jax.tree.leaves(good.model_state)):
        np.testing.assert_array_equal(a, b)
    evaluated = model.apply({"params": good.params, **good.model_state}, X)
    assert evaluated.shape == (4, 10) and np.isfinite(evaluated).all()
    np.testing.assert_array_equal(evaluated, model.apply({"params": good.params, **good.model_state}, X))


# ---------------------------------------------------------------------------------------------
# Whole runs: the targets, short.

@pytest.fixture(scope="module")
def linen_sparse(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("linen_sparse")
    result = run_cli("exp=mnist_sparse", "model.name=tests.user_models:LinenCNN", *SHORT_SPARSE, f"workdir={workdir}",
                     env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, json.loads((workdir / "summary.json").read_text())


def test_linen_cnn_by_import_path_prunes_to_the_target(linen_sparse, mnist):
    """Short exp=mnist_sparse (300 steps; the README gives the full run): 90% exact zeros in the
    kernels, a trained model, named right in config.json and model.json."""
    workdir, summary = linen_sparse
    assert abs(summary["sparsity"] - 0.9) < 1e-3
    params = dict(np.load(workdir / "export" / "params.npz"))
    kernels = {k: v for k, v in params.items() if k.endswith("kernel")}
    assert set(kernels) == {"Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel", "Dense_1/kernel"}
    zeros = sum(int(np.sum(v == 0)) for v in kernels.values()) / sum(v.size for v in kernels.values())
    assert zeros == pytest.approx(summary["sparsity"], abs=1e-6)
    # 300 steps of a narrow CNN pruned to 90% by step 192 (the full run's target, >= 97%, is the README's).
    assert summary["test_accuracy"] >= 0.6
    config = json.loads((workdir / "config.json").read_text())
    assert config["config"]["model"]["name"] == "tests.user_models:LinenCNN"
    meta = json.loads((workdir / "export" / "model.json").read_text())
    assert meta["model"] == {"name": "tests.user_models:LinenCNN", "kwargs": {}, "conv": "im2col", "source": "import"}


def test_export_of_a_user_model_loads_only_with_the_model_or_consent(linen_sparse, mnist):
    workdir, summary = linen_sparse
    before = set(sys.modules)
    with pytest.raises(ValueError, match="pass the model to serve it with.*trust_import=True"):
        export.load(workdir)
    assert {m for m in set(sys.modules) - before if not m.startswith("jaxaccel.")} == set()  # nothing it names
    # The export predicts exactly what the trained model did in the run's final evaluation ...
    assert _correct(workdir, um.LinenCNN, mnist) == _run_correct(summary, mnist)
    # ... and what the plain linen model computes on the exported parameters.
    params = export.load_params(workdir)
    images = mnist.test_inputs[:500]
    want = um.LinenCNN().apply({"params": params}, images.astype(np.float32) / 255.0)
    np.testing.assert_allclose(export.load(workdir, model=um.LinenCNN)(images), want, rtol=1e-5, atol=1e-5)
    trusted = export.load(workdir, trust_import=True)
    np.testing.assert_array_equal(trusted(images), export.load(workdir, model=um.LinenCNN())(images))


@pytest.mark.parametrize("exp", ["mnist_bf16", "mnist_qat"])
@pytest.mark.parametrize("target", [um.LinenCNN, um.NNXMLP])
def test_precision_and_qat_experiments_run_user_models_end_to_end(exp, target, tmp_path, mnist):
    summary = jaxaccel.train(_override(exp, "train.steps=60", "train.log_every_steps=30", f"workdir={tmp_path}"),
                             model=target)
    assert summary["steps"] == 60 and summary["test_accuracy"] > 0.5
    meta = json.loads((tmp_path / "export" / "model.json").read_text())
    assert meta["model"]["name"] == f"tests.user_models:{target.__qualname__}"
    assert meta["model"]["source"] == "object"
    served = export.load(tmp_path, model=target)
    assert served.form.endswith("int8") == (exp == "mnist_qat")
    # The export classifies the test set as the run's final evaluation did: bf16 through the
    # intercepted policy; int8 through int8_apply (linen) or the QAT forward on the int8 weights (NNX).
    assert _correct(tmp_path, target, mnist) == _run_correct(summary, mnist)


def test_nnx_model_with_batch_statistics_resumes_bitwise(tmp_path, mnist):
    """BatchNorm statistics are trained, evaluated, checkpointed and exported; a run resumed from
    its middle checkpoint ends bitwise equal to the uninterrupted one."""
    args = ["train.steps=40", "checkpoint.every_steps=20", "train.log_every_steps=10", f"workdir={tmp_path}"]
    summary = jaxaccel.train(_override("mnist_mlp", *args), model=um.NNXBNMLP)
    first = {name: dict(np.load(tmp_path / "export" / name)) for name in ("params.npz", "state.npz")}
    assert {k.split("/")[0] for k in first["state.npz"]} == {"state"}
    assert _correct(tmp_path, um.NNXBNMLP, mnist) == _run_correct(summary, mnist)
    shutil.rmtree(tmp_path / "checkpoints" / "40")
    (tmp_path / "summary.json").unlink()
    shutil.rmtree(tmp_path / "export")
    jaxaccel.train(_override("mnist_mlp", *args), model=um.NNXBNMLP)
    for name, arrays in first.items():
        again = dict(np.load(tmp_path / "export" / name))
        assert again.keys() == arrays.keys()
        for key in arrays:
            np.testing.assert_array_equal(again[key], arrays[key])


def test_nm_sparsity_names_a_layer_too_small_and_refuses_an_inexact_axis(tmp_path):
    """exp=mnist_nm on user models: the first conv (1 input channel < m=4) is named in the run's
    output and left dense; a hidden width of 10 (not a multiple of 4) is refused, exit 2."""
    short = ["sparsity.start=5", "train.steps=10", "train.log_every_steps=5"]
    result = run_cli("exp=mnist_nm", "model.name=tests.user_models:NNXCNN", *short, f"workdir={tmp_path / 'cnn'}",
                     env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: conv/kernel [3, 3, 1, 4]: its contracting axis has 1 < m=4 entries, so 2:4 leaves it dense" \
        in result.stdout
    summary = json.loads((tmp_path / "cnn" / "summary.json").read_text())
    dense_conv = 36 / (36 + 784 * 10)  # the conv's share of the prunable weights stays dense
    assert summary["sparsity"] == pytest.approx(0.5 * (1 - dense_conv), abs=1e-6)
    result = run_cli("exp=mnist_nm", "model.name=tests.user_models:NNXMLP", "model.kwargs={hidden: 10}", *short,
                     f"workdir={tmp_path / 'mlp'}", env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "layers/1/kernel [10, 10]: contracting axis of 10, not a multiple of m=4, would get sparsity 0.4000" \
        in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Sweep and report.

def test_sweep_and_report_with_an_nnx_model_show_target_and_dense_reference(tmp_path):
    env = {"PYTHONPATH": str(ROOT)}
    code = subprocess.run([sys.executable, "-m", "jaxaccel.sweep", "exp=mnist_sparse",
                           "model.name=tests.user_models:NNXMLP", "sparsity.target=[0.9]", *SHORT_SPARSE,
                           "--out", str(tmp_path / "sweep")], env={**os.environ, **env}, capture_output=True, text=True)
    assert code.returncode == 0, code.stdout[-2000:] + code.stderr[-2000:]
    dense = run_cli("exp=mnist_sparse", "model.name=tests.user_models:NNXMLP", "sparsity.method=none",
                    "train.steps=300", "train.log_every_steps=50", f"workdir={tmp_path / 'dense'}", env=env)
    assert dense.returncode == 0, dense.stderr[-2000:]
    assert report.main([str(tmp_path / "sweep"), str(tmp_path / "dense"), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith(("| sweep/", "| dense "))}
    dense_row, sparse_row = rows["dense"], rows["sweep/sparsity.target=0.9"]
    assert dense_row[3] == "0.00% (target 0.00%)" and dense_row[-1] == "dense reference"
    assert dense_row[-2] == sparse_row[-2] == "tests.user_models:NNXMLP"
    assert re.fullmatch(r"(89\.9\d|90\.0\d)% \(target 90\.00%\)", sparse_row[3]), sparse_row[3]
    accuracy = {name: json.loads((tmp_path / path / "summary.json").read_text())["test_accuracy"]
                for name, path in (("dense", "dense"), ("sparse", "sweep/sparsity.target=0.9"))}
    delta = 100 * (accuracy["sparse"] - accuracy["dense"])
    assert sparse_row[-1] == f"{delta:+.2f} pts vs dense ({100 * accuracy['dense']:.2f}%)"


# ---------------------------------------------------------------------------------------------
# The README's section, run exactly as written.

def _readme_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(python|sh)\n(.*?)```", section, re.S)


def test_readme_your_own_model_examples_run_as_written(tmp_path, monkeypatch):
    blocks = _readme_blocks()
    assert [kind for kind, _ in blocks] == ["python", "python", "python", "sh"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    models = blocks[0][1]
    assert models.startswith("# my_models.py")
    (tmp_path / "my_models.py").write_text(models)
    for _, code in blocks[1:3]:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "runs" / "my_cnn" / "summary.json").exists()
    assert (tmp_path / "runs" / "my_mlp" / "summary.json").exists()
    for line in blocks[3][1].strip().splitlines():
        result = subprocess.run(line, shell=True, capture_output=True, text=True, cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "cli_mlp" / "summary.json").read_text())
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_im2col_convolutions_of_a_user_cnn_get_the_precision_policy():
    """On CPU a user's nn.Conv runs as our im2col dot: under a bf16 policy that dot must be the
    intercepted mixed-precision one (bf16 inputs, f32 accumulation), like the Dense layers'."""
    from jaxaccel.config import PrecisionConfig
    from jaxaccel.models import UserModel
    from tests.user_models import LinenCNN
    model = UserModel(LinenCNN, 10, conv="im2col", precision=PrecisionConfig(params="bfloat16", compute="bfloat16"))
    x = jnp.zeros((2, 28, 28, 1), jnp.uint8)
    jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x))(model.init(jax.random.key(0), x), x))
    dots = jaxpr.count("dot_general[")
    assert dots == 3  # the second conv's patches and the two Dense layers (the 9-long first conv: no dot)
    assert jaxpr.count("preferred_element_type=float32") == dots

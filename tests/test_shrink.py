"""Channel shrinking (jaxaccel.sparsity.shrink): the narrow model computes what the masked wide
one computes, the state is cut element by element as NumPy cuts it, and the config refuses what
cannot shrink."""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaccel import config as config_lib
from jaxaccel import sparsity
from jaxaccel import step as step_lib
from jaxaccel.models import build_model
from jaxaccel.schema import ConfigError
from jaxaccel.sparsity import shrink as shrink_lib
from jaxaccel.surgeons import surgeons

START = 2  # the one-shot mask update happens in step 2 (after two dense steps)
MODELS = {
    "mlp": {"name": "mlp", "features": [24, 12]},
    "cnn": {"name": "cnn", "conv": "im2col", "widths": [8, 12, 16]},
    "small_cnn": {"name": "small_cnn", "channels": [6, 8], "features": [10], "pool": "max", "crop": 20},
}
TARGET = 0.5


def make_cfg(model: dict, **sparse) -> config_lib.Config:
    logits = f"Dense_{len(model.get('features', [0]))}"
    fields = dict(method="magnitude", structure="channel", target=TARGET, schedule="one_shot", start=START,
                  shrink=True, exclude=[f"^{logits}/"])
    return config_lib.Config(model=model, sparsity={**fields, **sparse})


@functools.lru_cache(maxsize=None)
def trained(name: str, after: int = 0):
    """(cfg, wide state at the end, wide state before the mask update, model, tx) after START + 1 +
    ``after`` Adam steps on real MNIST batches (different per step)."""
    cfg = make_cfg(MODELS[name])
    model = build_model(cfg.model, 10)
    tx = sparsity.make_sparsity(cfg.sparsity, optax.adam(3e-2), 100)
    x, y = batches()
    state = step_lib.TrainState.create(model.init(jax.random.key(0), x[0])["params"], tx)
    before = None
    for i in range(START + 1 + after):
        if i == START:
            before = state
        state = adam_step(model, tx, state, x[i % len(x)], y[i % len(y)])
    return cfg, state, before, model, tx


def batches():
    from jaxaccel import data
    mnist = data.load("mnist")
    x = mnist.train_inputs[:6 * 32].reshape(6, 32, *mnist.train_inputs.shape[1:])
    return jnp.asarray(x), jnp.asarray(mnist.train_labels[:6 * 32].reshape(6, 32))


def adam_step(model, tx, state, x, y):
    """One step; a model with batch statistics runs in training mode and updates them."""
    mutable = list(state.model_state)

    def loss(p):
        out = model.apply({"params": p, **state.model_state}, x, **({"mutable": mutable} if mutable else {}))
        logits, model_state = out if mutable else (out, state.model_state)
        return jnp.mean(step_lib.cross_entropy(logits, y)), model_state
    grads, model_state = jax.grad(loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                         model_state=dict(model_state))


def numpy_kept(kernel: np.ndarray) -> np.ndarray:
    """The units a channel mask at TARGET keeps: the round((1 - s) * out) largest column L2 norms."""
    norms = np.sqrt((np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1]) ** 2).sum(0))
    return np.sort(np.argsort(-norms, kind="stable")[:round((1 - TARGET) * kernel.shape[-1])])


def numpy_cut(leaf: np.ndarray, path: str, kept: dict, chain, widths: dict) -> np.ndarray:
    """``leaf`` (shaped as the param at ``path``) cut with NumPy indexing; ``widths``: the wide layers' units."""
    leaf = np.asarray(leaf)
    layer, kind = path.split("/")
    names = [n for n, _ in chain]
    i = names.index(layer)
    if layer in kept:  # its own units
        leaf = leaf[..., kept[layer]]
    if kind == "kernel" and i and names[i - 1] in kept:  # the units of the layer it reads
        prev = names[i - 1]
        if chain[i - 1][1] == "conv" and chain[i][1] == "dense":  # rows (h, w, c) after a flatten
            leaf = leaf.reshape(-1, widths[prev], leaf.shape[-1])[:, kept[prev]].reshape(-1, leaf.shape[-1])
        else:
            leaf = leaf[..., kept[prev], :]
    return leaf


@pytest.mark.parametrize("name", list(MODELS))
def test_shrunk_model_computes_the_masked_wide_models_logits(name, mnist):
    cfg, state, before, model, tx = trained(name)
    change = shrink_lib.shrink(state, cfg.model, tx)
    narrow = build_model(change.model, 10)
    x = jnp.asarray(mnist.test_inputs[:256])
    wide_logits = model.apply({"params": state.params}, x)
    np.testing.assert_allclose(narrow.apply({"params": change.state.params}, x), wide_logits, rtol=1e-5, atol=1e-5)
    # The pruned units are the ones NumPy ranks lowest by the L2 norm of their column at the update.
    chain = shrink_lib.layer_chain(cfg.model)
    for layer, _ in chain[:-1]:
        kept = numpy_kept(before.params[layer]["kernel"])
        assert change.record["widths"][layer] == kept.size
        kept_by_shrink = shrink_lib.kept_units(sparsity.find_masks(state.opt_state), shrink_lib.unit_groups(cfg.model))
        assert np.array_equal(kept_by_shrink[layer], kept)
        # and they were exact zeros, bias included
        wide = np.asarray(state.params[layer]["kernel"])
        dead = np.setdiff1d(np.arange(wide.shape[-1]), kept)
        assert not wide[..., dead].any() and not np.asarray(state.params[layer]["bias"])[dead].any()
    widths = [change.record["widths"][n] for n, _ in chain[:-1]]
    assert widths == (change.model.widths if name == "cnn" else [*getattr(change.model, "channels", []),
                                                                 *change.model.features])


@pytest.mark.parametrize("name", list(MODELS))
def test_every_param_shaped_optimizer_leaf_is_cut_as_numpy_cuts_it(name):
    cfg, state, _, _, tx = trained(name)
    chain = shrink_lib.layer_chain(cfg.model)
    masks = sparsity.find_masks(state.opt_state)
    kept = shrink_lib.kept_units(masks, shrink_lib.unit_groups(cfg.model))
    widths = {n: state.params[n]["kernel"].shape[-1] for n, _ in chain}
    change = shrink_lib.shrink(state, cfg.model, tx)
    adam = state.opt_state.inner_state[0]
    new = change.state.opt_state
    for tree, new_tree in ((adam.mu, new.inner_state[0].mu), (adam.nu, new.inner_state[0].nu),
                           (state.params, change.state.params), (masks, new.masks)):
        for layer, _ in chain:
            for kind in ("kernel", "bias"):
                if tree[layer][kind] is None:
                    assert new_tree[layer][kind] is None
                    continue
                want = numpy_cut(tree[layer][kind], f"{layer}/{kind}", kept, chain, widths)
                np.testing.assert_array_equal(np.asarray(new_tree[layer][kind]), want)
    assert int(new.count) == int(state.opt_state.count) and int(new.inner_state[0].count) == int(adam.count)
    # Every kept mask entry is True in the layers the mask update pruned: the masks lost what they removed.
    for layer, _ in chain[:-1]:
        assert np.asarray(new.masks[layer]["kernel"]).all()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_training_on_after_a_shrink_follows_the_wide_masked_run(name):
    """Two more Adam steps on the narrow model = the same steps on the wide masked model, cut."""
    cfg, state, _, model, tx = trained(name)
    _, wide_later, _, _, _ = trained(name, after=2)
    change = shrink_lib.shrink(state, cfg.model, tx)
    narrow, narrow_state = build_model(change.model, 10), change.state
    x, y = batches()
    for i in range(START + 1, START + 3):
        narrow_state = adam_step(narrow, tx, narrow_state, x[i % len(x)], y[i % len(y)])
    cut = shrink_lib.shrink(wide_later, cfg.model, tx).state.params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), narrow_state.params, cut)


def test_min_width_keeps_pruned_units_and_no_change_is_none():
    cfg, state, before, _, tx = trained("mlp")
    change = shrink_lib.shrink(state, cfg.model, tx, min_width=20)  # 24 -> 12 kept, filled up to 20
    assert change.record["widths"] == {"Dense_0": 20, "Dense_1": 12}
    kept = numpy_kept(before.params["Dense_0"]["kernel"])
    dead = np.setdiff1d(np.arange(24), kept)
    assert np.array_equal(shrink_lib.kept_units(sparsity.find_masks(state.opt_state),
                                                shrink_lib.unit_groups(cfg.model), 20)["Dense_0"],
                          np.sort(np.concatenate([kept, dead[:8]])))
    # Before the mask update nothing is pruned; after a shrink nothing more is.
    assert shrink_lib.shrink(before, cfg.model, tx) is None
    full = shrink_lib.shrink(state, cfg.model, tx)
    assert shrink_lib.shrink(full.state, full.model, tx) is None


def test_gradual_pruning_shrinks_at_every_update_to_the_schedules_widths():
    """Polynomial schedule (updates in steps 1, 3, 5): each update prunes the fraction of the shrunk
    layer that leaves round((1 - r(t) s) * original) units, and the surgeon shrinks after each."""
    cfg = make_cfg(MODELS["mlp"], schedule="polynomial", start=1, end=5, update_every=2)
    [surgeon] = surgeons(cfg)
    model_cfg, model = cfg.model, build_model(cfg.model, 10)
    tx = sparsity.make_sparsity(cfg.sparsity, optax.adam(3e-2), 100)
    x, y = batches()
    state = step_lib.TrainState.create(model.init(jax.random.key(0), x[0])["params"], tx)
    widths = []
    for i in range(6):
        state = adam_step(model, tx, state, x[i], y[i])
        if surgeon.due(i + 1) and (change := shrink_lib.shrink(state, model_cfg, tx)) is not None:
            model_cfg, state, model = change.model, change.state, build_model(change.model, 10)
            widths.append((i + 1, list(model_cfg.features)))
    assert surgeon.points(6) == [2, 4, 6]
    r = [1 - (1 - (t - 1) / 4) ** 3 for t in (3, 5)]  # the cubic schedule's fraction at steps 3 and 5
    want = [[round((1 - q * TARGET) * w) for w in (24, 12)] for q in r]
    assert widths == [(4, want[0]), (6, want[1])] == [(4, [14, 7]), (6, [12, 6])]


def test_surgeon_points_follow_the_mask_update_and_it_is_registered():
    cfg = make_cfg(MODELS["cnn"], start=20)  # as resolved: durations are steps
    [surgeon] = surgeons(cfg)
    assert surgeon.name == "shrink" and surgeon.points(200) == [21]  # the update in step 20, after it
    assert surgeon.due(21) and not surgeon.due(20)
    assert surgeons(config_lib.Config(model=MODELS["mlp"])) == []


def test_default_cnn_widths_are_the_flax_example():
    params = build_model(config_lib.Config(model={"name": "cnn"}).model, 10).init(
        jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.uint8))["params"]
    assert jax.tree.map(jnp.shape, params) == {
        "Conv_0": {"kernel": (3, 3, 1, 32), "bias": (32,)}, "Conv_1": {"kernel": (3, 3, 32, 64), "bias": (64,)},
        "Dense_0": {"kernel": (3136, 256), "bias": (256,)}, "Dense_1": {"kernel": (256, 10), "bias": (10,)}}


@pytest.mark.parametrize("fields, message", [
    (dict(structure="unstructured"), "shrink removes whole output units: it needs structure=channel"),
    (dict(schedule="polynomial", end=8, update_every=2, distribution="erk"),
     "shrink with schedule=polynomial needs distribution=uniform"),
    (dict(shrink=False, min_width=4), "min_width does nothing without shrink"),
    (dict(threshold=0.01), "shrink with a threshold"),
])
def test_config_refuses_what_cannot_shrink(fields, message):
    with pytest.raises(ValueError, match=message):
        make_cfg(MODELS["mlp"], **fields)


def test_models_that_cannot_shrink_and_the_logits_layer_are_config_errors():
    with pytest.raises(ConfigError, match="sparsity.shrink works for model.name in mlp, cnn, small_cnn, resnet, "
                                         "not text_cnn"):
        surgeons(config_lib.Config(model={"name": "text_cnn"}, data={"name": "ag_news_subset"}, sparsity=dict(
            method="magnitude", structure="channel", target=0.5, schedule="one_shot", shrink=True)))
    with pytest.raises(ConfigError, match="add 'Dense_2/kernel' to sparsity.exclude"):
        surgeons(make_cfg(MODELS["mlp"], exclude=[]))


# --- resnet (norm=batch): each block's first conv and its norm shrink, the residual stream never ---

RESNET = {"name": "resnet", "width": 4, "depth": 1, "norm": "batch"}
INNER = "_Conv_0/kernel$"  # the blocks' first convs, not the stem Conv_0


def resnet_cfg(**fields) -> config_lib.Config:
    sparse = dict(method="magnitude", structure="channel", target=TARGET, schedule="one_shot", start=START,
                  shrink=True, include=[INNER])
    return config_lib.Config(model=RESNET, sparsity={**sparse, **fields})


@functools.lru_cache(maxsize=None)
def trained_resnet():
    """(cfg, wide state after START + 3 steps in training mode (the mask update in step START, the
    running statistics of 5 batches), wide state before the update, model, tx)."""
    cfg = resnet_cfg()
    model = build_model(cfg.model, 10)
    tx = sparsity.make_sparsity(cfg.sparsity, optax.adam(3e-2), 100, norms=cfg.model.unit_norms())
    x, y = batches()
    variables = dict(model.init(jax.random.key(0), x[0]))
    state = step_lib.TrainState.create(variables.pop("params"), tx, model_state=variables)
    step = jax.jit(functools.partial(adam_step, model, tx))
    before = None
    for i in range(START + 3):
        if i == START:
            before = jax.device_get(state)
        state = step(state, x[i], y[i])
    return cfg, jax.device_get(state), before, model, tx


BLOCKS = ["Stage0_Block0", "Stage1_Block0", "Stage2_Block0"]


def numpy_resnet_cut(leaf: np.ndarray, path: str, kept: dict) -> np.ndarray:
    """``leaf`` at ``path`` (a param, or a batch statistic) cut with NumPy indexing: a block's
    first conv and its norm keep their kept units, its second conv reads only those."""
    leaf = np.asarray(leaf)
    layer = path.split("/")[0]
    for block in BLOCKS:
        idx = kept[f"{block}_Conv_0"]
        if layer in (f"{block}_Conv_0", f"{block}_Norm_0"):
            return leaf[..., idx]
        if layer == f"{block}_Conv_1":
            return leaf[..., idx, :]
    return leaf


def test_shrunk_resnet_computes_the_masked_wide_logits_in_eval_and_train_mode(mnist):
    from jaxaccel import paths
    cfg, state, before, model, tx = trained_resnet()
    change = shrink_lib.shrink(state, cfg.model, tx)
    assert change.model.inner == [2, 4, 8] and change.model.width == 4
    narrow = build_model(change.model, 10)
    wide_vars = {"params": state.params, **state.model_state}
    narrow_vars = {"params": change.state.params, **change.state.model_state}
    # The running statistics are real ones (5 batches), not the initial zeros and ones.
    assert np.abs(np.asarray(state.model_state["batch_stats"]["Stage1_Block0_Norm_0"]["mean"])).max() > 1e-3
    x = jnp.asarray(mnist.test_inputs[:256])
    np.testing.assert_allclose(narrow.apply(narrow_vars, x), model.apply(wide_vars, x), rtol=1e-5, atol=1e-5)
    # Training mode: same logits from this batch's statistics, and the same running statistics, cut.
    wide_logits, wide_stats = model.apply(wide_vars, x, mutable=["batch_stats"])
    narrow_logits, narrow_stats = narrow.apply(narrow_vars, x, mutable=["batch_stats"])
    np.testing.assert_allclose(narrow_logits, wide_logits, rtol=1e-5, atol=1e-5)
    kept = shrink_lib.kept_units(sparsity.find_masks(state.opt_state), shrink_lib.unit_groups(cfg.model))
    narrow_stats = dict(paths.named_leaves(narrow_stats["batch_stats"]))
    assert len(narrow_stats) == 14
    for path, leaf in paths.named_leaves(wide_stats["batch_stats"]):
        np.testing.assert_allclose(narrow_stats[path],
                                   numpy_resnet_cut(leaf, path, kept), rtol=1e-5, atol=1e-6)
    # The pruned units: the lowest column L2 norms at the update; kernel and norm exactly 0.
    for block in BLOCKS:
        conv, norm = f"{block}_Conv_0", f"{block}_Norm_0"
        assert np.array_equal(kept[conv], numpy_kept(before.params[conv]["kernel"]))
        dead = np.setdiff1d(np.arange(state.params[conv]["kernel"].shape[-1]), kept[conv])
        for leaf in (state.params[conv]["kernel"], state.params[norm]["scale"], state.params[norm]["bias"]):
            assert not np.asarray(leaf)[..., dead].any()


def test_resnet_state_is_cut_as_numpy_cuts_it():
    from jaxaccel import paths
    cfg, state, _, _, tx = trained_resnet()
    masks = sparsity.find_masks(state.opt_state)
    kept = shrink_lib.kept_units(masks, shrink_lib.unit_groups(cfg.model))
    change = shrink_lib.shrink(state, cfg.model, tx)
    adam, new = state.opt_state.inner_state[0], change.state.opt_state
    pairs = [(state.params, change.state.params), (adam.mu, new.inner_state[0].mu), (adam.nu, new.inner_state[0].nu),
             (masks, new.masks), (state.model_state["batch_stats"], change.state.model_state["batch_stats"])]
    for tree, new_tree in pairs:
        old, cut = dict(paths.named_leaves(tree)), dict(paths.named_leaves(new_tree))
        assert old.keys() == cut.keys()
        for path, leaf in old.items():
            np.testing.assert_array_equal(np.asarray(cut[path]), numpy_resnet_cut(leaf, path, kept))
    # The masks of the blocks' first convs and their norms, and nothing else (the residual stream).
    assert sorted(p for p, _ in paths.named_leaves(masks)) == sorted(
        f"{b}_{leaf}" for b in BLOCKS for leaf in ("Conv_0/kernel", "Norm_0/bias", "Norm_0/scale"))
    assert change.state.model_state["batch_stats"]["Stage2_Block0_Norm_0"]["var"].shape == (8,)


def test_resnet_refusals_name_the_fix():
    with pytest.raises(ConfigError, match="needs model.norm=batch"):
        surgeons(config_lib.Config(model={**RESNET, "norm": "group"}, sparsity=resnet_cfg().sparsity.model_dump()))
    residual = ", ".join(["Conv_0/kernel", "Stage0_Block0_Conv_1/kernel", "Stage1_Block0_Conv_1/kernel",
                          "Stage2_Block0_Conv_1/kernel", "Stage1_Block0_Shortcut/kernel",
                          "Stage2_Block0_Shortcut/kernel", "Dense_0/kernel"])
    with pytest.raises(ConfigError, match=re.escape(f"sparsity.include selects {residual}: the residual stream")):
        surgeons(resnet_cfg(include=["kernel$"]))
    with pytest.raises(ConfigError, match=re.escape("sparsity.include selects Stage1_Block0_Shortcut/kernel:")):
        surgeons(resnet_cfg(include=[INNER, "Stage1_Block0_Shortcut"]))
    assert [s.name for s in surgeons(resnet_cfg())] == ["shrink"]
    with pytest.raises(ValueError, match=r"model.inner has 2 widths; it needs one per residual block, "
                                         r"3 \* model.depth = 3"):
        config_lib.Config(model={**RESNET, "inner": [2, 4]})
    with pytest.raises(ValueError, match=r"\[12\] do not divide; use model.norm=batch"):
        config_lib.Config(model={**RESNET, "norm": "group", "inner": [4, 12, 16]})


# --- through real runs (needs the trainer's surgery wiring: helper `surgery`'s jaxaccel/surgery.py) ---

# The tiny MLP (hidden 32) pruned to 16 units in step 24 and shrunk after it (a group boundary at 25).
RUN = ["exp=mnist_mlp_shrink", "model.features=[32]", "train.batch_size=128", "train.log_every_steps=10",
       "train.steps=60", "checkpoint.every_steps=20", "checkpoint.max_to_keep=5", "sparsity.start=24",
       "sparsity.target=0.5", "sparsity.exclude=['^Dense_1/']"]


def _run_cli(workdir, *args, env=None, run=tuple(RUN)):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-m", "jaxaccel.run", f"workdir={workdir}", *run, *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def shrunk_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("shrunk")
    result = _run_cli(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def _lines(workdir):
    import json
    return [{k: v for k, v in json.loads(line).items() if k not in ("train_seconds", "compile_seconds")}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_shrinks_after_the_mask_update_and_exports_the_narrow_model(shrunk_run, mnist):
    import json

    from jaxaccel import export
    workdir, result = shrunk_run
    assert "step 25: model changed" in result.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["model"]["features"] == [16]
    [change] = [line for line in _lines(workdir) if "surgery" in line]
    assert change["step"] == 25 and change["surgery"]["widths"] == {"Dense_0": 16}
    model = export.load(workdir)
    assert model.params["Dense_0"]["kernel"].shape == (784, 16) and model.params["Dense_1"]["kernel"].shape == (16, 10)
    logits = np.asarray(model(mnist.test_inputs[:500]))
    assert abs((logits.argmax(-1) == mnist.test_labels[:500]).mean() - summary["test_accuracy"]) < 0.05


def test_killed_right_after_the_shrink_resumes_bitwise(shrunk_run, tmp_path):
    """SIGKILL just after the shrink (before a checkpoint of the narrow model): run again, it resumes
    from step 20, shrinks again at 25 and ends bitwise equal to the uninterrupted run."""
    from jaxaccel import export
    reference, _ = shrunk_run
    result = _run_cli(tmp_path, env={"JAXACCEL_FAULT": "surgery@25"})
    assert result.returncode == -9, result.stderr[-3000:]
    result = _run_cli(tmp_path)
    assert result.returncode == 0 and "resuming from checkpoint step 20" in result.stdout, result.stderr[-3000:]
    for a, b in zip(jax.tree.leaves(export.load(tmp_path).params), jax.tree.leaves(export.load(reference).params)):
        np.testing.assert_array_equal(a, b)
    assert _lines(tmp_path) == _lines(reference)


def test_shrink_under_four_devices_matches_one(shrunk_run, tmp_path):
    import json

    from jaxaccel import export
    reference, _ = shrunk_run
    result = _run_cli(tmp_path, "parallel.fsdp=true",
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and "step 25: model changed" in result.stdout, result.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["model"]["features"] == [16]
    for a, b in zip(jax.tree.leaves(export.load(tmp_path).params), jax.tree.leaves(export.load(reference).params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [["precision.params=bfloat16", "precision.compute=bfloat16"], ["quant.mode=qat"]],
                         ids=["bf16", "qat"])
def test_shrink_with_bf16_and_with_qat(options, tmp_path, mnist):
    import json

    from jaxaccel import export
    result = _run_cli(tmp_path, *options)
    assert result.returncode == 0 and "step 25: model changed" in result.stdout, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"]["features"] == [16] and summary["test_accuracy"] > 0.8
    model = export.load(tmp_path)
    assert model.params["Dense_0"]["kernel"].shape == (784, 16)
    logits = np.asarray(model(mnist.test_inputs[:500]))
    assert abs((logits.argmax(-1) == mnist.test_labels[:500]).mean() - summary["test_accuracy"]) < 0.05


def test_fine_tuning_from_a_run_shrinks(shrunk_run, tmp_path):
    """init.from the shrunk MNIST run (hidden 16): its Dense_0 is loaded, the head starts fresh on
    Fashion-MNIST, and the fine-tuning run prunes half the units and shrinks to 8."""
    import json
    workdir, _ = shrunk_run
    run = ["exp=fashion_mnist_finetune", f"init.from={workdir}", "model.features=[16]", "init.include=['^Dense_0/']",
           "train.steps=30", "train.batch_size=128", "train.log_every_steps=10", "sparsity.method=magnitude",
           "sparsity.structure=channel", "sparsity.target=0.5", "sparsity.schedule=one_shot", "sparsity.start=10",
           "sparsity.shrink=true", "sparsity.exclude=['^Dense_1/']"]
    result = _run_cli(tmp_path, run=run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "init.from: 2 tensors loaded; re-initialized: Dense_1/bias, Dense_1/kernel (not in init.include)" \
           in result.stdout
    assert "step 11: model changed" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"]["features"] == [8] and summary["experiment"] == "fashion_mnist_finetune"
    assert not (tmp_path / "pretrained").exists()  # init.from given: nothing pretrained


# The tiny resnet with batch norm: the blocks' first convs pruned to half in step 12, shrunk after it.
RESNET_RUN = ["exp=mnist_mlp_shrink", "model.name=resnet", "model.width=4", "model.depth=1", "model.norm=batch",
              "train.batch_size=32", "train.steps=40", "train.log_every_steps=10", "checkpoint.every_steps=10",
              "checkpoint.max_to_keep=5", "sparsity.start=12", "sparsity.target=0.5",
              f"sparsity.include=['{INNER}']", "sparsity.exclude=[]"]


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("resnet")
    result = _run_cli(workdir, run=RESNET_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_resnet_run_shrinks_and_resumes_bitwise_after_a_kill_at_a_later_checkpoint(resnet_run, tmp_path, mnist):
    """The run shrinks at 13; SIGKILL while the checkpoint of step 30 is written: run again, it
    resumes from the narrow model's checkpoint and ends bitwise equal, batch statistics included."""
    import json

    from jaxaccel import export
    reference, result = resnet_run
    assert "step 13: model changed" in result.stdout
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["model"]["inner"] == [2, 4, 8] and summary["model"]["norm"] == "batch"
    # The export and the compression report use the running statistics (else apply would fail).
    assert summary["compression"]["dense_fp32"]["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-3)
    model = export.load(reference)
    assert model.model_state["batch_stats"]["Stage2_Block0_Norm_0"]["mean"].shape == (8,)
    logits = np.asarray(model(mnist.test_inputs))
    assert (logits.argmax(-1) == mnist.test_labels).mean() == pytest.approx(summary["test_accuracy"], abs=1e-3)

    killed = _run_cli(tmp_path, run=RESNET_RUN, env={"JAXACCEL_FAULT": "save@30"})
    assert killed.returncode == -9 and "step 13: model changed" in killed.stdout, killed.stderr[-3000:]
    resumed = _run_cli(tmp_path, run=RESNET_RUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(re.search(r"resuming from checkpoint step (\d+)", resumed.stdout).group(1))
    assert step in (20, 30) and "model changed" not in resumed.stdout
    again = export.load(tmp_path)
    for a, b in zip(jax.tree.leaves((again.params, again.model_state)),
                    jax.tree.leaves((model.params, model.model_state))):
        np.testing.assert_array_equal(a, b)
    assert _lines(tmp_path) == _lines(reference)


def test_fine_tuning_from_the_batch_norm_resnet_loads_its_running_statistics(resnet_run, tmp_path):
    """init.from the shrunk resnet (its widths given): the run starts from the export's parameters
    and batch statistics; from its checkpoint, a layer left out of init.include starts fresh whole."""
    from jaxaccel import experiments, export, finetune, paths
    from jaxaccel import setup as setup_lib
    from jaxaccel.checkpoint import Checkpointer

    reference, _ = resnet_run
    source = export.load(reference)
    overrides = [o for o in RESNET_RUN if not o.startswith("exp=")]
    cfg = experiments.override(experiments.get("mnist_mlp_shrink"), [
        *overrides, f"workdir={tmp_path}", f"init.from={reference / 'export'}", "model.inner=[2,4,8]"])
    messages = []
    setup = setup_lib.build(cfg)
    checkpointer = Checkpointer(tmp_path / "checkpoints", 2)
    state, step, _ = setup_lib.initial_state(setup, checkpointer, messages.append)
    checkpointer.close()
    assert step == 0 and not messages  # nothing re-initialized
    started = dict(paths.named_leaves(state.variables()))
    for name, leaf in paths.named_leaves({"params": source.params, **source.model_state}):
        np.testing.assert_array_equal(np.asarray(started[name]), leaf, err_msg=name)

    narrow = build_model(config_lib.Config(model={**RESNET, "inner": [2, 4, 8]}).model, 10)
    fresh = dict(narrow.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1), jnp.uint8)))
    fresh_params = fresh.pop("params")
    params, model_state = finetune.load_init_variables(str(reference / "checkpoints"), ["^(?!Stage2_Block0_Norm_0/)"],
                                                       fresh_params, fresh, messages.append)
    norm = "Stage2_Block0_Norm_0"
    assert messages == [f"init.from: {len(jax.tree.leaves((fresh_params, fresh))) - 4} tensors loaded; re-initialized: "
                        f"{norm}/bias, {norm}/scale (not in init.include); batch_stats/{norm}/mean, "
                        f"batch_stats/{norm}/var (its layer's parameters are not loaded)"]
    stats = model_state["batch_stats"]
    np.testing.assert_array_equal(stats[norm]["mean"], np.zeros(8))
    np.testing.assert_array_equal(stats[norm]["var"], np.ones(8))
    np.testing.assert_array_equal(stats["Stage1_Block0_Norm_0"]["var"],
                                  source.model_state["batch_stats"]["Stage1_Block0_Norm_0"]["var"])


def test_resnet_shrink_under_four_devices_matches_one(resnet_run, tmp_path):
    """Data parallel over 4 emulated devices: batch norm's statistics are of the global batch (jit
    over sharded data), so the same channels are cut and parameters and running statistics equal one
    device's up to float summation order (amplified over 40 Adam steps to ~1e-3 of values ~1;
    statistics of per-device batches of 8 would differ by ~0.1)."""
    import json

    from jaxaccel import export
    reference, _ = resnet_run
    result = _run_cli(tmp_path, run=RESNET_RUN,
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and "step 13: model changed" in result.stdout, result.stderr[-3000:]
    assert "on 4 cpu device(s)" in result.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["model"]["inner"] == [2, 4, 8]
    ours, theirs = export.load(tmp_path), export.load(reference)
    for a, b in zip(jax.tree.leaves((ours.params, ours.model_state)), jax.tree.leaves((theirs.params, theirs.model_state))):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=3e-3)
    losses = [[line["loss"] for line in _lines(run) if "loss" in line and "split" not in line]
              for run in (tmp_path, reference)]
    np.testing.assert_allclose(*losses, rtol=1e-3)

"""Channel shrinking (jaxaccel.sparsity.shrink): the narrow model computes what the masked wide
one computes, the state is cut element by element as NumPy cuts it, and the config refuses what
cannot shrink."""
from __future__ import annotations

import functools

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
    def loss(p):
        return jnp.mean(step_lib.cross_entropy(model.apply({"params": p}, x), y))
    grads = jax.grad(loss)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


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
        assert np.array_equal(shrink_lib.kept_units(sparsity.find_masks(state.opt_state), chain)[layer], kept)
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
    kept = shrink_lib.kept_units(masks, chain)
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
                                                shrink_lib.layer_chain(cfg.model), 20)["Dense_0"],
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
    with pytest.raises(ConfigError, match="sparsity.shrink works for model.name in mlp, cnn, small_cnn, not resnet"):
        surgeons(config_lib.Config(model={"name": "resnet"}, sparsity=dict(
            method="magnitude", structure="channel", target=0.5, schedule="one_shot", shrink=True)))
    with pytest.raises(ConfigError, match="add 'Dense_2/kernel' to sparsity.exclude"):
        surgeons(make_cfg(MODELS["mlp"], exclude=[]))


# --- through real runs (needs the trainer's surgery wiring: helper `surgery`'s jaxaccel/surgery.py) ---

# The tiny MLP (hidden 32) pruned to 16 units in step 24 and shrunk after it (a group boundary at 25).
RUN = ["exp=mnist_mlp_shrink", "model.features=[32]", "train.batch_size=128", "train.log_every_steps=10",
       "train.steps=60", "checkpoint.every_steps=20", "checkpoint.max_to_keep=5", "sparsity.start=24",
       "sparsity.target=0.5", "sparsity.exclude=['^Dense_1/']"]


def _run_cli(workdir, *args, env=None):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-m", "jaxaccel.run", f"workdir={workdir}", *RUN, *args],
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

"""Network slimming (units ranked by their normalization's |scale|, L1 on the scales) and the
early-bird ticket (channel masks drawn once they stop changing), issue 19."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaccel import sparsity as sp
from jaxaccel.config import sparsity_config
from jaxaccel.schema import ConfigError

RNG = np.random.default_rng(7)
# Two layers, each followed by a normalization, and a logits layer (excluded) without one.
PARAMS = {"Conv_0": {"kernel": RNG.normal(size=(3, 3, 2, 6)), "bias": RNG.normal(size=6)},
          "BatchNorm_0": {"scale": RNG.permutation(np.linspace(-1.5, 1.5, 6)), "bias": RNG.normal(size=6)},
          "Dense_0": {"kernel": RNG.normal(size=(4, 10)), "bias": RNG.normal(size=10)},
          "BatchNorm_1": {"scale": RNG.permutation(np.linspace(0.1, 2.0, 10)), "bias": RNG.normal(size=10)},
          "Dense_1": {"kernel": RNG.normal(size=(10, 3)), "bias": RNG.normal(size=3)}}
PARAMS = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), PARAMS)
NORMS = {"Conv_0": "BatchNorm_0", "Dense_0": "BatchNorm_1"}
SLIM = dict(method="magnitude", structure="channel", importance="norm_scale", exclude=["^Dense_1/"])


def numpy_unit_mask(scale, sparsity):
    """Units kept at ``sparsity``: the round((1 - s) * n) largest |scale| (no ties here)."""
    scale = np.abs(np.asarray(scale))
    keep = np.zeros(scale.size, bool)
    keep[np.argsort(-scale, kind="stable")[:int(round((1 - sparsity) * scale.size))]] = True
    return keep


def updates(tx, params_at, steps, state=None):
    """The state after each of ``steps`` updates; update ``t`` sees ``params_at(t)`` (the
    importances it ranks) and zero gradients under sgd(0), so only the masks act."""
    update = jax.jit(tx.update)
    state = jax.jit(tx.init)(params_at(0)) if state is None else state
    out = []
    for t in steps:
        params = params_at(t)
        _, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
        out.append(state)
    return out


# --- importance=norm_scale ---------------------------------------------------------------------

def test_norm_scale_masks_prune_the_smallest_scales_element_by_element():
    cfg = sparsity_config(**SLIM, target=0.5, schedule="polynomial", start=0, end=2, update_every=2)
    tx = sp.make_sparsity(cfg, optax.sgd(0.0), 10, norms=NORMS)
    first = updates(tx, lambda t: PARAMS, [0, 1])[-1]
    assert all(np.all(np.asarray(m)) for m in jax.tree.leaves(first.masks))  # the cubic starts at 0
    state = updates(tx, lambda t: PARAMS, [2], state=first)[-1]
    for layer, norm in NORMS.items():
        mask = np.asarray(state.masks[layer]["kernel"])
        want = numpy_unit_mask(PARAMS[norm]["scale"], 0.5)
        np.testing.assert_array_equal(mask, np.broadcast_to(want, mask.shape))
    assert state.masks["Dense_1"]["kernel"] is None

    # Gradual: at 1/4 then 1/2 of the units, a unit pruned first is not revived by a large scale.
    cfg = sparsity_config(**SLIM, target=0.5, schedule="polynomial", start=0, end=4, update_every=2, power=1.0)
    tx = sp.make_sparsity(cfg, optax.sgd(0.0), 10, norms=NORMS)
    scale = np.asarray(PARAMS["BatchNorm_1"]["scale"])
    first_pruned = ~numpy_unit_mask(scale, 0.25)
    revived = scale.copy()
    revived[np.flatnonzero(first_pruned)[0]] = 10.0  # would rank first if it were scored again
    late = {**PARAMS, "BatchNorm_1": {**PARAMS["BatchNorm_1"], "scale": jnp.asarray(revived)}}
    states = updates(tx, lambda t: PARAMS if t < 3 else late, range(5))
    np.testing.assert_array_equal(np.asarray(states[2].masks["Dense_0"]["kernel"][0]), ~first_pruned)
    kept = np.asarray(states[4].masks["Dense_0"]["kernel"][0])
    scored = np.where(first_pruned, 0.0, np.abs(revived))
    np.testing.assert_array_equal(kept, numpy_unit_mask(scored, 0.5))
    assert not kept[np.flatnonzero(first_pruned)[0]]


def test_a_selected_layer_without_a_normalization_is_refused_naming_it_and_the_fix():
    cfg = sparsity_config(**{**SLIM, "exclude": []}, target=0.5, schedule="one_shot")
    tx = sp.make_sparsity(cfg, optax.sgd(0.1), 10, norms=NORMS)
    with pytest.raises(ConfigError, match=r"Dense_1/kernel\. Put them in sparsity.exclude"):
        tx.init(PARAMS)


def test_l1_with_norm_scale_penalises_the_paired_scales_value_and_gradient():
    cfg = sparsity_config(**SLIM, target=0.5, schedule="one_shot", penalty="l1", penalty_weight=1e-4)
    value, grads = jax.value_and_grad(lambda p: sp.penalty(cfg, p, NORMS))(PARAMS)
    scales = [np.asarray(PARAMS[n]["scale"], np.float64) for n in ("BatchNorm_0", "BatchNorm_1")]
    np.testing.assert_allclose(float(value), 1e-4 * sum(np.abs(s).sum() for s in scales), rtol=1e-6)
    for norm, s in zip(("BatchNorm_0", "BatchNorm_1"), scales):
        np.testing.assert_allclose(np.asarray(grads[norm]["scale"]), 1e-4 * np.sign(s), rtol=1e-6)
    others = [np.asarray(g) for path, g in jax.tree_util.tree_leaves_with_path(grads)
              if "scale" not in jax.tree_util.keystr(path)]
    assert all(np.all(g == 0) for g in others), "the kernels are not penalised"
    # weight_norm keeps the kernel L1 (the selected kernels only).
    plain = sparsity_config(method="magnitude", structure="channel", exclude=["^Dense_1/"], target=0.5,
                            schedule="one_shot", penalty="l1", penalty_weight=1e-4)
    want = 1e-4 * sum(np.abs(np.asarray(PARAMS[n]["kernel"], np.float64)).sum() for n in ("Conv_0", "Dense_0"))
    np.testing.assert_allclose(float(sp.penalty(plain, PARAMS, NORMS)), want, rtol=1e-6)


@pytest.mark.parametrize("fields, message", [
    (dict(structure="unstructured", importance="norm_scale"), "norm_scale .* needs structure=channel"),
    (dict(method="saliency", structure="channel", importance="norm_scale"),
     "norm_scale is the score of method=magnitude"),
    (dict(structure="block", schedule="early_bird"), "early_bird .* needs structure=channel"),
    (dict(method="random", structure="channel", schedule="early_bird"), "method=random"),
    (dict(structure="channel", early_bird_window=3), "early_bird_window does nothing for schedule=polynomial"),
])
def test_config_refuses_combinations_that_mean_nothing(fields, message):
    with pytest.raises(ValueError, match=message):
        sparsity_config(**{"method": "magnitude", "target": 0.5, **fields})


def test_a_window_that_cannot_fit_between_start_and_end_is_refused_at_run_time():
    cfg = sparsity_config(method="magnitude", structure="channel", target=0.5, schedule="early_bird",
                          start=0, end=40, update_every=10)  # checks 0, 10, .., 40: five, the window needs six
    with pytest.raises(ConfigError, match="checks 5 time.*early_bird_window=5 needs 6"):
        cfg.check_run(100, cfg)
    sparsity_config(**{**cfg.model_dump(), "early_bird_window": 4}).check_run(100, cfg)


# --- the early-bird trigger ---------------------------------------------------------------------

EB = dict(SLIM, exclude=["^Dense_1/", "^Conv_0/"], target=0.5, schedule="early_bird", start=2, end=29,
          update_every=3, early_bird_window=3)  # checks at steps 2, 5, .., 29: ten
CHECKS = list(range(2, 30, 3))
UNITS = 20


def kept_scales(kept):
    """BatchNorm scales whose 10 largest are the units ``kept`` (a set of 10 of 20)."""
    scale = np.linspace(0.1, 0.2, UNITS)
    scale[sorted(kept)] = np.linspace(1.0, 2.0, len(kept))
    return scale


def swap(kept, pairs):
    """``kept`` with ``pairs`` of its units exchanged for pruned ones (distance 2 * pairs / 20)."""
    out, pruned = sorted(kept), sorted(set(range(UNITS)) - set(kept))
    return set(out[pairs:]) | set(pruned[:pairs])


def reference_ticket(sets, window, epsilon):
    """The check at which the ticket is drawn and why, by the rule in plain Python."""
    distances = []
    for k, kept in enumerate(sets):
        if k:
            distances.append(len(kept ^ sets[k - 1]) / UNITS)
        if len(distances) >= window and max(distances[-window:]) < epsilon:
            return k, "settled"
    return len(sets) - 1, "end"


def slim_params(scale):
    return {"Dense_0": {"kernel": jnp.ones((4, UNITS)), "bias": jnp.zeros(UNITS)},
            "BatchNorm_1": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.zeros(UNITS)},
            "Conv_0": PARAMS["Conv_0"], "Dense_1": {"kernel": jnp.ones((UNITS, 3)), "bias": jnp.zeros(3)}}


def drive(tx, sets, steps, state=None):
    """Updates at ``steps``; check k sees the scales of ``sets[k]``, every other step random ones
    (masks may change only at checks)."""
    noise = np.random.default_rng(3)

    def params_at(t):
        if t in CHECKS:
            return slim_params(kept_scales(sets[CHECKS.index(t)]))
        return slim_params(noise.uniform(0.0, 3.0, UNITS))

    return updates(tx, params_at, steps, state)


S0 = set(range(0, 20, 2))
SETTLING = [S0, swap(S0, 2), swap(S0, 2), swap(S0, 2), swap(S0, 3), swap(S0, 3), swap(S0, 3), swap(S0, 3),
            swap(S0, 4), swap(S0, 4)]
# One swap a check: distance 0.1, which is not below epsilon=0.1: drawn at end.
RESTLESS = [swap(S0, k % 2) for k in range(10)]


@pytest.fixture(scope="module")
def early_bird_tx():
    return sp.make_sparsity(sparsity_config(**EB), optax.sgd(0.0), 40, norms=NORMS)


@pytest.mark.parametrize("sets", [SETTLING, RESTLESS], ids=["settles", "restless"])
def test_the_ticket_is_drawn_when_the_masks_settle_for_a_window_or_at_end(early_bird_tx, sets):
    check, why = reference_ticket(sets, window=3, epsilon=0.1)
    assert (check, why) == ((7, "settled") if sets is SETTLING else (9, "end"))
    drawn_at = CHECKS[check]
    states = drive(early_bird_tx, sets, range(35))
    for t, state in enumerate(states):
        mask = np.asarray(state.masks["Dense_0"]["kernel"][0])
        record = sp.early_bird_record(jax.device_get(state.early_bird))
        if t < drawn_at:
            assert mask.all() and record["early_bird_step"] is None, t
        else:
            want = np.zeros(UNITS, bool)
            want[sorted(sets[check])] = True
            np.testing.assert_array_equal(mask, want, err_msg=f"step {t}")
            assert record["early_bird_step"] == drawn_at and record["early_bird_reason"] == why
    due = np.asarray(sp.mask_update_due(sparsity_config(**EB), 40, np.arange(40)))
    assert list(np.flatnonzero(due)) == CHECKS


def test_a_resumed_search_decides_as_the_uninterrupted_one(early_bird_tx):
    """The history is in the optimizer state: stop after step 12, carry the state to the host and
    into a new transformation (a new process), and the ticket is the same one at the same step."""
    whole = drive(early_bird_tx, SETTLING, range(30))[-1]
    first = drive(early_bird_tx, SETTLING, range(13))[-1]
    saved = jax.device_get(first)
    again = sp.make_sparsity(sparsity_config(**EB), optax.sgd(0.0), 40, norms=NORMS)
    resumed = drive(again, SETTLING, range(13, 30), state=jax.tree.map(jnp.asarray, saved))[-1]
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(resumed.early_bird.drawn_at) == CHECKS[7]


def test_other_schedules_keep_their_state_tree():
    cfg = sparsity_config(method="magnitude", structure="channel", target=0.5, schedule="one_shot")
    state = sp.make_sparsity(cfg, optax.sgd(0.1), 10).init(PARAMS)
    assert state.early_bird is None and sp.early_bird_record(sp.early_bird_state(state)) == {}


# --- through real runs ----------------------------------------------------------------------------

def test_early_bird_draws_and_shrinks_in_a_real_run(tmp_path):
    """The tiny MLP (hidden 32), ticket searched every 5 steps from step 5; the shrink surgeon
    removes the pruned units right after the check that draws it."""
    import jaxaccel
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp_shrink"), [
        f"workdir={tmp_path}", "model.features=[32]", "train.batch_size=128", "train.log_every_steps=10",
        "train.steps=60", "sparsity.schedule=early_bird", "sparsity.start=5", "sparsity.end=45",
        "sparsity.update_every=5", "sparsity.target=0.5", "sparsity.exclude=['^Dense_1/']"])
    summary = jaxaccel.train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [line for line in lines if line.get("split") == "test"][-1]
    drawn = last["early_bird_step"]
    assert drawn in range(5 + 5 * 5, 46, 5) and last["early_bird_reason"] in ("settled", "end")
    assert (last["early_bird_reason"] == "end") == (drawn == 45)
    [change] = [line for line in lines if line.get("split") == "surgery"]
    assert change["step"] == drawn + 1 and change["surgery"]["widths"] == {"Dense_0": 16}
    assert summary["model"]["features"] == [16]
    assert (summary["early_bird_step"], summary["early_bird_reason"]) == (drawn, last["early_bird_reason"])


def test_network_slimming_with_early_bird_on_a_batchnorm_model(tmp_path, monkeypatch):
    """A user linen model with BatchNorm after its hidden Dense: units ranked by |gamma| with L1 on
    the scales, the ticket searched every 2 steps. Resumed from its checkpoint at step 10 (the
    search under way), the run draws the same ticket at the same step and ends bitwise equal."""
    import shutil

    import jaxaccel
    from jaxaccel import export
    from jaxaccel.models.custom import ImportedModelConfig
    from tests import user_models as um
    monkeypatch.setattr(ImportedModelConfig, "unit_norms", lambda self: {"Dense_0": "BatchNorm_0"})
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"), [
        f"workdir={tmp_path}", "train.batch_size=128", "train.log_every_steps=10", "train.steps=40",
        "checkpoint.every_steps=10", "checkpoint.max_to_keep=5",
        "sparsity.method=magnitude", "sparsity.structure=channel", "sparsity.importance=norm_scale",
        "sparsity.schedule=early_bird", "sparsity.start=0", "sparsity.end=30", "sparsity.update_every=2",
        "sparsity.target=0.25", "sparsity.exclude=['^Dense_1/']", "sparsity.penalty=l1",
        "sparsity.penalty_weight=1e-4"])
    summary = jaxaccel.train(cfg, model=um.LinenBNNet)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(line.get("penalty", 0) > 0 for line in lines if "split" not in line)
    assert lines[-1]["early_bird_step"] in range(10, 31, 2)
    params = export.load_params(tmp_path)
    kernel = np.asarray(params["Dense_0"]["kernel"])
    assert np.sum(~kernel.any(axis=0)) == 8 and summary["sparsity"] > 0.2

    for step in (20, 30, 40):
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    (tmp_path / "summary.json").unlink()
    shutil.rmtree(tmp_path / "export")
    jaxaccel.train(cfg, model=um.LinenBNNet)
    again = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {k: again[-1][k] for k in ("step", "early_bird_step", "early_bird_reason", "early_bird_distance")} == \
        {k: lines[-1][k] for k in ("step", "early_bird_step", "early_bird_reason", "early_bird_distance")}
    for a, b in zip(jax.tree.leaves(export.load_params(tmp_path)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_network_slimming_early_bird_shrinks_a_batchnorm_resnet(tmp_path):
    """The whole recipe on a built-in model: a tiny ResNet with batch norm, each block's first conv
    ranked by its norm's |scale| under L1 on the scales, the ticket searched every 4 steps, then the
    pruned channels removed (their norms and running statistics with them)."""
    import jaxaccel
    from jaxaccel import export
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp_shrink"), [
        f"workdir={tmp_path}", "model.name=resnet", "model.width=4", "model.depth=1", "model.norm=batch",
        "train.batch_size=32", "train.steps=40", "train.log_every_steps=10",
        "sparsity.include=['_Conv_0/kernel$']", "sparsity.exclude=[]", "sparsity.importance=norm_scale",
        "sparsity.penalty=l1", "sparsity.penalty_weight=1e-4", "sparsity.schedule=early_bird",
        "sparsity.start=0", "sparsity.end=32", "sparsity.update_every=4", "sparsity.early_bird_window=2",
        "sparsity.target=0.5"])
    summary = jaxaccel.train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(line.get("penalty", 0) > 0 for line in lines if "split" not in line)
    drawn = lines[-1]["early_bird_step"]
    [change] = [line for line in lines if line.get("split") == "surgery"]
    assert change["step"] == drawn + 1 and summary["model"]["inner"] == [2, 4, 8]
    served = export.load(tmp_path)
    for stage, width in enumerate((2, 4, 8)):
        block = f"Stage{stage}_Block0"
        assert served.params[f"{block}_Conv_0"]["kernel"].shape[-1] == width
        assert served.params[f"{block}_Conv_1"]["kernel"].shape[-2] == width
        assert served.model_state["batch_stats"][f"{block}_Norm_0"]["var"].shape == (width,)
        assert np.all(np.asarray(served.params[f"{block}_Norm_0"]["scale"]) != 0)  # only kept units remain

"""Model surgery (jaxaccel.surgery) through real runs, with a test-only surgeon that widens the tiny
MLP's hidden layer by zero-padding (the widened model computes the same function): the change
happens at its step, is compiled apart, recorded, checkpointed, resumed bitwise and exported."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxaccel
from jaxaccel import export, surgery
from jaxaccel import setup as setup_lib
from jaxaccel import step as step_lib
from jaxaccel.checkpoint import Checkpointer
from jaxaccel.plan import Plan
from tests.conftest import ROOT, TINY

AT, EXTRA, WIDTH = 25, 8, 32  # the change: hidden width 32 -> 40 after step 25
# 60 steps: groups end at 10, 20, 25 (the surgery point, not a log point), 30, 40, 50, 60.
ARGS = ["train.steps=60", "checkpoint.every_steps=20", "checkpoint.max_to_keep=5"]
# The axis of each parameter the widened hidden layer pads: its output columns and bias, and the
# input rows of the layer after it. Optimizer moments are found by their path's ending.
_PADDED = {"['Dense_0']['kernel']": 1, "['Dense_0']['bias']": 0, "['Dense_1']['kernel']": 0}


class Widen:
    """Test-only surgeon: after step ``at``, the first hidden layer gets ``extra`` more units, all
    weights zero (in and out), in the parameters and in every param-shaped optimizer leaf."""
    name = "widen"

    def __init__(self, at: int = AT, extra: int = EXTRA):
        self.at, self.extra = at, extra

    def due(self, step: int) -> bool:
        return step == self.at

    def points(self, total_steps: int) -> list[int]:
        return [self.at]

    def operate(self, step, state, model, tx):
        width = model.features[0]

        def pad(path, leaf):
            name = jax.tree_util.keystr(path)
            for suffix, axis in _PADDED.items():
                if name.endswith(suffix) and leaf.shape[axis] == width:
                    widths = [(0, 0)] * leaf.ndim
                    widths[axis] = (0, self.extra)
                    return jnp.pad(leaf, widths)
            return leaf

        wider = model.model_copy(update={"features": [width + self.extra, *model.features[1:]]})
        return surgery.Change(wider, jax.tree_util.tree_map_with_path(pad, state),
                              {"kind": "widen", "features": wider.features})


def _cfg(workdir, *overrides):
    return jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"),
                                         [f"workdir={workdir}", *TINY, *ARGS, *overrides])


def _train(workdir, *overrides):
    with surgery.registered(lambda cfg: Widen()):
        return jaxaccel.train(_cfg(workdir, *overrides))


def _lines(workdir):
    return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def _timeless(lines):
    return [{k: v for k, v in l.items() if k not in ("train_seconds", "compile_seconds")} for l in lines]


@pytest.fixture(scope="module")
def widened(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("widened")
    return workdir, _train(workdir)


def _count(width):
    return 784 * width + width + width * 10 + 10


def test_surgeon_preserves_the_function_and_rebuild_serves_it(tmp_path):
    """The widened model (rebuilt by setup.rebuild with the run's lowering) gives the logits of
    the narrow one; follow() picks the model a checkpoint record names."""
    setup = setup_lib.build(_cfg(tmp_path))
    params = setup.model.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1), jnp.uint8))["params"]
    tx = optax.adam(1e-3)
    state = step_lib.TrainState.create(params, tx)
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 1 if x.ndim else x, state.opt_state))
    change = surgery.operate([Widen()], AT, state, setup.model_cfg, tx)
    wider = setup_lib.rebuild(setup, change.model)
    assert wider.model_cfg.features == [WIDTH + EXTRA] and setup.model_cfg.features == [WIDTH]
    images = np.asarray(setup.dataset.test_inputs[:64])
    before = setup.eval_model.apply({"params": params}, images)
    for model in (wider.model, wider.eval_model):
        np.testing.assert_allclose(model.apply({"params": change.state.params}, images), before, rtol=1e-6, atol=1e-6)
    mu = change.state.opt_state[0].mu["Dense_1"]["kernel"]  # the moments padded with the params
    assert mu.shape == (WIDTH + EXTRA, 10) and float(mu[WIDTH:].sum()) == 0 and float(mu[:WIDTH].min()) == 1
    # Two surgeons due at one step: the second operates on the first's result, both recorded.
    twice = surgery.operate([Widen(), Widen(extra=4)], AT, state, setup.model_cfg, tx)
    assert twice.model.features == [WIDTH + EXTRA + 4] and [c["features"] for c in twice.record["changes"]] == [
        [WIDTH + EXTRA], [WIDTH + EXTRA + 4]]
    # Nothing due: no change. A checkpoint record of the widened model: the setup follows it.
    assert surgery.operate([Widen()], AT + 1, state, setup.model_cfg, tx) is None
    changed = surgery.checkpoint_record(wider, [{"step": AT}])
    assert setup_lib.follow(setup, changed).model_cfg == change.model
    assert setup_lib.follow(setup, surgery.checkpoint_record(setup, [])) is setup
    assert setup_lib.follow(setup, {}) is setup  # a checkpoint from before surgery existed
    # The run now names another model than the checkpoint's started from: not followed (the restore
    # then reports the mismatch).
    assert setup_lib.follow(setup, {**changed, "model_at_start": {"name": "mlp", "features": [16]}}) is setup


def test_change_happens_at_its_step_and_is_recorded(widened):
    workdir, summary = widened
    lines = _lines(workdir)
    assert [l["step"] for l in lines if "split" not in l] == [10, 20, 25, 30, 40, 50, 60]
    (change,) = [l for l in lines if l.get("split") == "surgery"]
    assert change["step"] == AT and change["surgery"] == {"surgeon": "widen", "kind": "widen", "features": [40]}
    assert change["compile_seconds"] > 0 and change["param_count"] == _count(WIDTH + EXTRA)
    assert change["model"]["features"] == [WIDTH + EXTRA]
    assert summary["param_count"] == _count(WIDTH + EXTRA) and summary["model"]["features"] == [WIDTH + EXTRA]
    assert summary["surgery_compile_seconds"] == change["compile_seconds"] and summary["surgery"] == [change]
    config = json.loads((workdir / "config.json").read_text())
    assert config["config"]["model"]["features"] == [WIDTH] and config["surgery"] == [change]
    assert config["plan"]["surgery_points"] == [AT]
    checkpoints = Checkpointer(workdir / "checkpoints", 5)
    assert checkpoints.meta(20)["model"]["features"] == [WIDTH]
    assert checkpoints.meta(40)["model"]["features"] == [WIDTH + EXTRA] and checkpoints.meta(40)["surgery"] == [change]
    checkpoints.close()


def test_export_is_the_final_model_and_predicts_as_trained(widened, mnist):
    workdir, summary = widened
    model = export.load(workdir)
    assert model.meta["model"]["features"] == [WIDTH + EXTRA]
    kernel = model.params["Dense_0"]["kernel"]
    assert kernel.shape == (784, WIDTH + EXTRA)
    # The added units stayed exactly zero: ReLU's gradient at 0 is 0, so the function is unchanged.
    assert not np.any(kernel[:, WIDTH:]) and not np.any(model.params["Dense_1"]["kernel"][WIDTH:])
    predictions = np.concatenate([model(mnist.test_inputs[i:i + 2000]).argmax(-1) for i in range(0, 10000, 2000)])
    # The run's last evaluation (float32 sums on device): the same count of correct predictions.
    assert np.sum(predictions == mnist.test_labels) == round(summary["test_accuracy"] * len(mnist.test_labels))


@pytest.mark.parametrize("stop", [30, 45], ids=["before-change-checkpoint", "after-change-checkpoint"])
def test_resume_across_the_change_is_bitwise(stop, widened, tmp_path):
    """Stopped after the change: resumed from the checkpoint before it (step 20: the change is made
    again) or after it (step 40: the widened model is rebuilt from the checkpoint's record); the
    final parameters and every metrics line equal the uninterrupted run's bit for bit."""
    reference, _ = widened
    workdir = tmp_path / "run"
    original = Plan.next_boundary

    class Stop(Exception):
        pass

    def boundary(self, step):
        if step >= stop:
            raise Stop()
        return original(self, step)

    Plan.next_boundary = boundary
    try:
        with pytest.raises(Stop):
            _train(workdir)
    finally:
        Plan.next_boundary = original
    summary = _train(workdir)
    for a, b in zip(jax.tree.leaves(export.load(workdir).params), jax.tree.leaves(export.load(reference).params)):
        np.testing.assert_array_equal(a, b)
    assert _timeless(_lines(workdir)) == _timeless(_lines(reference))
    assert summary["model"]["features"] == [WIDTH + EXTRA] and len(summary["surgery"]) == 1
    # Started again once finished: nothing changes.
    again = _train(workdir)
    assert again == json.loads((workdir / "summary.json").read_text())


_DRIVER = """
import sys
from jaxaccel import run, surgery
from tests.test_surgery import Widen
with surgery.registered(lambda cfg: Widen()):
    sys.exit(run.main(sys.argv[1:]))
"""


def _cli(workdir, *args, env=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-c", _DRIVER, "exp=mnist_mlp", f"workdir={workdir}", *TINY, *ARGS, *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def test_killed_right_after_the_change_resumes_bitwise(widened, tmp_path):
    """SIGKILL at the fault point just after the change (before any checkpoint of the new model):
    the command run again resumes from step 20, makes the change again and ends bitwise equal."""
    reference, _ = widened
    result = _cli(tmp_path, env={"JAXACCEL_FAULT": f"surgery@{AT}"})
    assert result.returncode == -9, result.stderr[-3000:]
    assert f"step {AT}: model changed" in result.stdout
    result = _cli(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint step 20" in result.stdout
    for a, b in zip(jax.tree.leaves(export.load(tmp_path).params), jax.tree.leaves(export.load(reference).params)):
        np.testing.assert_array_equal(a, b)
    assert _timeless(_lines(tmp_path)) == _timeless(_lines(reference))


@pytest.mark.parametrize("parallel", [["parallel.fsdp=true"], ["parallel.mode=pmap"]], ids=["fsdp", "pmap"])
def test_change_under_two_devices_matches_one(parallel, widened, tmp_path):
    """Two emulated devices (FSDP-sharded state, or replicas under shard_map): the change is made,
    and the run ends where the one-device run does, to float rounding."""
    reference, summary = widened
    result = _cli(tmp_path, *parallel,
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 25: model changed" in result.stdout
    two = json.loads((tmp_path / "summary.json").read_text())
    assert two["param_count"] == summary["param_count"] and len(two["surgery"]) == 1
    for a, b in zip(jax.tree.leaves(export.load(tmp_path).params), jax.tree.leaves(export.load(reference).params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

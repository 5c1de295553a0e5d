"""Precision policy and loss scaling (jaxaccel.precision.policy / loss_scale). Tiny shapes, CPU."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from jaxaccel.config import PrecisionConfig
from jaxaccel.precision import (
    LossScaleState, NonFiniteError, cast_output, cast_params, check_backend, current_scale, dense_kwargs,
    dot_general, dynamic_loss_scale, nonfinite_steps, raise_if_diverged, resolve_mode, scale_loss,
    static_loss_scale, with_precision)

BF16 = PrecisionConfig(params="bfloat16", compute="bfloat16")
F16 = PrecisionConfig(params="float16", compute="float16")


# Test data comes from numpy: compiling jax.random.normal costs ~1 s per shape on this CPU.
def _normal(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).standard_normal(shape), jnp.float32)


def _params(seed=0):
    return {"Dense_0": {"kernel": _normal((4, 3), seed), "bias": _normal((3,), seed + 1)}}


def _init(net, x, seed=0):
    """Random params of ``net``'s shapes without compiling flax's (jax.random) initializers."""
    shapes = jax.eval_shape(net.init, jax.random.key(0), x)["params"]
    leaves, tree = jax.tree.flatten(shapes)
    return jax.tree.unflatten(tree, [0.3 * _normal(l.shape, seed + i) for i, l in enumerate(leaves)])


def _bits(tree):
    """Leaves as raw bytes: bit-identical comparison (distinguishes -0.0 and NaN payloads)."""
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _grads(value, params=None):
    return jax.tree.map(lambda p: jnp.full_like(p, value), params or _params())


# ---------------------------------------------------------------------------------------------
# Policy.

class _Net(nn.Module):
    cfg: PrecisionConfig

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, **dense_kwargs(self.cfg))(x))
        return cast_output(nn.Dense(4, **dense_kwargs(self.cfg))(x), self.cfg)


def test_dense_policy_dtypes_and_f32_master_grads():
    x = _normal((8, 5), 1)
    net, ref_net = _Net(BF16), _Net(PrecisionConfig())
    params = _init(net, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # master weights

    @jax.jit
    def run(p):
        out = net.apply({"params": cast_params(p, BF16)}, x)
        out16 = _Net(BF16.model_copy(update={"output": "bfloat16"})).apply({"params": p}, x)
        loss = lambda n: lambda q: jnp.mean(n.apply({"params": cast_params(q, n.cfg)}, x).astype(jnp.float32) ** 2)
        return out, out16, jax.grad(loss(net))(p), jax.grad(loss(ref_net))(p)

    out, out16, grads, ref = run(params)
    assert out.dtype == jnp.float32 and out16.dtype == jnp.bfloat16  # cfg.output
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        assert g.dtype == jnp.float32  # gradients of the f32 master weights
        np.testing.assert_allclose(g, r, rtol=0.1, atol=0.02)  # bf16 has 8 significant bits


def test_cast_params_follows_include():
    cfg = BF16.model_copy(update={"include": [r"kernel$"]})
    out = cast_params(_params(), cfg)
    assert out["Dense_0"]["kernel"].dtype == jnp.bfloat16 and out["Dense_0"]["bias"].dtype == jnp.float32
    assert cast_params(_params(), PrecisionConfig()) is not None  # float32: unchanged
    assert dense_kwargs(cfg, "Dense_0") and not dense_kwargs(BF16.model_copy(update={"include": ["Conv"]}), "Dense_0")


_DOT_CASES = [
    ((((1,), (0,)), ((), ())), ((6, 5), (5, 4))),            # nn.Dense
    ((((2,), (0,)), ((), ())), ((2, 3, 5), (5, 4))),         # Dense on [B, T, K]
    ((((0,), (1,)), ((), ())), ((5, 6), (4, 5))),            # transposed operands
    ((((2,), (1,)), ((0,), (0,))), ((2, 3, 5), (2, 5, 4))),  # batched
]


def test_mixed_dot_custom_gradient_matches_autodiff():
    """The hand-written bf16 backward equals jax's transpose (on the same bf16-rounded operands)."""
    ours = dot_general(BF16)
    r16 = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)

    @jax.jit
    def run(inputs):
        results = []
        for (dims, _), (x, y, g) in zip(_DOT_CASES, inputs):
            out, vjp = jax.vjp(lambda a, b: ours(a, b, dims), x, y)
            ref, ref_vjp = jax.vjp(lambda a, b: jax.lax.dot_general(r16(a), r16(b), dims), x, y)
            results.append((out, ref, vjp(r16(g).astype(jnp.bfloat16)), ref_vjp(r16(g))))
        return results

    inputs = []
    for i, (dims, shapes) in enumerate(_DOT_CASES):
        out_shape = jax.eval_shape(lambda a, b: jax.lax.dot_general(a, b, dims), *map(jnp.zeros, shapes)).shape
        inputs.append((_normal(shapes[0], i), _normal(shapes[1], i + 10), _normal(out_shape, i + 20)))
    for out, ref, got, want in run(inputs):
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=1e-2, atol=1e-2)
        for a, b in zip(got, want):
            assert a.dtype == jnp.float32 and a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)


def test_bf16_hlo_has_no_narrow_accumulation():
    """Forward and backward of the bf16 policy: every dot with bf16 operands accumulates in f32."""
    x = _normal((8, 5), 1)
    net = _Net(BF16)
    params = _init(net, x)
    step = jax.jit(jax.grad(lambda p, x: jnp.sum(net.apply({"params": cast_params(p, BF16)}, x) ** 2)))
    lowered = step.lower(params, x)
    dots = re.findall(r"stablehlo\.dot_general.*?: \((tensor<[^)]*)\) -> tensor<[0-9x]*x(\w+)>", lowered.as_text())
    assert len(dots) == 5, dots  # 2 forward + 3 backward (no gradient for the input x)
    for operands, result in dots:
        assert "bf16" in operands and result == "f32", (operands, result)
    compiled = lowered.compile().as_text()
    results = re.findall(r"= (\w+)\[[^\]]*\](?:\{[^}]*\})? (?:dot|convolution)\(", compiled)
    assert results and not {"bf16", "f16", "s8"} & set(results), results


def test_check_backend_advice():
    assert check_backend(PrecisionConfig(), "cpu") == []
    assert check_backend(BF16, "cpu") == []
    warn = check_backend(F16.model_copy(update={"loss_scale": "dynamic"}), "cpu")
    assert len(warn) == 1 and "bfloat16" in warn[0] and "float16" in warn[0]
    assert any("accumulation=float32" in w for w in check_backend(BF16.model_copy(update={"accumulation": "bfloat16"}), "cpu"))
    assert any("loss scaling" in w for w in check_backend(F16.model_copy(update={"loss_scale": "none"}), "gpu"))
    assert check_backend(F16, "gpu") == []
    assert any("TPU" in w for w in check_backend(F16, "tpu"))


# ---------------------------------------------------------------------------------------------
# Loss scaling.

def _dyn(**kw):
    args = dict(init=2.0 ** 4, floor=1.0, ceiling=2.0 ** 6, period=3, factor=2.0)
    args.update(kw)
    return dynamic_loss_scale(optax.adam(1e-2), **args)


def _step(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def test_nonfinite_step_is_skipped_atomically():
    tx, params = _dyn(), _params()
    step = jax.jit(lambda p, s, g: _step(tx, p, s, g))
    params, state = step(params, tx.init(params), _grads(0.5))  # a real step: non-trivial moments, count=1
    for bad in (np.inf, -np.inf, np.nan):
        grads = jax.tree.map(np.array, _grads(0.5))
        grads["Dense_0"]["kernel"][1, 2] = bad  # one bad element
        new_params, new_state = step(params, state, grads)
        assert _bits(new_params) == _bits(params)
        assert _bits(new_state.inner_state) == _bits(state.inner_state)  # mu, nu and count
        assert int(optax.tree_utils.tree_get(new_state, "count")) == 1
        assert float(new_state.scale) == float(state.scale) / 2
        assert int(new_state.nonfinite_steps) == 1 and int(new_state.total_nonfinite) == 1
        assert int(new_state.good_steps) == 0


def test_scale_grows_after_period_and_clamps_at_ceiling_and_floor():
    tx, params = _dyn(init=16.0, ceiling=64.0, period=3), _params()
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: _step(tx, p, s, g))
    scales = []
    for _ in range(12):
        params, state = step(params, state, _grads(0.1 * float(state.scale)))
        scales.append(float(state.scale))
    assert scales == [16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64, 64]  # grows every 3rd step, stops at 64
    inf = _grads(np.inf)
    for _ in range(10):
        params, state = step(params, state, inf)
    assert float(state.scale) == 1.0 and int(state.nonfinite_steps) == 10  # 64 -> 1, then held at the floor


def test_unscaled_gradients_reach_the_inner_optimizer():
    """grads = d(S*loss)/dp; the inner SGD must see d(loss)/dp exactly (S a power of two)."""
    sgd = optax.sgd(1.0)
    tx, params = dynamic_loss_scale(sgd, init=2.0 ** 10, ceiling=2.0 ** 12), _params()
    loss = lambda p: jnp.sum(p["Dense_0"]["kernel"] ** 3) + jnp.sum(p["Dense_0"]["bias"])

    @jax.jit
    def run(params):
        state = tx.init(params)
        grads = jax.grad(lambda p: scale_loss(loss(p), state))(params)
        return tx.update(grads, state, params)[0], sgd.update(jax.grad(loss)(params), sgd.init(params))[0]

    updates, ref = run(params)
    assert _bits(updates) == _bits(ref)


def test_zero_gradient_float16_adam_step_is_finite():
    tx = with_precision(optax.adam(1e-3), F16)
    finite = lambda tree: all(bool(jnp.isfinite(v).all()) for v in jax.tree.leaves(tree))
    # float16 master weights: Adam's eps=1e-8 would flush to 0 in float16 and give 0/0 = NaN.
    p16 = jax.tree.map(lambda p: p.astype(jnp.float16), _params())
    new, state = jax.jit(lambda p: _step(tx, p, tx.init(p), jax.tree.map(jnp.zeros_like, p)))(p16)
    assert all(x.dtype == jnp.float16 for x in jax.tree.leaves(new))
    assert _bits(new) == _bits(p16) and finite(state)
    # float32 master weights, float16 compute: a zero gradient through the scaled float16 backward.
    x = jnp.ones((2, 5))
    net = _Net(F16)

    @jax.jit
    def run(params):
        params = jax.tree.map(jnp.zeros_like, params)  # all-zero net: every gradient is 0 ...
        state = tx.init(params)
        loss = lambda p: scale_loss(jnp.sum(net.apply({"params": cast_params(p, F16)}, x)) * 0.0, state)
        grads = jax.grad(loss)(params)  # ... and 0 * scale = 0
        return grads, _step(tx, params, state, grads)

    grads, (new, state) = run(_init(net, x))
    assert all(not bool(g.any()) for g in jax.tree.leaves(grads))
    assert finite((new, state)) and int(nonfinite_steps(state)) == 0 and float(current_scale(state)) == 2.0 ** 15


def test_current_scale_found_in_nested_states():
    params = _params()
    for tx in [optax.chain(optax.clip_by_global_norm(1.0), _dyn()),
               optax.chain(optax.add_decayed_weights(1e-4), optax.chain(_dyn(), optax.identity())),
               _dyn()]:
        state = tx.init(params)
        assert float(current_scale(state)) == 16.0 and int(nonfinite_steps(state)) == 0
    plain = optax.adam(1e-3).init(params)
    assert float(current_scale(plain)) == 1.0 and int(nonfinite_steps(plain)) == 0


def test_modes_and_divergence_error():
    assert resolve_mode(F16) == "dynamic" and resolve_mode(BF16) == "none"
    assert resolve_mode(PrecisionConfig(loss_scale="static")) == "static"
    params, inf = _params(), _grads(np.inf)
    for tx, scale in [(static_loss_scale(optax.sgd(0.1), 128.0), 128.0), (with_precision(optax.sgd(0.1), BF16), 1.0)]:
        state = tx.init(params)
        step = jax.jit(lambda p, s, g: _step(tx, p, s, g))
        for _ in range(3):
            params, state = step(params, state, inf)
        assert float(current_scale(state)) == scale and int(nonfinite_steps(state)) == 3
        raise_if_diverged(state, 4)
        with pytest.raises(NonFiniteError, match="3 consecutive steps at step 7.*max_nonfinite_steps=3"):
            raise_if_diverged(state, 3, step=7)
        params, state = step(params, state, _grads(0.1))
        assert int(nonfinite_steps(state)) == 0 and int(state.total_nonfinite) == 3
    with pytest.raises(ValueError, match="floor <= init <= ceiling"):
        with_precision(optax.sgd(0.1), F16.model_copy(update={"loss_scale_init": 0.5}))


def test_train_state_step_under_jit():
    """The wiring step.py will use: scaled loss inside value_and_grad, apply_gradients outside."""
    x = _normal((8, 5), 1)
    y = jnp.arange(8) % 4
    net = _Net(F16)
    tx = with_precision(optax.adam(1e-2), F16)
    state = train_state.TrainState.create(apply_fn=net.apply, params=_init(net, x), tx=tx)

    @jax.jit
    def train_step(state):
        def loss_fn(p):
            logits = state.apply_fn({"params": cast_params(p, F16)}, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
            return scale_loss(loss, state.opt_state), loss
        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(20):
        state, loss = train_step(state)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert int(optax.tree_utils.tree_get(state.opt_state, "count")) + int(state.opt_state.total_nonfinite) == 20


def test_state_survives_orbax_round_trip(tmp_path):
    import orbax.checkpoint as ocp
    tx, params = _dyn(init=4.0, floor=2.0, period=2), _params()
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: _step(tx, p, s, g))
    for g in [0.1, np.inf, 0.2]:
        params, state = step(params, state, _grads(g))
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(tmp_path / "ckpt", args=ocp.args.StandardSave(state))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tx.init(params))
        restored = ckptr.restore(tmp_path / "ckpt", args=ocp.args.StandardRestore(abstract))
    assert isinstance(restored, LossScaleState)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert [x.dtype for x in jax.tree.leaves(restored)] == [x.dtype for x in jax.tree.leaves(state)]
    assert _bits(restored) == _bits(state)
    assert (float(restored.scale), int(restored.good_steps), int(restored.total_nonfinite)) == (2.0, 1, 1)
    # After the round trip the constants still hold: the floor (2.0) and the growth period (2).
    a, b = (params, state), (params, restored)
    for g in [np.inf, np.inf, 0.1]:
        a, b = step(*a, _grads(g)), step(*b, _grads(g))
    assert _bits(a) == _bits(b) and float(b[1].scale) == 2.0 and int(b[1].good_steps) == 1
    b = step(*b, _grads(0.1))
    assert float(b[1].scale) == 4.0


_PMAP_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jaxaccel.precision import dynamic_loss_scale, current_scale
    assert jax.device_count() == 2, jax.devices()
    params = {"w": jnp.ones((3,))}

    def run(axis_name, reduce):
        tx = dynamic_loss_scale(optax.sgd(0.1), init=8.0, axis_name=axis_name)
        state = jax.tree.map(lambda x: jnp.stack([x, x]), tx.init(params))
        grads = {"w": jnp.array([[1.0, np.inf, 1.0], [1.0, 1.0, 1.0]])}  # only replica 0 overflows
        rep = jax.tree.map(lambda x: jnp.stack([x, x]), params)

        def step(p, s, g):
            if reduce:
                g = jax.lax.pmean(g, "d")
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        p, s = jax.pmap(step, axis_name="d")(rep, state, grads)
        return np.asarray(current_scale(s)).tolist(), np.asarray(p["w"]).tolist()

    print("reduced", run(None, True))       # pmean before update (what the jit path does implicitly)
    print("axis_name", run("d", False))     # unreduced grads, flag reduced over the axis
    print("neither", run(None, False))      # the failure mode both options prevent
""")


def test_pmap_nonfinite_on_one_replica_gives_same_scale_everywhere():
    """Two emulated CPU devices in a subprocess (device count is fixed when jax is imported)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _PMAP_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    ones = [[1.0] * 3] * 2
    assert eval(lines["reduced"]) == ([4.0, 4.0], ones)
    assert eval(lines["axis_name"]) == ([4.0, 4.0], ones)
    scales, _ = eval(lines["neither"])
    assert scales == [4.0, 8.0]  # replicas disagree: the test above is meaningful

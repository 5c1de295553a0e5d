"""Precision and QAT for unmodified Flax models (jaxaccel.precision.intercept), linen and NNX.

The models here are written as a user would, with plain flax layers; the references are the same
architectures built from our own precision/QAT layers, a NumPy computation, and the jaxprs.
"""
from __future__ import annotations

import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxaccel.config import PrecisionConfig, QuantConfig
from jaxaccel.models import MLP
from jaxaccel.models.cnn import SmallCNN
from jaxaccel.models.layers import to_float
from jaxaccel.precision import cast_params, fake_quant_apply, intercept, layer_kwargs, quant_conv_general_dilated
from jaxaccel.schema import ConfigError

BF16 = PrecisionConfig(compute="bfloat16", params="bfloat16")
QAT = QuantConfig(mode="qat")
ORIGINAL = (jax.lax.dot_general, jax.lax.conv_general_dilated, jnp.einsum)


def _normal(shape, seed=0, scale=1.0):
    return jnp.asarray(scale * np.random.RandomState(seed).standard_normal(shape), jnp.float32)


def _images(n=4, hw=12, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 256, (n, hw, hw, 1)), jnp.uint8)


def _fill(shapes, seed=0):
    """He-scaled random arrays of ``shapes``' shapes (no initializer is compiled)."""
    leaves, tree = jax.tree.flatten(shapes)
    fan_in = lambda s: int(np.prod(s[:-1])) if len(s) > 1 else 1  # noqa: E731
    return jax.tree.unflatten(tree, [_normal(l.shape, seed + i, (2 / fan_in(l.shape)) ** 0.5 if l.ndim > 1 else 0.1)
                                     for i, l in enumerate(leaves)])


def _init(model, *args):
    return _fill(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])


def _ops(jaxpr) -> list[tuple[str, ...]]:
    """(input dtypes..., output dtype) of every dot_general/conv in trace order, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            out.append(tuple(str(v.aval.dtype) for v in (*eqn.invars, eqn.outvars[0])))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    out += _ops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    out += _ops(sub)
    return out


def _untouched():
    """No interception state is left behind: jax's own functions are back in place."""
    return (jax.lax.dot_general, jax.lax.conv_general_dilated, jnp.einsum) == ORIGINAL


F32, B16 = ("float32",) * 3, ("bfloat16", "bfloat16", "float32")


# ---------------------------------------------------------------------------------------------
# A linen CNN written with plain flax layers: the architecture of our
# SmallCNN(channels=(4, 8), features=(16,), pool="avg"), with the same parameter names.

class UserCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (4, 8):
            x = nn.avg_pool(nn.relu(nn.Conv(width, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def _ours(**kw):
    return SmallCNN(channels=(4, 8), features=(16,), pool="avg", conv="xla", num_classes=10, **kw)


def test_linen_cnn_qat_is_our_qat_cnn_bit_for_bit_with_ste_gradients():
    images = _images()
    params = _init(UserCNN(), to_float(images))
    user = intercept.wrap_apply(UserCNN().apply, quant=QAT)
    ours = _ours(quant=QAT)

    def forward_and_grad(apply, inputs):  # inputs: the model's input from the images, inside the jit
        def loss(p, flag):
            return jnp.sum(apply({"params": p}, inputs(images), quant_enabled=flag) ** 2)
        return jax.jit(lambda p, flag: (apply({"params": p}, inputs(images), quant_enabled=flag),
                                        jax.grad(loss)(p, flag)))

    user_run, our_run = forward_and_grad(user, to_float), forward_and_grad(ours.apply, lambda i: i)
    plain = jax.jit(lambda p: UserCNN().apply({"params": p}, to_float(images)))(params)
    fq = jax.jit(lambda p: fake_quant_apply(UserCNN(), {"params": p}, to_float(images), cfg=QAT))(params)
    for flag in (True, False):  # a traced flag: quant.start switches QAT on without recompiling
        (y, grads), (y_ref, grads_ref) = user_run(params, jnp.array(flag)), our_run(params, jnp.array(flag))
        np.testing.assert_array_equal(y, y_ref)
        jax.tree.map(np.testing.assert_array_equal, grads, grads_ref)
        assert all(bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
        np.testing.assert_array_equal(y, fq if flag else plain)
    assert float(jnp.abs(fq - plain).max()) > 0  # the quantization is really on
    assert _untouched()


def test_linen_cnn_bf16_runs_the_ops_of_our_bf16_layers():
    images = _images()
    x = to_float(images)
    params = cast_params(_init(UserCNN(), x), BF16)  # as the train step does
    user = intercept.wrap_apply(UserCNN().apply, precision=BF16)
    ours = _ours(precision=BF16)
    # The same dots and convolutions: bf16 x bf16 -> f32, in the same order.
    user_ops, our_ops = _ops(jax.make_jaxpr(user)({"params": params}, x).jaxpr), \
        _ops(jax.make_jaxpr(ours.apply)({"params": params}, images).jaxpr)
    assert user_ops == our_ops == [B16] * 4
    y, y_ref = jax.jit(user)({"params": params}, x), jax.jit(ours.apply)({"params": params}, images)
    f32 = jax.jit(UserCNN().apply)({"params": jax.tree.map(lambda p: p.astype(jnp.float32), params)}, x)
    # Ours also adds biases, pools and applies relu in bf16 (its layers have dtype=bf16); a plain
    # layer adds its float32 bias to the bf16 result, so the two differ by bf16 roundings only.
    scale = float(jnp.abs(f32).max())
    assert float(jnp.abs(y.astype(jnp.float32) - y_ref.astype(jnp.float32)).max()) < 2e-2 * scale
    assert 0 < float(jnp.abs(y.astype(jnp.float32) - f32).max()) < 2e-2 * scale
    assert _untouched()


def test_path_regexes_select_exactly_the_intended_ops():
    x = to_float(_images())
    params = _init(UserCNN(), x)
    logits_w = _normal((10, 3))

    def apply_and_score(variables, inputs):  # the user's own op after the model, inside the wrapped call
        return jax.lax.dot_general(UserCNN().apply(variables, inputs), logits_w, (((1,), (0,)), ((), ())))

    wrapped = intercept.wrap_apply(apply_and_score, precision=BF16, include=["Conv_1", "^Dense"], exclude=["Dense_1"])
    assert _ops(jax.make_jaxpr(wrapped)({"params": params}, x).jaxpr) == [F32, B16, B16, F32, F32]
    # precision.include is over parameter names, as for our layers: Conv_0's kernel only
    conv0 = BF16.model_copy(update={"include": ["^Conv_0/kernel$"]})
    only_conv0 = intercept.wrap_apply(UserCNN().apply, precision=conv0)
    assert _ops(jax.make_jaxpr(only_conv0)({"params": params}, x).jaxpr) == [B16, F32, F32, F32]
    assert _untouched()


def test_a_selection_that_intercepts_nothing_is_an_error():
    x = to_float(_images())
    params = {"params": _init(UserCNN(), x)}
    typo = intercept.wrap_apply(UserCNN().apply, precision=BF16, include=["Conv_9"])
    with pytest.raises(ConfigError, match=r"'Conv_9' matches no module.*'Conv_0', 'Conv_1', 'Dense_0', 'Dense_1'"):
        jax.eval_shape(typo, params, x)
    with pytest.raises(ConfigError, match=r"quant.include: 'Conv_9'"):
        jax.eval_shape(intercept.wrap_apply(UserCNN().apply, quant=QAT.model_copy(update={"include": ["Conv_9"]})),
                       params, x)

    class MatMul(nn.Module):  # `@` is not one of the intercepted functions
        @nn.compact
        def __call__(self, x):
            return x @ self.param("kernel", nn.initializers.zeros, (x.shape[-1], 2))

    with pytest.raises(ConfigError, match="called none of"):
        jax.eval_shape(intercept.wrap_apply(MatMul().apply, quant=QAT), {"params": {"kernel": jnp.zeros((3, 2))}},
                       jnp.zeros((2, 3)))
    assert _untouched()


def test_the_train_step_runs_a_wrapped_user_model_with_quant_start_and_bf16():
    """Through jaxaccel.step.train_step as the trainer calls it: params cast by the step, the
    quant_enabled flag from quant.start, the loss-scale / guard wrapper around the optimizer."""
    import optax

    from jaxaccel.precision import with_precision
    from jaxaccel.step import TrainState, train_step

    images, labels = _images(8), jnp.asarray(np.arange(8) % 10, jnp.int32)
    params = _init(UserCNN(), to_float(images))

    def user_apply(variables, inputs, **kw):  # the user's model takes floats in [0, 1]
        return UserCNN().apply(variables, to_float(inputs), **kw)

    cfg = BF16.model_copy(update={"include": ["kernel$"]})
    tx = with_precision(optax.sgd(0.1), cfg)
    apply_fn = intercept.wrap_apply(user_apply, cfg, QAT)
    # quant.start as a traced step number: one compiled step for every start (100: never within this test)
    step = jax.jit(lambda state, start: train_step(state, {"inputs": images, "labels": labels}, jax.random.key(0),
                                                   apply_fn=apply_fn, tx=tx, precision=cfg, quant_start_step=start))
    state0 = TrainState.create(params, tx)
    (state1, m0), (_, never0), (_, always0) = step(state0, 1), step(state0, 100), step(state0, 0)
    (state2, m1), (_, always1) = step(state1, 1), step(state1, 0)
    assert float(m0["loss"]) == float(never0["loss"]) != float(always0["loss"])  # step 0: not yet
    assert float(m1["loss"]) == float(always1["loss"])                             # step 1: QAT on
    assert float(m1["finite_steps"]) == 1.0 and float(m1["grad_norm"]) > 0
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state2.params))  # float32 master weights
    ops = _ops(jax.make_jaxpr(lambda s: step(s, 1))(state0).jaxpr)
    assert ops[:4] == [B16] * 4  # the forward pass (the convolutions' backward stays jax's, as in our layers)
    assert _untouched()


# ---------------------------------------------------------------------------------------------
# einsum, and ops in the top-level module that are not selected.

class Proj(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return jnp.einsum("bi,io->bo", x, self.param("kernel", nn.initializers.lecun_normal(),
                                                     (x.shape[-1], self.features)))


class EinsumNet(nn.Module):
    """Projections in their own modules; an attention-like einsum of activations in the top module."""
    dense: bool = False  # the reference: nn.Dense layers of our QAT (same parameters, no bias)

    @nn.compact
    def __call__(self, x):
        def proj(n, name):
            if self.dense:
                return nn.Dense(n, use_bias=False, name=name, **layer_kwargs("dense", name, None, QAT))
            return Proj(n, name=name)
        h = proj(8, "Proj_0")(x)
        attention = jax.nn.softmax(jnp.einsum("bi,ci->bc", h, h))
        return proj(4, "Proj_1")(jnp.einsum("bc,ci->bi", attention, h))


def test_einsum_model_qat_equals_our_dense_qat_and_leaves_unselected_einsums_alone():
    x = _normal((3, 6))
    params = {"params": _init(EinsumNet(), x)}
    user = intercept.wrap_apply(EinsumNet().apply, quant=QAT, include=["^Proj"])
    y, y_ref, plain = jax.jit(lambda v: (user(v, x), EinsumNet(dense=True).apply(v, x),
                                         EinsumNet().apply(v, x)))(params)
    np.testing.assert_array_equal(y, y_ref)  # and the attention einsums stayed unquantized (else they'd differ)
    assert float(jnp.abs(y - plain).max()) > 0
    grads = jax.jit(jax.grad(lambda v: jnp.sum(user(v, x) ** 2)))(params)
    assert all(bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    bf16 = intercept.wrap_apply(EinsumNet().apply, precision=BF16, include=["^Proj"])
    # The projections: our dot (bf16 x bf16 -> f32). The attention einsums get Proj_0's bf16
    # activations but stay jax's own (bf16 x bf16 -> bf16, the dtype jnp.einsum picks).
    assert _ops(jax.make_jaxpr(bf16)(params, x).jaxpr) == [B16, ("bfloat16",) * 3, ("bfloat16",) * 3, B16]
    assert jax.eval_shape(bf16, params, x).dtype == jnp.float32  # precision.output
    assert _untouched()


def test_a_convolution_called_with_positional_dimension_numbers_is_quantized_per_output_channel():
    dn = ("NHWC", "HWIO", "NHWC")

    class PositionalConv(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 2, 5))
            return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", None, None, dn)

    x, w = _normal((2, 5, 5, 2)), _normal((3, 3, 2, 5), 1)
    y, ref = jax.jit(lambda x, w: (
        intercept.wrap_apply(PositionalConv().apply, quant=QAT)({"params": {"kernel": w}}, x),
        quant_conv_general_dilated(QAT)(x, w, (1, 1), "SAME", dimension_numbers=dn)))(x, w)
    np.testing.assert_array_equal(y, ref)


# ---------------------------------------------------------------------------------------------
# NNX: nnx.Linear (prepared) and a user layer calling jnp.einsum, through split/merge.

class Head(nnx.Module):
    def __init__(self, din, dout):
        self.w = nnx.Param(jnp.zeros((din, dout)))
        self.b = nnx.Param(jnp.zeros((dout,)))

    def __call__(self, x):
        return jnp.einsum("bi,io->bo", x, self.w[...]) + self.b[...]


class NNXMLP(nnx.Module):
    def __init__(self, din, hidden, dout, *, rngs):
        self.hidden = nnx.Linear(din, hidden, rngs=rngs)
        self.head = Head(hidden, dout)

    def __call__(self, x):
        return self.head(nnx.relu(self.hidden(x)))


@pytest.fixture(scope="module")
def nnx_mlp():
    """(graphdef, params) of a prepared NNX MLP, our linen MLP's params for it, images and inputs."""
    abstract = nnx.eval_shape(lambda: NNXMLP(144, 16, 10, rngs=nnx.Rngs(0)))  # no initializer compiled
    graphdef, state = nnx.split(intercept.prepare_nnx(abstract))
    state = _fill(state)
    linen = {"Dense_0": {"kernel": state["hidden"]["kernel"][...], "bias": state["hidden"]["bias"][...]},
             "Dense_1": {"kernel": state["head"]["w"][...], "bias": state["head"]["b"][...]}}
    images = _images()
    return graphdef, state, linen, images, to_float(images).reshape(images.shape[0], -1)


def _nnx_apply(graphdef):
    return lambda variables, x: nnx.merge(graphdef, variables["params"])(x)


def test_nnx_mlp_qat_is_our_qat_mlp_bit_for_bit(nnx_mlp):
    graphdef, state, linen, images, x = nnx_mlp
    user = intercept.wrap_apply(_nnx_apply(graphdef), quant=QAT)
    ours = MLP(features=(16,), num_classes=10, quant=QAT)

    @jax.jit
    def run(state, linen, flag):
        user_loss = lambda s: jnp.sum(user({"params": s}, x, quant_enabled=flag) ** 2)  # noqa: E731
        our_loss = lambda p: jnp.sum(ours.apply({"params": p}, images, quant_enabled=flag) ** 2)  # noqa: E731
        return (user({"params": state}, x, quant_enabled=flag),
                ours.apply({"params": linen}, images, quant_enabled=flag),
                jax.grad(user_loss)(state), jax.grad(our_loss)(linen))

    y, y_ref, grads, grads_ref = run(state, linen, jnp.array(True))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(grads["hidden"]["kernel"][...], grads_ref["Dense_0"]["kernel"])
    np.testing.assert_array_equal(grads["head"]["w"][...], grads_ref["Dense_1"]["kernel"])
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))

    # The same model called directly in a `scope` (an NNX training step), not through wrap_apply.
    def direct(state):
        model = nnx.merge(graphdef, state)
        with intercept.scope(quant=QAT):
            return model(x)
    np.testing.assert_array_equal(jax.jit(direct)(state), y)
    assert _untouched()


def test_nnx_mlp_bf16_matches_a_numpy_bf16_reference(nnx_mlp):
    graphdef, state, _, _, x = nnx_mlp
    user = intercept.wrap_apply(_nnx_apply(graphdef), precision=BF16)
    assert _ops(jax.make_jaxpr(user)({"params": state}, x).jaxpr) == [B16, B16]
    y = np.asarray(jax.jit(user)({"params": state}, x))

    # Inputs rounded to bf16, products summed exactly (float64 here, float32 in XLA), the sum
    # rounded to bf16; the bias added in float32 (a plain layer's bias is float32).
    def bf16(a):
        return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(state))
    h = np.maximum(bf16(bf16(x) @ bf16(p["hidden"]["kernel"])) + p["hidden"]["bias"], 0)
    ref = bf16(bf16(h) @ bf16(p["head"]["w"])) + p["head"]["b"]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert np.abs(y - np.asarray(nnx.merge(graphdef, state)(x))).max() > 0  # really not float32


def test_nnx_prepare_changes_nothing_outside_interception_and_is_required(nnx_mlp):
    graphdef, state, _, _, x = nnx_mlp
    plain_graphdef, plain_state = nnx.split(nnx.eval_shape(lambda: NNXMLP(144, 16, 10, rngs=nnx.Rngs(0))))
    assert jax.tree.structure(plain_state) == jax.tree.structure(state)  # the same parameter pytree
    prepared = str(jax.make_jaxpr(_nnx_apply(graphdef))({"params": state}, x))
    assert prepared == str(jax.make_jaxpr(_nnx_apply(plain_graphdef))({"params": state}, x))

    linear = nnx.eval_shape(lambda: nnx.Linear(3, 2, rngs=nnx.Rngs(0)))  # not prepared: nothing to intercept
    lgraph, lstate = nnx.split(linear)
    with pytest.raises(ConfigError, match="prepare_nnx"):
        jax.eval_shape(intercept.wrap_apply(_nnx_apply(lgraph), quant=QAT), {"params": _fill(lstate)},
                       jnp.zeros((2, 3)))
    assert _untouched()


class NNXCNN(nnx.Module):
    """nnx.Conv and nnx.Einsum hold their jax op too (bound at construction)."""

    def __init__(self, *, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.head = nnx.Einsum("bi,io->bo", (6 * 6 * 4, 10), (10,), rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))


def test_nnx_conv_and_einsum_layers_are_reached_after_prepare():
    graphdef, state = nnx.split(intercept.prepare_nnx(nnx.eval_shape(lambda: NNXCNN(rngs=nnx.Rngs(0)))))
    state, x = _fill(state), jnp.zeros((2, 6, 6, 1))
    for cfg, expected in ((dict(precision=BF16), [B16, B16]),
                          (dict(precision=BF16, exclude=["^head$"]), [B16, ("float32",) * 3])):
        wrapped = intercept.wrap_apply(_nnx_apply(graphdef), **cfg)
        assert _ops(jax.make_jaxpr(wrapped)({"params": state}, x).jaxpr) == expected
    assert _untouched()


def test_linen_model_state_passes_through_and_only_the_output_is_cast():
    class WithBatchNorm(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
            return nn.Dense(3, use_bias=False)(x)  # bf16 result: cast to precision.output

    x = jnp.zeros((2, 5))
    variables = jax.eval_shape(WithBatchNorm().init, jax.random.key(0), x)
    wrapped = intercept.wrap_apply(WithBatchNorm().apply, precision=BF16)
    logits, state = jax.eval_shape(lambda v: wrapped(v, x, mutable=["batch_stats"]), variables)
    assert logits.dtype == jnp.float32 and state["batch_stats"]["BatchNorm_0"]["mean"].dtype == jnp.float32
    out16 = intercept.wrap_apply(WithBatchNorm().apply, precision=BF16.model_copy(update={"output": "bfloat16"}))
    assert jax.eval_shape(lambda v: out16(v, x, train=False), variables).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# Scope: nothing requested, nothing changed; other threads unaffected while a call is traced.

def test_nothing_requested_returns_the_apply_function_itself():
    apply = MLP(features=(8,)).apply
    for precision, quant in ((None, None), (PrecisionConfig(), QuantConfig()), (None, QuantConfig(mode="ptq"))):
        assert intercept.wrap_apply(apply, precision, quant) is apply


def test_interception_is_per_thread_and_ends_with_the_call():
    started, release = threading.Event(), threading.Event()

    class Waits(nn.Module):
        @nn.compact
        def __call__(self, x):
            started.set()
            release.wait(30)
            return nn.Dense(2)(x)

    x = _normal((2, 3))
    variables = {"params": {"Dense_0": {"kernel": _normal((3, 2), 1), "bias": jnp.zeros(2)}}}
    traced = {}
    worker = threading.Thread(target=lambda: traced.setdefault(
        "ops", _ops(jax.make_jaxpr(intercept.wrap_apply(Waits().apply, precision=BF16))(variables, x).jaxpr)))
    worker.start()
    try:
        assert started.wait(30)
        assert not _untouched()  # the other thread is inside its wrapped call: dispatchers installed
        here = _ops(jax.make_jaxpr(nn.Dense(2).apply)({"params": variables["params"]["Dense_0"]}, x).jaxpr)
    finally:
        release.set()
        worker.join(30)
    assert here == [F32] and traced["ops"] == [B16]
    assert _untouched()

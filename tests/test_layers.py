"""The models' shared layers (models/layers.py): model.conv=im2col computes what nn.Conv's XLA convolution computes
(forward, gradients, with the precision policy and QAT, the same parameter tree); pooling and crop."""
from __future__ import annotations

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxaccel.config import PrecisionConfig, QuantConfig, model_config
from jaxaccel.models import build_model, im2col_conv


@pytest.mark.parametrize("layout", [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW")])
@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((1, 1), "VALID"), ((2, 1), ((1, 2), (0, 1)))])
def test_im2col_conv_equals_lax_conv(layout, strides, padding):
    rng = np.random.default_rng(0)
    lhs_shape, rhs_shape = ((2, 9, 8, 3), (3, 3, 3, 5)) if layout[0] == "NHWC" else ((2, 3, 9, 8), (5, 3, 3, 2))
    x, w = rng.normal(size=lhs_shape).astype(np.float32), rng.normal(size=rhs_shape).astype(np.float32)
    want = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=layout)
    got = im2col_conv()(x, w, strides, padding, dimension_numbers=layout)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW")])
@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 1), ((1, 2), (0, 1)))])
def test_short_contraction_conv_and_its_gradients_equal_lax_conv(layout, strides, padding):
    """A contraction of <= SMALL_CONTRACTION (a first layer: 3x3 x 1 channel, or 2x2 x 2) takes the
    broadcast multiply-add forward pass; values and both gradients must still be lax.conv's."""
    rng = np.random.default_rng(1)
    for lhs_shape, rhs_shape in ([(3, 10, 9, 1), (3, 3, 1, 4)], [(3, 10, 9, 2), (2, 2, 2, 3)]):
        if layout[0] == "NCHW":
            lhs_shape, rhs_shape = (lhs_shape[0], lhs_shape[3], *lhs_shape[1:3]), (rhs_shape[3], rhs_shape[2], *rhs_shape[:2])
        x, w = rng.normal(size=lhs_shape).astype(np.float32), rng.normal(size=rhs_shape).astype(np.float32)
        cot = None

        def run(conv):
            nonlocal cot
            y, vjp = jax.vjp(lambda x, w: conv(x, w, strides, padding, dimension_numbers=layout), x, w)
            cot = rng.normal(size=y.shape).astype(np.float32) if cot is None else cot
            return y, *vjp(cot)

        want = run(lax.conv_general_dilated)
        got = run(im2col_conv())
        for g, w_ in zip(got, want):
            np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-5)
        jaxpr = str(jax.make_jaxpr(lambda x, w: im2col_conv()(x, w, strides, padding, dimension_numbers=layout))(x, w))
        assert "_small_contraction_conv" in jaxpr  # the path under test was taken


def test_im2col_conv_refuses_dilation():
    x, w = jnp.ones((1, 5, 5, 1)), jnp.ones((3, 3, 1, 1))
    with pytest.raises(NotImplementedError, match="model.conv=xla"):
        im2col_conv()(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _loss_and_grads(model, params, images, labels):
    def loss(p):
        logits = model.apply({"params": p}, images).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), logits
    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, logits, grads


@pytest.mark.parametrize("name,policy", [("cnn", "fp32"), ("cnn", "bf16"), ("cnn", "qat")])
def test_im2col_model_matches_xla_conv_model(mnist, name, policy):
    """Same parameters in, same logits and gradients out (fp32 to float rounding; bf16 and QAT
    within their own rounding, which both lowerings share)."""
    precision = PrecisionConfig(params="bfloat16", compute="bfloat16") if policy == "bf16" else None
    quant = QuantConfig(mode="qat") if policy == "qat" else None
    models = {conv: build_model(model_config(name=name, conv=conv), 10, precision, quant) for conv in ("xla", "im2col")}
    images, labels = mnist.train_inputs[:16], mnist.train_labels[:16].astype(np.int32)
    params = models["xla"].init(jax.random.key(0), images[:1])["params"]
    shapes = lambda p: jax.tree.map(lambda a: (a.shape, a.dtype), p)
    assert shapes(models["im2col"].init(jax.random.key(0), images[:1])["params"]) == shapes(params)
    if policy == "bf16":  # the trainer casts the master weights for the forward pass
        from jaxaccel.precision import cast_params
        params = cast_params(params, precision)
    run = lambda m: jax.jit(lambda p: _loss_and_grads(m, p, images, labels))(params)
    (l_x, y_x, g_x), (l_i, y_i, g_i) = run(models["xla"]), run(models["im2col"])
    # Relative to the norm of each tensor. bf16: both lowerings are 0.5-9% from the f32 gradients
    # (measured), and differ from each other by ~2%; a wrong lowering is off by O(1).
    tol = {"fp32": 1e-5, "bf16": 5e-2, "qat": 1e-3}[policy]
    for want, got in [(y_x, y_i), *zip(jax.tree.leaves(g_x), jax.tree.leaves(g_i))]:
        want, got = np.float32(want), np.float32(got)
        assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want), (policy, want.shape)
    assert abs(float(l_i) - float(l_x)) <= tol * abs(float(l_x))


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_small_cnn_pooling_equals_flax_pooling(kind):
    """The reshape max pool (fast gradient on XLA:CPU) is nn.max_pool, odd sizes included."""
    from jaxaccel.models.layers import pool2
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 6, 3)).astype(np.float32))
    want_fn = lambda x: (nn.avg_pool if kind == "avg" else nn.max_pool)(x, (2, 2), strides=(2, 2))
    np.testing.assert_allclose(pool2(x, kind), want_fn(x), rtol=1e-6)
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) ** 2))(x)
    np.testing.assert_allclose(grad(lambda x: pool2(x, kind)), grad(want_fn), rtol=1e-6)


def test_max_pool_of_relu_has_autodiffs_gradient():
    """d pool(relu(z)) / dz is autodiff's, though the custom gradient skips the tie count: the
    ReLU's zeros tie four ways in most windows here, and relu's gradient is 0 there."""
    from jaxaccel.models.layers import pool2
    z = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 6, 4)).astype(np.float32) - 0.5)
    g = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 3, 4)).astype(np.float32))
    autodiff = lambda x: x.reshape(3, 4, 2, 3, 2, 4).max(axis=(2, 4))
    grad = lambda pool: jax.grad(lambda z: jnp.sum(pool(jax.nn.relu(z)) * g))(z)
    got, want = grad(lambda x: pool2(x, "max")), grad(autodiff)
    assert int(jnp.sum(autodiff(jax.nn.relu(z)) == 0)) > 10  # all-zero windows are really there
    np.testing.assert_array_equal(got, want)
    # The documented difference: an exact positive tie gives each tied input the whole gradient.
    tie = jnp.zeros((1, 2, 2, 1)).at[0, 0, :, 0].set(1.0)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(pool2(x, "max")))(tie)[0, :, :, 0], [[1, 1], [0, 0]])


def test_small_cnn_crop_is_the_central_window():
    """model.crop feeds the central crop x crop pixels to the same layers; too large a crop is a
    clear error naming the fix."""
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(2, 28, 28, 1), dtype=np.uint8))
    cfg = model_config(name="small_cnn", channels=[4, 8], features=[], pool="max")
    cropped, plain = build_model(cfg.model_copy(update={"crop": 20}), 10), build_model(cfg, 10)
    params = cropped.init(jax.random.key(0), images)["params"]
    assert params["Dense_0"]["kernel"].shape == (5 * 5 * 8, 10)  # 20 -> 10 -> 5 pixels
    np.testing.assert_array_equal(cropped.apply({"params": params}, images),
                                  plain.apply({"params": params}, images[:, 4:24, 4:24]))
    with pytest.raises(ValueError, match="model.crop=30 is larger than the 28x28 images"):
        build_model(cfg.model_copy(update={"crop": 30}), 10).init(jax.random.key(0), images)



"""int8 quantization (jaxaccel.precision.quant): fake quant + STE, PTQ, int8 inference. Tiny shapes."""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.config import PrecisionConfig, QuantConfig
from jaxaccel.models import CNN, MLP
from jaxaccel.precision import (
    dequantize, dequantize_params, fake_quant, fake_quant_apply, int8_apply, int8_dense, layer_kwargs, qmax,
    quant_conv_general_dilated, quant_dot_general, quantize, quantize_params)

QAT = QuantConfig(mode="qat")
PTQ = QuantConfig(mode="ptq")


# Test data comes from numpy: compiling jax.random.normal costs ~1 s per shape on this CPU.
def _normal(shape, seed=0, scale=1.0):
    return jnp.asarray(scale * np.random.RandomState(seed).standard_normal(shape), jnp.float32)


def _images(n=4, hw=12, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 256, (n, hw, hw, 1)), jnp.uint8)


def _init(model, x, seed=0):
    """He-scaled random params of ``model``'s shapes without compiling flax's initializers."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    leaves, tree = jax.tree.flatten(shapes)
    fan_in = lambda s: int(np.prod(s[:-1])) if len(s) > 1 else 1
    return jax.tree.unflatten(tree, [_normal(l.shape, seed + i, (2 / fan_in(l.shape)) ** 0.5 if l.ndim > 1 else 0.1)
                                     for i, l in enumerate(leaves)])


def _sparse(shape, seed=0):
    x = np.random.RandomState(seed).standard_normal(shape).astype(np.float32)
    x[np.random.RandomState(seed + 1).rand(*shape) < 0.5] = 0.0
    x[..., 0] = 0.0  # one all-zero output channel: its scale must not be 0/0
    return jnp.asarray(x)


# ---------------------------------------------------------------------------------------------
# Fake quantization.

@pytest.mark.parametrize("bits,axis", [(8, None), (8, -1), (4, None), (4, (0, 2))])
def test_quantize_error_bounded_by_half_scale(bits, axis):
    x = _normal((5, 6, 7), bits)
    q, s, xq, fq = jax.jit(lambda x: (*quantize(x, bits, axis), dequantize(*quantize(x, bits, axis)),
                                      fake_quant(x, bits, axis)))(x)
    q, s, xq, fq, x = map(np.asarray, (q, s, xq, fq, x))
    assert q.dtype == np.int8 and s.dtype == np.float32
    assert np.abs(q).max() == qmax(bits)  # absmax hits the end of the range
    assert np.all(np.abs(xq - x) <= s / 2 * (1 + 1e-6))
    assert np.all(fq == xq)  # fake_quant is exactly dequantize(quantize(x))


def test_fake_quant_preserves_exact_zeros():
    w = _sparse((6, 5))
    wq_t, wq_c, (q, s) = jax.jit(lambda w: (fake_quant(w, 8), fake_quant(w, 8, -1), quantize(w, 8, -1)))(w)
    for wq in (wq_t, wq_c):
        assert bool(jnp.all((wq == 0) == (w == 0)))  # zeros stay zero and nothing else becomes zero
        assert bool(jnp.isfinite(wq).all())
    assert bool(jnp.all((q == 0) == (w == 0))) and float(s[0, 0]) == 1.0


def test_ste_gradient_is_identity_inside_the_range():
    x = _normal((4, 6))
    g = _normal((4, 6), 1)
    scale = jnp.float32(1.0 / qmax(8))  # a fixed scale: range [-1, 1], so some values clip

    @jax.jit
    def grads(x, g):
        absmax = [jax.vjp(lambda v: fake_quant(v, 8, axis), x)[1](g)[0] for axis in (None, -1, 0)]
        return absmax, jax.vjp(lambda v: fake_quant(v, 8, scale=scale), x)[1](g)[0]

    absmax, clipped = grads(x, g)
    for got in absmax:  # absmax scales: every element is inside the range
        assert bool(jnp.all(got == g))
    inside = jnp.abs(x) <= 1.0  # identity inside [-Q s, Q s], zero where the value was clipped
    assert bool(jnp.all(clipped == jnp.where(inside, g, 0.0))) and 0 < int(inside.sum()) < x.size


def test_quant_ops_in_flax_layers_and_composition_with_bf16():
    x, w = _normal((3, 5)), _normal((5, 4), 1)
    xc, wc = _normal((2, 6, 6, 3), 2), _normal((3, 3, 3, 4), 3)
    bf16 = PrecisionConfig(compute="bfloat16", params="bfloat16")
    dense_params = {"params": {"kernel": w, "bias": jnp.zeros(4)}}

    @jax.jit
    def run(flag):
        y = nn.Dense(4, dot_general=quant_dot_general(QAT)).apply(dense_params, x)
        conv = nn.Conv(4, (3, 3), conv_general_dilated=quant_conv_general_dilated(QAT))
        yc = conv.apply({"params": {"kernel": wc, "bias": jnp.zeros(4)}}, xc)
        ref_c = jax.lax.conv_general_dilated(fake_quant(xc), fake_quant(wc, axis=-1), (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        # QAT + bfloat16 policy (quantize, then cast) with a traced enable flag (step >= quant.start).
        y16 = nn.Dense(4, **layer_kwargs("dense", "Dense_0", bf16, QAT, enabled=flag)).apply(dense_params, x)
        return y, fake_quant(x) @ fake_quant(w, axis=-1), yc, ref_c, y16

    for flag in (True, False):
        y, ref, yc, ref_c, y16 = run(jnp.array(flag))
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(yc, ref_c, rtol=1e-5, atol=1e-5)  # per 'O' channel of HWIO
        assert y16.dtype == jnp.bfloat16
        np.testing.assert_allclose(y16.astype(jnp.float32), ref if flag else x @ w, rtol=2e-2, atol=5e-2)
    assert "dot_general" not in layer_kwargs("dense", "Dense_1", None, QAT.model_copy(update={"include": ["Dense_0"]}))


# ---------------------------------------------------------------------------------------------
# PTQ and int8 inference.

def test_quantize_params_tree():
    x = _images(2, 4)
    params = _init(CNN(num_classes=10), x)
    cfg = PTQ.model_copy(update={"include": [r"^Conv_1$", r"^Dense"]})
    tensor_cfg = PTQ.model_copy(update={"weights": "per_tensor"})

    @jax.jit
    def run(params):
        qparams, scales = quantize_params(params, cfg)
        fq = {k: fake_quant(v["kernel"], 8, -1) for k, v in params.items()}
        return qparams, scales, dequantize_params(qparams, scales), fq, quantize_params(params, tensor_cfg)[1]

    qparams, scales, deq, fq, per_tensor = run(params)
    assert qparams["Conv_0"]["kernel"].dtype == jnp.float32  # not included
    for layer in ("Conv_1", "Dense_0", "Dense_1"):
        k = params[layer]["kernel"]
        assert qparams[layer]["kernel"].dtype == jnp.int8 and qparams[layer]["bias"].dtype == jnp.float32
        assert scales[layer]["kernel"].shape == (1,) * (k.ndim - 1) + (k.shape[-1],)  # per output channel
        assert bool(jnp.all(deq[layer]["kernel"] == fq[layer]))
    assert set(scales) == {"Conv_1", "Dense_0", "Dense_1"}
    assert all(s.size == 1 for s in jax.tree.leaves(per_tensor))


def _dot_result_types(hlo: str) -> list[str]:
    return re.findall(r"= (\w+)\[[^\]]*\](?:\{[^}]*\})? (?:dot|convolution)\(", hlo)


@pytest.mark.parametrize("model", [MLP(features=(32, 16), num_classes=10), CNN(num_classes=10)], ids=["mlp", "cnn"])
def test_int8_inference_matches_fake_quant_and_accumulates_in_int32(model):
    x = _images(8, 4)
    params = _init(model, x)

    @jax.jit
    def reference(params):
        return model.apply({"params": params}, x), fake_quant_apply(model, {"params": params}, x, cfg=QAT)

    ref, fq = reference(params)
    qparams, scales = jax.jit(lambda p: quantize_params(p, PTQ))(params)
    lowered = jax.jit(lambda q, s: int8_apply(model, q, s, x, cfg=PTQ)).lower(qparams, scales)
    compiled = lowered.compile()
    i8 = compiled(qparams, scales)
    assert i8.dtype == jnp.float32
    np.testing.assert_array_equal(jnp.argmax(i8, -1), jnp.argmax(fq, -1))
    # Equal up to f32 accumulation order, except where that order moves a later layer's activation
    # across a rounding boundary (one code, ~1e-3 here): most examples agree to 1e-5, all to 1%.
    err = np.abs(np.asarray(i8) - np.asarray(fq)).max(-1) / float(jnp.abs(fq).max())
    assert err.max() < 1e-2 and np.median(err) < 1e-5, err
    assert float(jnp.abs(fq - ref).max()) > 0  # the quantization is really on
    np.testing.assert_allclose(fq, ref, atol=0.1 * float(jnp.abs(ref).max()))

    # The HLO: int8 x int8 -> int32 dots/convs, one per layer, and never an s8-result one (~500x slower).
    ops = re.findall(r"stablehlo\.(?:dot_general|convolution).*?: \((tensor<[^)]*)\) -> tensor<[0-9x]*x(\w+)>",
                     lowered.as_text())
    assert len(ops) == len(scales) and all("xi8>" in a and r == "i32" for a, r in ops), ops
    results = _dot_result_types(compiled.as_text())
    assert len(results) == len(scales) and set(results) == {"s32"}, results


def test_int8_dense_and_weight_only_path():
    x, w, b = _normal((3, 8)), _normal((8, 5), 1), _normal((5,), 2)
    model = MLP(features=(16,), num_classes=4)
    xi = _images(2, 6)
    cfg = PTQ.model_copy(update={"activations": "none"})

    @jax.jit
    def run(params):
        (xq, xs), (wq, ws) = quantize(x), quantize(w, axis=-1)
        dense = (int8_dense(xq, wq, xs, ws, b), dequantize(xq, xs) @ dequantize(wq, ws) + b)
        weight_only = int8_apply(model, *quantize_params(params, cfg), xi, cfg=cfg)
        return dense, (weight_only, model.apply({"params": dequantize_params(*quantize_params(params, cfg))}, xi))

    for got, want in run(_init(model, xi)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# int8 convolutions per backend (XLA:GPU cannot lower s8 x s8 -> s32 convolutions).

def test_int8_conv_result_type_is_chosen_per_platform_at_lowering():
    from jaxaccel.precision import INT8_CONV_RESULT, int8_conv
    assert INT8_CONV_RESULT["cpu"] == INT8_CONV_RESULT["tpu"] == "int32"
    assert INT8_CONV_RESULT["cuda"] == INT8_CONV_RESULT["rocm"] == "float32"
    args = (jax.ShapeDtypeStruct((2, 9, 9, 3), jnp.int8), jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.int8),
            jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((5,), jnp.float32))
    traced = jax.jit(int8_conv).trace(*args)
    for platform, want in (("cpu", "i32"), ("tpu", "i32"), ("cuda", "f32"), ("rocm", "f32")):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        convs = re.findall(r"stablehlo\.convolution.*: \(tensor<[^)]*xi8>, tensor<[^)]*xi8>\) -> tensor<[0-9x]*x(\w+)>",
                           text)
        assert convs == [want], (platform, convs)


def test_int8_inference_on_cpu_is_bit_identical_to_the_int32_convolution(monkeypatch):
    """The per-platform choice costs nothing on CPU: the same numbers as the plain s32 conv it
    was before, eager and compiled, and no conditional left in the executable."""
    from jaxaccel.precision import quant
    model = CNN(num_classes=10)
    x = _images(8, 12)
    qparams, scales = quantize_params(_init(model, x), PTQ)
    fn = lambda q, s: int8_apply(model, q, s, x, cfg=PTQ)  # noqa: E731
    compiled = jax.jit(fn).lower(qparams, scales).compile()
    assert "conditional" not in compiled.as_text()
    got = (np.asarray(compiled(qparams, scales)), np.asarray(fn(qparams, scales)))

    def int32_conv(x_q, w_q, *args, **kw):
        return jax.lax.conv_general_dilated(x_q, w_q, *args, preferred_element_type=jnp.int32, **kw).astype(jnp.float32)

    monkeypatch.setattr(quant, "int8_conv_accumulate", int32_conv)
    np.testing.assert_array_equal(got[0], np.asarray(jax.jit(fn)(qparams, scales)))
    np.testing.assert_array_equal(got[1], np.asarray(fn(qparams, scales)))

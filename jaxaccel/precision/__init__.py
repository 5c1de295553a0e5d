"""Low precision and quantization: the dtype policy, loss scaling, int8 QAT/PTQ/inference, and
both for unmodified linen/NNX models (:mod:`jaxaccel.precision.intercept`).

See NOTES.md for the design and the measurements behind it.
"""
from jaxaccel.precision.loss_scale import (
    LossScaleState, NonFiniteError, all_finite, current_scale, dynamic_loss_scale, loss_scaling,
    nonfinite_guard, nonfinite_steps, raise_if_diverged, resolve_mode, scale_loss, static_loss_scale,
    with_precision)
from jaxaccel.precision.policy import (
    DTYPES, Policy, cast_output, cast_params, check_backend, conv_general_dilated, conv_kwargs, dense_kwargs,
    dot_general)
from jaxaccel.precision.quant import (
    INT8_CONV_RESULT, absmax_scale, dequantize, dequantize_params, fake_quant, fake_quant_apply, fake_quant_operands,
    int8_apply, int8_conv, int8_conv_accumulate, int8_conv_general_dilated, int8_dense, int8_dot_general,
    layer_kwargs, qmax, quant_conv_general_dilated, quant_dot_general, quantize, quantize_params)
from jaxaccel.precision import intercept  # noqa: E402  (after policy/quant, which it uses)
from jaxaccel.precision.intercept import prepare_nnx, wrap_apply

__all__ = [
    "LossScaleState", "NonFiniteError", "all_finite", "current_scale", "dynamic_loss_scale", "loss_scaling",
    "nonfinite_guard", "nonfinite_steps", "raise_if_diverged", "resolve_mode", "scale_loss", "static_loss_scale",
    "with_precision",
    "DTYPES", "Policy", "cast_output", "cast_params", "check_backend", "conv_general_dilated", "conv_kwargs",
    "dense_kwargs", "dot_general",
    "INT8_CONV_RESULT", "absmax_scale", "dequantize", "dequantize_params", "fake_quant", "fake_quant_apply", "int8_apply", "int8_conv",
    "int8_conv_accumulate", "int8_conv_general_dilated", "int8_dense", "int8_dot_general", "layer_kwargs", "qmax",
    "quant_conv_general_dilated", "quant_dot_general", "quantize", "quantize_params", "fake_quant_operands",
    "intercept", "prepare_nnx", "wrap_apply",
]

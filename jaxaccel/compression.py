"""The compression report: size and test accuracy of the final model in each storage form.

    dense_fp32   every parameter as float32 (model_bytes)
    sparse       kernels in their smallest exact sparse form (same predictions as dense_fp32)
    int8         kernels as dense int8 + float32 scales, run with int32 accumulation
    sparse_int8  int8 values in the sparse forms + scales (what a quantized run exports)

Sizes are the bytes of the arrays each form stores; accuracies are measured on the test split by
running each form (int8 through :func:`jaxaccel.precision.int8_apply`), never copied.

The report runs after training, so it must never cost the run its ``summary.json``: a form that
cannot be compiled or run on this backend (an XLA error, running out of device memory) keeps its
size, gets ``"accuracy": null`` and says why in ``"unavailable"``.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxaccel import precision as prec
from jaxaccel.config import QuantConfig
from jaxaccel.export import compress_params, flatten_params
from jaxaccel.sparsity import export as sparse_export

__all__ = ["report"]


def _accuracy(predict, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    correct = sum(int(np.sum(np.argmax(np.asarray(predict(images[i:i + batch])), -1) == labels[i:i + batch]))
                  for i in range(0, len(labels), batch))
    return correct / len(labels)


def _measure(predict, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """``{"accuracy": ...}``, or ``{"accuracy": None, "unavailable": reason}`` when the form cannot
    run here. Any exception counts: the model is already trained and exported by now."""
    try:
        return {"accuracy": _accuracy(predict, images, labels)}
    except Exception as e:  # noqa: BLE001 - see the module docstring
        first_line = (str(e).strip().splitlines() or [""])[0]
        reason = f"{type(e).__name__}: {first_line}"
        return {"accuracy": None, "unavailable": f"does not run on {jax.default_backend()}: {reason[:300]}"}


def report(params: Any, model, images: np.ndarray, labels: np.ndarray, quant: QuantConfig) -> dict[str, Any]:
    """Bytes and test accuracy per form; ``model`` is the plain (float, no QAT) flax module and
    ``quant`` the quantization to use for the int8 forms (the run's, else default PTQ)."""
    quant = quant if quant.mode != "none" else QuantConfig(mode="ptq")
    qdict = quant.model_dump()
    # Parameters are arguments, not closed-over constants: the compiled functions then depend on
    # shapes only, so the persistent compilation cache serves them to the next run.
    float_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    float_acc = _measure(lambda x: float_fn(params, x), images, labels)
    qparams, scales = prec.quantize_params(params, quant)
    int8_fn = jax.jit(lambda q, s, x: prec.int8_apply(model, q, s, x, cfg=quant))
    int8_acc = _measure(lambda x: int8_fn(qparams, scales, x), images, labels)
    dense_int8 = (sum(v.nbytes for v in flatten_params(qparams).values())
                  + sum(np.asarray(s).nbytes for s in jax.tree.leaves(scales)))
    dense_bytes = sum(np.asarray(p).nbytes for p in jax.tree.leaves(params))
    return {
        "dense_fp32": {"bytes": int(dense_bytes), **float_acc},
        "sparse": {"bytes": sparse_export.nbytes(compress_params(params, None)[0]), **float_acc},
        "int8": {"bytes": int(dense_int8), **int8_acc},
        "sparse_int8": {"bytes": sparse_export.nbytes(compress_params(params, qdict)[0]), **int8_acc},
    }


"""Evaluation on the test split: one compiled call per evaluation batch, sums kept on device."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxaccel import step as step_lib

__all__ = ["Evaluator", "pad_to"]


def pad_to(inputs: np.ndarray, labels: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inputs, labels, weights)`` padded with weight-0 examples to a multiple of ``multiple``."""
    n = inputs.shape[0]
    pad = -n % multiple
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return (np.concatenate([inputs, np.zeros((pad, *inputs.shape[1:]), inputs.dtype)]),
            np.concatenate([labels, np.zeros(pad, labels.dtype)]), weights)


class Evaluator:
    """Test-split loss and accuracy of a train state, with ``apply_fn`` (a model whose lowering
    suits calls outside device loops) over the split padded to ``batch_size``."""

    def __init__(self, apply_fn, batch_size: int, parallel: Any, test: tuple[np.ndarray, np.ndarray],
                 serialize_calls: bool):
        self.batch_size, self.parallel, self.serialize_calls = batch_size, parallel, serialize_calls
        self.apply_fn = apply_fn
        self.test = tuple(parallel.replicate(a) for a in pad_to(*test, batch_size))

    def compile(self, state) -> None:
        fn = step_lib.make_eval(self.apply_fn, self.batch_size, self.parallel.batch_sharding, self.parallel.axis_name)
        self.one = self.parallel.compile(fn, (state.variables(), *self.test, np.int32(0)), donate=False)

    def __call__(self, state) -> dict[str, float]:
        """{"accuracy", "loss"} of ``state`` on the test split."""
        sums = []
        for i in range(self.test[1].shape[-1] // self.batch_size):  # labels: [N] or [devices, N]
            sums.append(self.one(state.variables(), *self.test, np.int32(i)))
            if self.serialize_calls:  # one multi-device call in flight at a time (see setup.py)
                jax.block_until_ready(sums[-1])
        total = self.parallel.host(jax.tree.map(lambda *x: sum(x), *sums))
        return {"accuracy": float(total["correct"] / total["count"]), "loss": float(total["loss_sum"] / total["count"])}

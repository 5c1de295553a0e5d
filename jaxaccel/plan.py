"""The step arithmetic of a run, and the measured per-backend defaults it is built from.

Everything here is a pure function of the config, the dataset size and the backend's name, so the
same plan is made for a real run and for an ahead-of-time compile of it. The measurements behind
each default are in benchmarks/README.md ("Step groups and loops", "Epoch speed").
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxaccel import precision as prec
from jaxaccel.config import Config, ConfigError

__all__ = ["Plan", "make_plan", "default_loop", "default_conv", "default_guard", "with_conv", "compiler_options"]

# XLA:CPU's convolutions lose their fast kernels inside a device loop, so the MNIST CNNs with
# model.conv=xla run as unrolled blocks of 10 steps (as fast as 20, half the compile time).
_CPU_XLA_CONV_LOOP = ("unroll", 10)
_UNROLLED_WITH_XLA_CONV = ("cnn", "small_cnn")
# XLA:CPU's YNNPACK fusions cost more than the dense fp32 MLP's small dots take; measured for
# that model only, so only it opts out.
_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def default_conv(conv: str, backend: str) -> str:
    """``model.conv=auto``: im2col where it was measured faster (XLA:CPU, also inside device loops);
    XLA's own convolution elsewhere (cuDNN on GPU, the MXU on TPU, where im2col's 9x patch tensors
    would only cost memory and bandwidth)."""
    if conv != "auto":
        return conv
    return "im2col" if backend == "cpu" else "xla"


def with_conv(model_cfg: Any, conv: str) -> Any:
    """``model_cfg`` with its convolution lowering set to ``conv`` (unchanged for models without one)."""
    if "conv" not in type(model_cfg).model_fields:
        return model_cfg
    return model_cfg.model_copy(update={"conv": conv})


def default_guard(cfg: Config, backend: str) -> str:
    """``precision.guard=auto``: the rollback guard on CPU without loss scaling (the per-step
    selects made XLA:CPU copy the optimizer state every step); the per-step guard with loss scaling
    (fp16's dynamic scale overflows by design) and off CPU (no copies to save there, and rollback
    costs a copy of the state in device memory and a host read per group)."""
    if cfg.precision.guard != "auto":
        return cfg.precision.guard
    from_loss_scaling = prec.resolve_mode(cfg.precision) != "none"
    return "rollback" if backend == "cpu" and not from_loss_scaling else "step"


def default_loop(model_name: str, backend: str, conv: str = "xla") -> tuple[str, int | None]:
    """The measured default ``(loop, steps_per_call)`` for a model and conv lowering on a backend."""
    if backend == "cpu" and model_name in _UNROLLED_WITH_XLA_CONV and conv == "xla":
        return _CPU_XLA_CONV_LOOP
    return ("device_loop", None)


def compiler_options(cfg: Config, backend: str) -> dict | None:
    """Measured XLA compiler options for the training steps of ``cfg`` on a backend (None: XLA's)."""
    dense_fp32 = (cfg.precision.params == cfg.precision.compute == "float32" and cfg.quant.mode == "none"
                  and cfg.sparsity.method == "none" and cfg.sparsity.threshold == 0.0)
    return _NO_YNN if backend == "cpu" and cfg.model.name == "mlp" and dense_fp32 else None


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a run's steps are grouped into compiled calls, all derived from the config."""
    steps_per_epoch: int
    total_steps: int
    loop: str                   # "device_loop" (one compiled loop) or "unroll"
    steps_per_call: int | None  # steps of one unrolled block, or the cap of a device-loop call
    log_every: int
    checkpoint_every: int
    conv: str = "im2col"        # how convolutions are lowered (model.conv resolved for the backend)
    guard: str = "rollback"     # "rollback" or "step" (precision.guard resolved for the backend)
    # Device loops with the trip count compiled in (see call_lengths): off CPU a loop whose count
    # is a runtime value reads its predicate back to the host every iteration.
    static_trip_count: bool = False
    # Steps at which a model surgeon may change the model's shapes (jaxaccel.surgery): each ends a group.
    surgery_points: tuple[int, ...] = ()

    def group_lengths(self, start: int = 0) -> list[int]:
        """The distinct step-group lengths from ``start`` to the end."""
        lengths, step = set(), start
        while step < self.total_steps:
            end = self.next_boundary(step)
            lengths.add(end - step)
            step = end
        return sorted(lengths)

    def call_lengths(self, count: int) -> list[int]:
        """The steps of each compiled call of a group of ``count`` steps, in order. A device loop
        with a runtime count: one call. With the trip count compiled in: the binary decomposition of
        ``count``, largest first (the measurement sums carried from call to call), so a run compiles
        one loop per power of two it uses, at most log2(longest group) + 1, instead of one per
        distinct group length (15 for ``mnist_sparse``, each a ~30 s XLA:TPU compile). Unrolled:
        blocks of ``steps_per_call`` then single steps."""
        if self.loop == "device_loop":
            if not self.static_trip_count:
                return [count]
            return [1 << bit for bit in reversed(range(count.bit_length())) if count >> bit & 1]
        k = self.steps_per_call
        return [k] * (count // k) + [1] * (count % k)

    def compiled_lengths(self, start: int = 0) -> list[int]:
        """The distinct call lengths of the groups from ``start`` on: the static loops a run compiles."""
        return sorted({n for count in self.group_lengths(start) for n in self.call_lengths(count)})

    def next_boundary(self, step: int) -> int:
        """Where the step group starting at ``step`` ends: the next log point of the epoch, epoch
        end, checkpoint multiple, surgery point or the last step. A pure function of ``step``, so a resumed run
        groups its steps exactly as an uninterrupted one."""
        epoch_start = step - step % self.steps_per_epoch
        pos = step - epoch_start
        candidates = [epoch_start + (pos // self.log_every + 1) * self.log_every,
                      epoch_start + self.steps_per_epoch,
                      (step // self.checkpoint_every + 1) * self.checkpoint_every,
                      self.total_steps]
        if self.loop == "device_loop" and self.steps_per_call:
            candidates.append(step + self.steps_per_call)
        candidates += [p for p in self.surgery_points if p > step][:1]
        return min(candidates)


def make_plan(cfg: Config, num_train: int, backend: str) -> Plan:
    """The plan of ``cfg`` over a training split of ``num_train`` examples on ``backend``."""
    batch = cfg.train.batch_size
    if batch > num_train:
        raise ConfigError(f"train.batch_size={batch} is larger than the training split ({num_train} examples)")
    steps_per_epoch = num_train // batch  # the last partial batch is dropped; each epoch reshuffles
    conv = default_conv(getattr(cfg.model, "conv", "auto"), backend)
    loop, per_call = default_loop(cfg.model.name, backend, conv)
    if cfg.train.loop != "auto":
        loop = cfg.train.loop
        per_call = cfg.train.steps_per_call or (None if loop == "device_loop" else 10)
    elif cfg.train.steps_per_call:
        per_call = cfg.train.steps_per_call
    return Plan(steps_per_epoch, cfg.train.steps or cfg.train.epochs * steps_per_epoch, loop, per_call,
                cfg.train.log_every_steps, cfg.checkpoint.every_steps, conv=conv, guard=default_guard(cfg, backend),
                static_trip_count=loop == "device_loop" and backend != "cpu")

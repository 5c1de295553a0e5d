"""The config sections that are the same whatever the model and sparsity method: data, train,
optim, augment, checkpoint, parallel, distributed, init, precision, quant and lowrank.

:mod:`jaxaccel.config` assembles them with the ``model`` and ``sparsity`` unions into the
:class:`~jaxaccel.config.Config` and re-exports them; import them from there.
"""
from __future__ import annotations

import re
from typing import Literal, Optional, Union

import numpy as np
import pydantic
from pydantic import Field, StrictInt

from jaxaccel.durations import MAX_STEPS, Duration, describe
from jaxaccel.precision.loss_scale import resolve_mode
from jaxaccel.schema import ConfigError, PositiveInt, Regexes, Section, _compiles

__all__ = ["DataConfig", "TrainConfig", "OptimConfig", "AugmentConfig", "CheckpointConfig", "ParallelConfig",
           "DistributedConfig", "InitConfig", "PrecisionConfig", "QuantConfig", "LowRankConfig"]


class DataConfig(Section):
    name: str = Field("mnist", description="TFDS dataset name (mnist, fashion_mnist, cifar10, ag_news_subset, "
                                           "imdb_reviews, speech_commands).")
    dir: Optional[str] = Field(None, description="TFDS data dir; default $TFDS_DATA_DIR, else TFDS's default.")
    cache_dir: Optional[str] = Field(
        None, description="Where decoded arrays are cached; default $JAXACCEL_CACHE_DIR or ~/.cache/jaxaccel.")
    max_length: Optional[PositiveInt] = Field(
        None, description="Text: tokens per example (default 128); audio: samples per example "
                          "(default 16000, 1 s at 16 kHz). Longer inputs are cut, shorter padded with 0.")
    # The input pipeline (jaxaccel.streaming, jaxaccel.feed).
    pipeline: Literal["auto", "resident", "stream"] = Field(
        "auto", description="resident: the decoded splits cached on disk and held on every device (fastest when "
                            "they fit); stream: records read and decoded on the fly by Grain, each process only its "
                            "rows of every batch; auto: resident when the decoded splits fit "
                            "data.device_budget_bytes, else stream. Both give the same losses and parameters.")
    device_budget_bytes: Optional[PositiveInt] = Field(
        None, description="Device memory a resident dataset may take (per device); null = a per-backend "
                          "default (40% of an accelerator's memory; a quarter of host RAM over the CPU devices).")
    workers: Optional[PositiveInt] = Field(
        None, description="stream: decoding threads per process (Grain ReadOptions); null = the CPU count, at most 16.")
    worker_processes: StrictInt = Field(
        0, ge=0, description="stream: Grain worker processes per process (each with data.workers threads); 0 = "
                             "threads in the training process only.")


class TrainConfig(Section):
    epochs: StrictInt = Field(10, ge=1, le=MAX_STEPS, description="Training length in epochs (ignored when steps is set).")
    steps: Optional[StrictInt] = Field(None, ge=1, le=MAX_STEPS, description="Training length in steps; overrides epochs.")
    batch_size: PositiveInt = Field(128, description="Global batch size.")
    eval_batch_size: PositiveInt = Field(1000, description="Batch size for evaluation.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the cross-entropy targets.")
    steps_per_call: Optional[PositiveInt] = Field(
        None, description="Training steps per compiled call; null = the measured default for model and backend.")
    loop: Literal["auto", "device_loop", "unroll"] = Field(
        "auto", description="How steps_per_call steps are compiled: a device loop (lax.fori_loop) or unrolled; auto = the measured default for model and backend.")
    log_every_steps: PositiveInt = Field(100, description="Period of training lines in metrics.jsonl.")
    tensorboard: Optional[bool] = Field(
        None, description="TensorBoard event files beside metrics.jsonl: null = when tensorboardX is installed, true = required, false = never.")


class OptimConfig(Section):
    name: Literal["sgd", "momentum", "nesterov", "adam", "adamw"] = "adam"
    learning_rate: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    schedule: Literal["constant", "cosine", "warmup_cosine", "onecycle"] = "constant"
    warmup: Duration = Field(0, description="schedule=warmup_cosine: length of the linear warm-up (a duration).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Momentum of momentum/nesterov.")
    b1: float = Field(0.9, ge=0.0, lt=1.0)
    b2: float = Field(0.999, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled (adamw) or L2-added (others) weight decay.")
    grad_clip_norm: Optional[float] = Field(None, gt=0.0, description="Clip gradients to this global norm.")

    @pydantic.model_validator(mode="after")
    def _warmup_needs_its_schedule(self) -> "OptimConfig":
        if self.schedule != "warmup_cosine" and self.differs_from_default("warmup"):
            raise ValueError(f"warmup does nothing for schedule={self.schedule}: use schedule=warmup_cosine or leave "
                             "it at the default (warmup=0)")
        return self

    def check_run(self, total_steps: int, given: "OptimConfig") -> None:
        if self.schedule == "warmup_cosine" and self.warmup >= total_steps:
            raise ConfigError(f"{describe('optim.warmup', given.warmup, self.warmup)} is the whole {total_steps}-step "
                              "run: the learning rate would never decay. Use a shorter warm-up (e.g. '5%')")


class AugmentConfig(Section):
    """Random image augmentation inside the compiled train step (off by default)."""
    crop_padding: StrictInt = Field(0, ge=0, description="Pad by this many zero pixels, then crop back at a random offset.")
    flip: bool = Field(False, description="Flip left-right with probability 1/2.")
    rotate_degrees: float = Field(0.0, ge=0.0, le=180.0, description="Rotate by a uniform angle in [-d, d] degrees.")
    scale: float = Field(0.0, ge=0.0, lt=1.0, description="Zoom by a uniform factor in [1-s, 1+s].")

    @property
    def enabled(self) -> bool:
        return bool(self.crop_padding or self.flip or self.rotate_degrees or self.scale)


class CheckpointConfig(Section):
    every_steps: PositiveInt = Field(1000, description="Checkpoint period in steps (and one at the end).")
    max_to_keep: PositiveInt = 2
    fallback: bool = Field(False, description="If the latest checkpoint cannot be read, restore the previous one (and say so).")


class ParallelConfig(Section):
    mode: Literal["jit", "pmap"] = Field(
        "jit", description="jit: Mesh + NamedSharding; pmap: explicit collectives (jax.shard_map), replicated state.")
    fsdp: bool = Field(False, description="jit only: shard parameters and optimizer state over the data axis too (FSDP).")
    fsdp_size: Optional[PositiveInt] = Field(
        None, description="Devices each FSDP-sharded leaf is split over (the mesh's fsdp axis); the rest form "
                          "the data axis. Default: one TPU slice or one host, so data parallelism runs across "
                          "slices/hosts; all devices when there is one.")
    check_replicas: bool = Field(
        True, description="At each evaluation, check that replicated state (masks, loss scale, params) is bit-identical on every device and process.")

    @pydantic.model_validator(mode="after")
    def _fsdp_needs_jit(self) -> "ParallelConfig":
        if self.fsdp and self.mode != "jit":
            raise ValueError("fsdp=true shards state over a Mesh: use parallel.mode=jit (pmap keeps a full copy per device)")
        return self


class DistributedConfig(Section):
    coordinator: Optional[str] = Field(None, description="host:port of process 0, as jax.distributed.initialize takes it.")
    num_processes: Optional[PositiveInt] = None
    process_id: Optional[StrictInt] = Field(None, ge=0)
    init_timeout_seconds: Optional[PositiveInt] = Field(
        None, description="Give up (with an error) if the peers are not all up by then; default: JAX's (300 s).")
    heartbeat_timeout_seconds: Optional[PositiveInt] = Field(
        None, description="A peer silent this long is dead: the others stop with an error; default: JAX's (100 s).")


class InitConfig(Section):
    from_: Optional[str] = Field(None, alias="from", description="Run dir, checkpoint or export to start from (fine-tuning).")
    include: Regexes = Field([".*"], description="Regexes over parameter names (jaxaccel.paths) loaded from init.from; the rest is re-initialized.")
    freeze: Regexes = Field([], description="Regexes over parameter names that get zero updates (left bit-identical by training).")
    pretrain: Optional[str] = Field(
        None, description="When init.from is unset: 'EXPERIMENT [key=value ...]' trained first into <workdir>/pretrained, then started from.")

    @pydantic.model_validator(mode="after")
    def _needs_source(self) -> "InitConfig":
        if self.include != [".*"] and self.from_ is None and self.pretrain is None:
            raise ValueError("include chooses what init.from loads: set init.from (or init.pretrain)")
        return self


_DTYPE = Literal["float32", "bfloat16", "float16"]
_F32_MAX = float(np.finfo(np.float32).max)  # the loss scale is a float32 in the optimizer state


class PrecisionConfig(Section):
    params: _DTYPE = Field("float32", description="Dtype parameters are cast to for compute (master weights stay float32).")
    compute: _DTYPE = Field("float32", description="Dtype of activations and matmul inputs.")
    output: _DTYPE = Field("float32", description="Dtype of the logits (loss and softmax are always float32).")
    accumulation: _DTYPE = Field("float32", description="Dot/conv accumulation dtype (preferred_element_type).")
    include: Regexes = Field([".*"], description="Regexes over parameter names that get the low-precision treatment.")
    loss_scale: Literal["auto", "none", "static", "dynamic"] = Field("auto", description="auto: dynamic for float16, none otherwise.")
    loss_scale_init: float = Field(2.0 ** 15, gt=0.0, le=_F32_MAX, description="The static scale, or where the dynamic one starts.")
    loss_scale_min: float = Field(1.0, gt=0.0, le=_F32_MAX, description="Floor of the dynamic scale.")
    loss_scale_max: float = Field(2.0 ** 24, gt=0.0, le=_F32_MAX, description="Ceiling of the dynamic scale.")
    loss_scale_period: PositiveInt = Field(2000, description="Finite steps before the dynamic scale grows.")
    loss_scale_factor: float = Field(2.0, gt=1.0)
    max_nonfinite_steps: PositiveInt = Field(10, description="Stop after this many consecutive non-finite steps.")
    guard: Literal["auto", "step", "rollback"] = Field(
        "auto", description="How non-finite steps are skipped. step: every step tests its gradients and a "
        "non-finite one leaves the state untouched. rollback: the same steps skipped, faster: a step group runs "
        "untested from a copy of its start state and is rerun with the per-step test only if it met a "
        "non-finite loss or state (one extra copy of the state in memory, one host read per group). auto: "
        "rollback on CPU without loss scaling (where the per-step selects cost copies), step otherwise.")

    @pydantic.model_validator(mode="after")
    def _scale_range(self) -> "PrecisionConfig":
        if self.loss_scale_min > self.loss_scale_max:
            raise ValueError(f"loss_scale_min={self.loss_scale_min:g} is above loss_scale_max={self.loss_scale_max:g}: "
                             "the floor of the dynamic scale must not exceed its ceiling")
        if resolve_mode(self) == "dynamic" and not self.loss_scale_min <= self.loss_scale_init <= self.loss_scale_max:
            raise ValueError(f"loss_scale_init={self.loss_scale_init:g} is outside [loss_scale_min, loss_scale_max] = "
                             f"[{self.loss_scale_min:g}, {self.loss_scale_max:g}], where the dynamic scale lives: "
                             "start it inside (2^15 is the usual start; a float16 backward pass overflows far below "
                             "1e30) or move the bounds")
        return self


class QuantConfig(Section):
    mode: Literal["none", "qat", "ptq"] = Field("none", description="qat: fake-quant training (STE); ptq: quantize after training.")
    bits: StrictInt = Field(8, ge=2, le=8)
    weights: Literal["per_channel", "per_tensor"] = Field("per_channel", description="Weight scale granularity (symmetric absmax).")
    activations: Literal["per_tensor", "none"] = Field("per_tensor", description="Activation scale granularity.")
    include: Regexes = Field([r".*"], description="Regexes over layer names to quantize.")
    start: Duration = Field(0, description="QAT: when fake quantization switches on (a duration).")

    @pydantic.model_validator(mode="after")
    def _start_needs_qat(self) -> "QuantConfig":
        if self.mode != "qat" and self.differs_from_default("start"):
            raise ValueError(f"start does nothing for mode={self.mode} (it is when QAT's fake quantization switches "
                             "on): leave it at the default (start=0)")
        return self

    def check_run(self, total_steps: int, given: "QuantConfig") -> None:
        if self.mode == "qat" and self.start > total_steps - 1:
            raise ConfigError(f"{describe('quant.start', given.start, self.start)} is at or after the end of this "
                              f"{total_steps}-step run: fake quantization would never switch on. Start earlier or "
                              "train longer")


class LowRankConfig(Section):
    """Low-rank factorization (jaxaccel.lowrank): selected kernels W (m x n) become U (m x r) @ V (r x n)."""
    rank: Optional[Union[PositiveInt, dict[str, PositiveInt]]] = Field(
        None, description="Rank r of every selected kernel, or {regex: rank} over parameter names (the first "
                          "matching regex gives a kernel its rank).")
    energy: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="Instead of rank: the smallest r keeping this fraction of the kernel's "
                                          "squared singular values (e.g. 0.9).")
    # The Dense kernels by default (what it picked before the CNNs' convolutions became factorable).
    include: Regexes = Field([r"^Dense_\d+/kernel$"], description="Regexes over parameter names (jaxaccel.paths) to "
                             "factor: the Dense kernels by default; Conv_i/kernel selects a convolution of cnn/small_cnn.")
    exclude: Regexes = Field([], description="Regexes excluded from factoring.")
    at: Optional[Duration] = Field(
        None, description="When the trained kernels are factored by truncated SVD (a duration); the optimizer "
                          "state is re-initialised for the factors.")
    from_start: bool = Field(False, description="Train the factors from initialisation at lowrank.rank instead.")

    @property
    def enabled(self) -> bool:
        return self.rank is not None or self.energy is not None

    @pydantic.field_validator("rank")
    @classmethod
    def _rank_regexes(cls, rank: Union[int, dict[str, int], None]) -> Union[int, dict[str, int], None]:
        if isinstance(rank, dict):
            if not rank:
                raise ValueError("rank={} gives no kernel a rank: give an integer or {regex: rank}")
            _compiles(list(rank))
        return rank

    @pydantic.model_validator(mode="after")
    def _one_plan(self) -> "LowRankConfig":
        if self.rank is not None and self.energy is not None:
            raise ValueError("rank and energy both choose the rank: set one of them")
        when = self.at is not None or self.from_start
        if not self.enabled and (when or self.differs_from_default("include", "exclude")):
            raise ValueError("lowrank needs the rank of the factors: set lowrank.rank (or lowrank.energy)")
        if self.enabled and not when:
            raise ValueError("lowrank needs when to factor: set lowrank.at (a duration, e.g. '30%') or "
                             "lowrank.from_start=true")
        if self.from_start and self.at is not None:
            raise ValueError("from_start=true trains factors from initialisation, at= factors trained kernels: "
                             "set one of them")
        if self.from_start and self.energy is not None:
            raise ValueError("energy needs a trained kernel's singular values; from_start=true has none: "
                             "use lowrank.rank with from_start=true")
        return self

    def check_run(self, total_steps: int, given: "LowRankConfig") -> None:
        if self.at is not None and not 0 < self.at < total_steps:
            raise ConfigError(f"{describe('lowrank.at', given.at, self.at)} leaves no training "
                              f"{'before' if self.at == 0 else 'after'} the factorization in this {total_steps}-step "
                              "run: factor within the run (e.g. lowrank.at='30%'), or use lowrank.from_start=true")

    def rank_of(self, name: str) -> int | None:
        """The rank ``lowrank.rank`` gives the kernel ``name`` (None: energy decides, or no regex matches)."""
        if isinstance(self.rank, dict):
            return next((r for pattern, r in self.rank.items() if re.search(pattern, name)), None)
        return self.rank

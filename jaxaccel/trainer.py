"""The training loop: ``train(cfg) -> summary``. One readable file, in sections.

Setup (distributed runtime, compilation cache, mesh) -> data on device -> model and state ->
resume -> compile -> loop over step groups (log, evaluate, checkpoint) -> final evaluation,
checkpoint, export and summary.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel import compression
from jaxaccel import data as data_lib
from jaxaccel import durations
from jaxaccel import export as export_lib
from jaxaccel import finetune
from jaxaccel import precision as prec
from jaxaccel import sparsity
from jaxaccel import step as step_lib
from jaxaccel.checkpoint import Checkpointer
from jaxaccel.config import Config, ConfigError
from jaxaccel.metrics import MetricsWriter, Progress, tensorboard_enabled
from jaxaccel.models import build_model, input_problem
from jaxaccel.optim import freeze, make_optimizer
from jaxaccel.precision import NonFiniteError
from jaxaccel.runtime import DistributedError, Preempted, PreemptionNotice, fault_point, init_distributed
from jaxaccel.parallel import ReplicaMismatch, local_copy, make_parallel

__all__ = ["train", "NonFiniteError", "Preempted", "DistributedError", "ReplicaMismatch", "default_loop"]


# Measured with XLA:CPU (benchmarks/README.md): XLA's convolutions lose their fast kernels inside a
# device loop (the CNN ran 13-14x slower), so the MNIST CNNs with model.conv=xla run unrolled blocks;
# 10 steps run as fast as 20 and compile in half the time. Everything else (the MLP, convolutions
# lowered to im2col dots) is fastest as a device loop (unrolling only adds compile time). The
# application models (resnet, text_cnn, kws_cnn) use XLA's convolutions but run a device loop too:
# their step speed is not measured (no data here), and unrolling 10 ResNet steps compiled in 190 s
# against 16 s (4-channel ResNet-8, under load); train.loop=unroll is there to try.
_CPU_XLA_CONV_LOOP = ("unroll", 10)
_DATA_STREAM = 1  # with (seed, epoch), seeds the data order; init and step keys are streams 0 and 2
_UNROLLED_WITH_XLA_CONV = ("cnn", "small_cnn")


# XLA:CPU (jaxlib 0.10.2) runs dots and reductions as YNNPACK fusions, whose thread-pool hand-off
# costs more than small ops take: LeNet-300-100's 128x300x100 and 128x100x10 forward dots took
# 0.15 and 0.12 ms a step (Eigen: 0.07 ms for the same size). Without YNN fusions the dense fp32
# MLP's device loop ran 12% faster (bare epoch 0.528-0.537 vs 0.602-0.611 s); the CNN was unchanged.
# Only what was measured opts out: the dense fp32 MLP. bf16 (Eigen has no fast bf16 dot), sparse and
# QAT variants were not shown faster, so they keep the defaults (benchmarks/README.md).
_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(cfg: Config, backend: str) -> dict | None:
    """Measured XLA compiler options for the training steps of ``cfg`` on a backend (None: defaults)."""
    dense_fp32 = (cfg.precision.params == cfg.precision.compute == "float32" and cfg.quant.mode == "none"
                  and cfg.sparsity.method == "none" and cfg.sparsity.threshold == 0.0)
    return _NO_YNN if backend == "cpu" and cfg.model.name == "mlp" and dense_fp32 else None


def default_loop(model_name: str, backend: str, conv: str = "xla") -> tuple[str, int | None]:
    """The measured default (loop, steps_per_call) for a model and conv lowering on a backend."""
    if backend == "cpu" and model_name in _UNROLLED_WITH_XLA_CONV and conv == "xla":
        return _CPU_XLA_CONV_LOOP
    return ("scan", None)


# ----------------------------------------------------------------------------------------------
# Setup.

def _enable_compilation_cache() -> None:
    """Persistent XLA cache: a repeated run loads its executables instead of compiling them."""
    if jax.config.jax_compilation_cache_dir is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "jaxaccel" / "xla"
        jax.config.update("jax_compilation_cache_dir", str(cache))
    # Every executable, also the small ones (init, permutation, eval, compression report): with
    # the 0.2 s threshold a warm command spent half its start-up recompiling them (benchmarks/README.md).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def _versions() -> dict[str, str]:
    return {p: metadata.version(p) for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")}


@dataclasses.dataclass
class _Plan:
    """The step arithmetic of a run, all derived from the config and the dataset size."""
    steps_per_epoch: int
    total_steps: int
    loop: str
    steps_per_call: int | None
    log_every: int
    checkpoint_every: int

    def next_boundary(self, step: int) -> int:
        """Where the step group starting at ``step`` ends: the next log point of the epoch, epoch
        end, checkpoint multiple or the last step. A pure function of ``step``, so a resumed run
        groups its steps exactly as an uninterrupted one."""
        epoch_start = step - step % self.steps_per_epoch
        pos = step - epoch_start
        candidates = [epoch_start + (pos // self.log_every + 1) * self.log_every,
                      epoch_start + self.steps_per_epoch,
                      (step // self.checkpoint_every + 1) * self.checkpoint_every,
                      self.total_steps]
        if self.loop == "scan" and self.steps_per_call:
            candidates.append(step + self.steps_per_call)
        return min(candidates)


def _make_plan(cfg: Config, num_train: int, backend: str) -> tuple[_Plan, Config]:
    """The step plan, and ``cfg`` with every duration resolved to steps (durations.resolve)."""
    batch = cfg.train.batch_size
    if batch > num_train:
        raise ConfigError(f"train.batch_size={batch} is larger than the training split ({num_train} examples)")
    steps_per_epoch = num_train // batch  # the last partial batch is dropped; each epoch reshuffles
    loop, per_call = default_loop(cfg.model.name, backend, getattr(cfg.model, "conv", "xla"))
    if cfg.train.loop != "auto":
        loop = cfg.train.loop
        per_call = cfg.train.steps_per_call or (None if loop == "scan" else 10)
    elif cfg.train.steps_per_call:
        per_call = cfg.train.steps_per_call
    total_steps = cfg.train.steps or cfg.train.epochs * steps_per_epoch
    return (_Plan(steps_per_epoch, total_steps, loop, per_call, cfg.train.log_every_steps, cfg.checkpoint.every_steps),
            durations.resolve(cfg, steps_per_epoch, total_steps))


def _check_inputs(cfg: Config, dataset: data_lib.Dataset) -> None:
    """Refuse (exit 2) a model or augmentation that does not fit the dataset's kind of input."""
    problem = input_problem(cfg.model, dataset.input_dtype.name, dataset.image_shape, cfg.data.name)
    if problem:
        raise ConfigError(problem)
    if cfg.augment.enabled and (dataset.input_dtype != np.uint8 or len(dataset.image_shape) != 3):
        raise ConfigError(f"augment.* transforms images; {cfg.data.name} holds {dataset.input_dtype.name} "
                          f"{list(dataset.image_shape)} inputs: leave the augment section off")


def _xla_conv(model_cfg):
    """The same model with XLA's convolution (for calls outside device loops)."""
    return model_cfg.model_copy(update={"conv": "xla"}) if "conv" in type(model_cfg).model_fields else model_cfg


def _pad_to(images: np.ndarray, labels: np.ndarray, multiple: int):
    n = images.shape[0]
    pad = -n % multiple
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return (np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]),
            np.concatenate([labels, np.zeros(pad, labels.dtype)]), weights)


# ----------------------------------------------------------------------------------------------
# Model state and initialisation.

def _create_state(model, tx, image_shape, key, dtype=np.uint8) -> step_lib.TrainState:
    params = model.init(key, jnp.zeros((1, *image_shape), dtype))["params"]
    return step_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def _process_age() -> float | None:
    """Seconds since this process started (Linux /proc, 10 ms resolution); None elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _flops_per_step(groups: dict[int | None, Any]) -> float | None:
    """Model FLOPs of one training step from XLA's cost analysis of a compiled step group (the
    one-step group when unrolled; a device loop's body is counted once). None if unavailable."""
    compiled = groups[1] if 1 in groups else groups[None]
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
        return float(cost["flops"]) if cost and cost.get("flops", -1) > 0 else None
    except Exception:  # noqa: BLE001 - a backend without cost analysis reports no FLOP rate
        return None


# ----------------------------------------------------------------------------------------------
# The run.

class _Run:
    """Holds what one call to :func:`train` builds, so the loop reads top to bottom."""

    def __init__(self, cfg: Config, overrides: list[str] | None):
        self.started = time.perf_counter()
        self.cfg, self.overrides = cfg, list(overrides or [])
        init_distributed(cfg)
        _enable_compilation_cache()
        self.workdir = Path(cfg.workdir or f"runs/{cfg.experiment or 'run'}")
        self.is_writer = jax.process_index() == 0
        self.tensorboard = tensorboard_enabled(cfg.train.tensorboard)
        self.dataset = data_lib.load(cfg.data.name, cfg.data.dir, cfg.data.cache_dir,
                                     data_lib.Decoding(getattr(cfg.model, "vocab_size", data_lib.Decoding.vocab_size),
                                                       cfg.data.max_length))
        self.parallel = make_parallel(cfg.parallel.mode, cfg.parallel.fsdp)
        n_dev = self.parallel.size
        for key in ("batch_size", "eval_batch_size"):
            if getattr(cfg.train, key) % n_dev:
                raise ConfigError(f"train.{key}={getattr(cfg.train, key)} must be a multiple of the "
                                  f"{n_dev} devices it is split over")
        _check_inputs(cfg, self.dataset)
        self.plan, cfg = _make_plan(cfg, len(self.dataset.train_labels), jax.default_backend())
        self.cfg = cfg  # durations are step counts from here on
        # XLA:CPU runs each device's part of a call on a shared thread pool; with several calls in
        # flight, threads waiting in one call's all-reduce can starve the devices that have yet
        # to reach it (seen: a deadlock with 8 emulated devices). So on CPU with several devices,
        # a call finishes before the next is dispatched.
        self.serialize_calls = jax.default_backend() == "cpu" and jax.local_device_count() > 1
        self.model = build_model(cfg.model, self.dataset.num_classes, cfg.precision, cfg.quant)
        # Evaluation runs one batch per call, outside any loop, where XLA's own convolution beats
        # the im2col lowering (2.5-3x forward-only on CPU, benchmarks/README.md): same parameters,
        # same function, only the lowering differs.
        self.eval_model = build_model(_xla_conv(cfg.model), self.dataset.num_classes, cfg.precision, cfg.quant)
        # Sparsity wraps the whole optimizer (nothing may rescale updates after its masking);
        # freezing wraps sparsity (a frozen weight is not even pruned). Loss scaling and the
        # non-finite guard wrap everything (they skip whole steps).
        self.tx = self._optimizer()
        # precision.guard=rollback: step groups run with an untested copy of the optimizer (same
        # state) and only a group that met a non-finite value is rerun with self.tx (run_group).
        self.rollback = prec.resolve_guard(cfg.precision) == "rollback"
        self.fast_tx = self._optimizer(assume_finite=True) if self.rollback else None
        # ... and a group in which no mask update is due runs without the mask-update conditional.
        self.fixed_mask_tx = (self._optimizer(assume_finite=True, refresh=False)
                              if self.rollback and sparsity.changes_masks(cfg.sparsity) else None)
        root = jax.random.key(cfg.seed)
        self.init_key, self.step_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 2)

    def _optimizer(self, assume_finite: bool = False, refresh: bool = True):
        cfg = self.cfg
        return prec.with_precision(freeze(
            sparsity.make_sparsity(cfg.sparsity, make_optimizer(cfg.optim, self.plan.total_steps),
                                   self.plan.total_steps, seed=cfg.seed, refresh=refresh), cfg.init.freeze),
            cfg.precision, assume_finite=assume_finite)

    # -- state -----------------------------------------------------------------------------------
    def initial_state(self, progress: Progress) -> tuple[step_lib.TrainState, int]:
        create = functools.partial(_create_state, self.model, self.tx, self.dataset.image_shape,
                                   dtype=self.dataset.input_dtype)
        # The restore target carries the shardings a checkpoint is read into.
        state = self.parallel.create_state(create, self.init_key)
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", self.cfg.checkpoint.max_to_keep)
        latest = self.checkpointer.latest_step()
        if latest is not None:
            state, latest, notes = self.checkpointer.restore_latest(state, self.cfg.checkpoint.fallback)
            for note in notes:
                progress.message(f"warning: {note}")
            progress.message(f"resuming from checkpoint step {latest} in {self.workdir / 'checkpoints'}")
        elif self.cfg.init.from_:
            params = finetune.load_init_params(self.cfg.init.from_, self.cfg.init.include, state.params,
                                               progress.message)
            # Under jit, so every leaf is a fresh buffer (the train step donates them all).
            state = jax.jit(lambda s, p: s.replace(params=p, opt_state=self.tx.init(p)))(state, params)
        return self.parallel.put_state(state), latest or 0

    # -- compiled functions ----------------------------------------------------------------------
    def compile(self, state, images, labels, test):
        """Ahead-of-time compile every function the loop calls, timing it apart from training."""
        t0 = time.perf_counter()
        par, axis = self.parallel, self.parallel.axis_name
        uses_penalty = self.cfg.sparsity.penalty != "none" and self.cfg.sparsity.penalty_weight > 0
        step_fn = functools.partial(
            step_lib.train_step, label_smoothing=self.cfg.train.label_smoothing, axis_name=axis,
            penalty=functools.partial(sparsity.penalty, self.cfg.sparsity) if uses_penalty else None,
            precision=self.cfg.precision if self.cfg.precision.params != "float32" else None,
            quant_start_step=self.cfg.quant.start if self.cfg.quant.mode == "qat" else None,
            augment=self.cfg.augment if self.cfg.augment.enabled else None)
        kw = dict(batch_size=self.cfg.train.batch_size, batch_sharding=par.batch_sharding,
                  step_key=self.step_key, axis_name=axis)
        args = (state, images, labels, self.epoch_perm(0), np.int32(0), np.int32(1))
        unrolls = [None] if self.plan.loop == "scan" else sorted({1, self.plan.steps_per_call})
        options = compiler_options(self.cfg, jax.default_backend())

        def compile_groups(fn):
            return {unroll: par.compile(step_lib.make_train_steps(fn, unroll=unroll, **kw), args, options=options)
                    for unroll in unrolls}

        if self.rollback:
            self.groups = compile_groups(functools.partial(step_fn, tx=self.fast_tx))
            self.fixed_mask_groups = (compile_groups(functools.partial(step_fn, tx=self.fixed_mask_tx))
                                      if self.fixed_mask_tx is not None else None)
            # The guarded groups are compiled only if a group ever needs a rerun.
            self._guarded_groups = functools.cache(lambda: compile_groups(step_fn))
            self._copy_state = jax.jit(lambda s: jax.tree.map(jnp.copy, s))
            self._state_finite = jax.jit(lambda s: prec.all_finite((s.params, s.opt_state)))
        else:
            self.groups, self.fixed_mask_groups = compile_groups(step_fn), None
        self.flops_per_step = _flops_per_step(self.groups)
        eval_fn = step_lib.make_eval(self.eval_model.apply, self.cfg.train.eval_batch_size, par.batch_sharding, axis)
        self.eval_one = par.compile(eval_fn, (state.params, *test, np.int32(0)), donate=False)
        return time.perf_counter() - t0

    def evaluate(self, params, test) -> dict[str, float]:
        """Test-split metric sums, one compiled call per eval batch, summed on device."""
        sums = []
        for i in range(test[1].shape[-1] // self.cfg.train.eval_batch_size):  # labels: [N] or [devices, N]
            sums.append(self.eval_one(params, *test, np.int32(i)))
            if self.serialize_calls:  # one multi-device call in flight at a time (see __init__)
                jax.block_until_ready(sums[-1])
        return self.parallel.host(jax.tree.map(lambda *x: sum(x), *sums))

    def epoch_perm(self, epoch: int) -> jax.Array:
        """The epoch's example order: a pure function of (seed, epoch), the same on every process.
        Drawn on the host with NumPy's PCG64 (~1 ms for 60k examples): jax.random.permutation's
        rounds of sorting took 25-50 ms of each ~0.6 s LeNet epoch on XLA:CPU."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.cfg.seed, _DATA_STREAM, epoch])))
        return self.parallel.replicate(rng.permutation(len(self.dataset.train_labels)).astype(np.int32))

    def run_group(self, state, images, labels, perm, position: int, count: int):
        """Run ``count`` steps from batch ``position``; returns the state and summed metrics.

        With the rollback guard the steps run untested from a copy of ``state``; if any had a
        non-finite loss or the state ends non-finite, the group is run again from that copy with
        the per-step guard, which skips exactly the non-finite steps: the same steps are skipped
        whichever guard runs. This waits for the group's end: one sync per group, not per step."""
        if not self.rollback:
            return self._run_steps(self.groups, state, images, labels, perm, position, count)
        start = self._copy_state(state)
        groups = self.groups if self._mask_update_due(state, count) else self.fixed_mask_groups
        new, sums = self._run_steps(groups, state, images, labels, perm, position, count)
        finite_steps = float(self.parallel.host(sums["finite_steps"]))
        if finite_steps == count and bool(local_copy(self._state_finite(new))):
            return new, sums
        return self._run_steps(self._guarded_groups(), start, images, labels, perm, position, count)

    def _mask_update_due(self, state, count: int) -> bool:
        """Whether the sparsity masks may change in the next ``count`` updates (always True when
        there are no fixed-mask groups). Counts are the optimizer's, read from the state: in these
        untested groups every step is an update."""
        if self.fixed_mask_groups is None:
            return True
        first = int(self.parallel.host(sparsity.sparsity_count(state.opt_state)))
        due = sparsity.mask_update_due(self.cfg.sparsity, self.plan.total_steps, first + np.arange(count))
        return bool(np.any(np.asarray(due)))

    def _run_steps(self, groups, state, images, labels, perm, position: int, count: int):
        if self.plan.loop == "scan":
            state, sums = groups[None](state, images, labels, perm, np.int32(position), np.int32(count))
            return state, self._with_guard_state(state, sums)
        sums_all = None
        k = self.plan.steps_per_call
        for unroll, n in ((k, count // k), (1, count % k)):
            for _ in range(n):
                state, sums = groups[unroll](state, images, labels, perm, np.int32(position), np.int32(unroll))
                if self.serialize_calls:
                    jax.block_until_ready(state)
                position += unroll
                sums_all = sums if sums_all is None else jax.tree.map(jnp.add, sums_all, sums)
        return state, self._with_guard_state(state, sums_all)

    @staticmethod
    def _with_guard_state(state, sums):
        """Add the loss scale and the consecutive non-finite count at the group's end (device
        values read one group later with the sums, so the host does not wait for them)."""
        # Copies: the state's own buffers are donated to the next call.
        return {**sums, "loss_scale": jnp.copy(prec.current_scale(state.opt_state)),
                "nonfinite_run": jnp.copy(prec.nonfinite_steps(state.opt_state))}

    # -- outputs ---------------------------------------------------------------------------------
    def write_config(self, state) -> None:
        devices = jax.devices()
        record = {"experiment": self.cfg.experiment, "config": self.cfg.to_dict(), "overrides": self.overrides,
                  "versions": _versions(), "python": platform.python_version(),
                  "device_kind": devices[0].device_kind, "device_count": len(devices),
                  "parallel": {"mode": self.cfg.parallel.mode, "devices": self.parallel.size,
                               "fsdp": self.cfg.parallel.fsdp,
                               "state_bytes_per_device": self.parallel.state_bytes_per_device(state)},
                  "backend": jax.default_backend(), "process_count": jax.process_count(),
                  "plan": dataclasses.asdict(self.plan)}
        (self.workdir / "config.json").write_text(json.dumps(record, indent=2))


def train(cfg: Config, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate, checkpoint and export the run ``cfg`` describes; returns the summary.

    ``overrides`` (the command-line ``key=value`` strings, if any) are recorded in config.json.
    A run whose workdir already has checkpoints resumes from the latest one.
    """
    from jaxaccel import experiments
    if cfg.experiment in experiments.names() and experiments.info(cfg.experiment).unavailable:
        raise ConfigError(f"experiment {cfg.experiment}: {experiments.info(cfg.experiment).unavailable}")
    if cfg.init.pretrain and not cfg.init.from_:
        cfg = finetune.pretrain(cfg, Path(cfg.workdir or f"runs/{cfg.experiment or 'run'}"),
                                lambda text: print(text, flush=True))
    run = _Run(cfg, overrides)
    run.workdir.mkdir(parents=True, exist_ok=True)
    progress = Progress(run.plan.total_steps, 0, cfg.train.batch_size)
    try:
        state, step = run.initial_state(progress)
    except BaseException:
        if hasattr(run, "checkpointer"):
            run.checkpointer.close()  # stop orbax's background work before the error propagates
        raise
    writer = (MetricsWriter(run.workdir / "metrics.jsonl", resume_step=step, tensorboard=run.tensorboard)
              if run.is_writer else None)
    try:
        if run.is_writer:
            run.write_config(state)
        with PreemptionNotice() as notice:
            state, timings, last_eval = _loop(run, state, step, writer, progress, notice)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        # With several processes a runtime error is almost always a lost peer (its collectives
        # fail with "connection reset" at once); say so instead of a C++ trace.
        raise DistributedError(
            f"process {jax.process_index()} of {jax.process_count()} stopped: {str(e).splitlines()[0][:300]}. "
            "If another process died or was killed, restart every process with the same command: "
            + (f"the run resumes from its latest checkpoint (step {latest})." if (latest := run.checkpointer.latest_step())
               is not None else "no checkpoint was written yet, so it starts over.")) from None
    finally:
        # Also on errors: commit the checkpoints already started, so nothing saved is lost.
        run.checkpointer.close()
        progress.close()
        if writer:
            writer.close()
    return _finish(run, state, timings, last_eval)


def _loop(run: _Run, state, step: int, writer, progress: Progress, notice: PreemptionNotice):
    """Compile, then train step groups to the end with evaluations and checkpoints on the way."""
    cfg, plan, ds = run.cfg, run.plan, run.dataset
    images, labels = run.parallel.replicate(ds.train_images), run.parallel.replicate(ds.train_labels)
    test = tuple(run.parallel.replicate(a) for a in _pad_to(ds.test_images, ds.test_labels, cfg.train.eval_batch_size))
    for warning in prec.check_backend(cfg.precision):
        progress.message(f"warning: {warning}")
    compile_seconds = run.compile(state, images, labels, test)
    progress.message(f"compiled in {compile_seconds:.1f}s; {plan.total_steps - step} steps to run "
                     f"({plan.loop}, {plan.steps_per_call or 'any'} steps per call) on "
                     f"{run.parallel.size} {jax.devices()[0].platform} device(s), parallel.mode={cfg.parallel.mode}")
    progress.restart(step)
    # Start-up: everything before the first training step (imports, data, init, restore, compile).
    startup = {"from_train_call": time.perf_counter() - run.started, "from_process_start": _process_age()}

    def evaluate(state, at_step):
        fault_point("eval", at_step)
        check_replicas(state, at_step)
        sums = run.evaluate(state.params, test)
        record = {"step": at_step, "split": "test", "accuracy": float(sums["correct"] / sums["count"]),
                  "loss": float(sums["loss_sum"] / sums["count"]),
                  **sparsity.report(local_copy(run.parallel.single(state).params), cfg.sparsity)}
        if writer:
            writer.write(record)
        progress.message(f"step {at_step}: test accuracy {record['accuracy']:.4f}, loss {record['loss']:.4f}, "
                         f"sparsity {record['sparsity']:.4f}")
        return record

    def check_replicas(state, at_step):
        """Every copy of the state (params, masks, loss scale, counters) must be bit-identical:
        divergent replicas would train different models while reporting one."""
        if not cfg.parallel.check_replicas or run.parallel.size == 1:
            return
        leaves = run.parallel.check_replicas(state)
        progress.message(f"step {at_step}: replica check: {leaves} state leaves bit-identical on "
                         f"{run.parallel.size} devices, {jax.process_count()} process(es)")

    def flush(pending):
        """Write the training line of a finished step group (fetched one group late, so the host
        never waits for the device except at evaluations and checkpoints)."""
        if pending is None:
            return
        end, count, sums = pending
        raw = run.parallel.host(sums)
        finite, skipped = float(raw.pop("finite_steps")), int(raw.pop("skipped_steps"))
        scale, run_length = float(raw.pop("loss_scale")), int(raw.pop("nonfinite_run"))
        record = {"step": end, **{k: float(v) / max(finite, 1.0) for k, v in raw.items()}}
        if prec.resolve_mode(cfg.precision) != "none":
            record["loss_scale"] = scale
        if skipped:
            record["skipped_nonfinite_steps"] = skipped
            progress.message(f"skipped {skipped} non-finite step(s) in steps {end - count + 1}-{end}")
        if writer:
            writer.write(record)
        if run_length >= cfg.precision.max_nonfinite_steps:
            raise NonFiniteError(
                f"{run_length} consecutive non-finite steps (loss or gradients), the last at step {end} "
                f"(precision.max_nonfinite_steps={cfg.precision.max_nonfinite_steps}); stopped. Nothing "
                "non-finite was checkpointed or exported. Lower optim.learning_rate, set "
                "optim.grad_clip_norm, or use float32/bfloat16.")
        progress.update(end, record["loss"] if finite else float("nan"))

    last_eval, pending, epoch, perm = None, None, None, None
    first_step, train_seconds, t_start = step, 0.0, time.perf_counter()
    # Training seconds of each epoch run whole in this process (a resumed partial epoch is left out):
    # the first includes XLA's first-run set-up of the executables, later ones are steady state.
    epoch_seconds, epoch_mark = [], (train_seconds if step % plan.steps_per_epoch == 0 else None)
    while step < plan.total_steps:
        if step // plan.steps_per_epoch != epoch:
            epoch = step // plan.steps_per_epoch
            perm = run.epoch_perm(epoch)
        end = plan.next_boundary(step)
        state, sums = run.run_group(state, images, labels, perm, step % plan.steps_per_epoch, end - step)
        flush(pending)
        pending, step = (end, end - step, sums), end
        at_epoch_end, at_checkpoint = step % plan.steps_per_epoch == 0, step % plan.checkpoint_every == 0
        preempted = notice.should_stop()
        at_checkpoint = at_checkpoint or preempted
        if at_epoch_end or at_checkpoint or step == plan.total_steps:
            flush(pending)  # raises on a non-finite loss before anything is checkpointed
            pending = None
            jax.block_until_ready(state)
            train_seconds += time.perf_counter() - t_start
            if at_epoch_end:
                if epoch_mark is not None:
                    epoch_seconds.append(train_seconds - epoch_mark)
                epoch_mark = train_seconds
            if at_epoch_end or step == plan.total_steps:
                last_eval = evaluate(state, step)
            if at_checkpoint or step == plan.total_steps:
                single = run.parallel.single(state)
                run.checkpointer.save(step, single, Checkpointer.meta_for(single, step=step))
                fault_point("save", step)  # the async write is still in flight here
            t_start = time.perf_counter()
        if preempted:
            progress.message(f"SIGTERM: checkpointed step {step}; run the same command again to resume")
            raise Preempted(step)
    if last_eval is None:  # resumed at the end: nothing left to train
        last_eval = evaluate(state, step)
    timings = {"steps_run": step - first_step, "train_seconds": train_seconds, "compile_seconds": compile_seconds,
               "startup": startup, "epoch_seconds": epoch_seconds}
    return state, timings, last_eval


def _finish(run: _Run, state, timings: dict[str, float], last_eval: dict[str, float]) -> dict[str, Any]:
    """Export the final model and write summary.json (process 0); returns the summary."""
    cfg, ds = run.cfg, run.dataset
    state = run.parallel.single(state)
    params = local_copy(state.params)
    param_count = int(sum(np.size(p) for p in jax.tree.leaves(params)))
    seconds = timings["train_seconds"]
    summary = {
        "experiment": cfg.experiment, "test_accuracy": last_eval["accuracy"], "test_loss": last_eval["loss"],
        "steps": int(local_copy(state.step)), "train_seconds": seconds, "compile_seconds": timings["compile_seconds"],
        "examples_per_second": timings["steps_run"] * cfg.train.batch_size / seconds if seconds else 0.0,
        "sparsity": sparsity.report(params, cfg.sparsity)["sparsity"], "param_count": param_count, "model_bytes": param_count * 4,
        "seconds_to_first_step": timings["startup"], "epoch_seconds": timings["epoch_seconds"],
    }
    # Achieved model FLOP/s: XLA's count for the compiled step (all devices) over the training time.
    if run.flops_per_step:
        summary["flops_per_step"] = run.flops_per_step * run.parallel.size
        summary["model_flops_per_second"] = summary["flops_per_step"] * timings["steps_run"] / seconds if seconds else 0.0
    if run.is_writer:
        precision = cfg.precision.model_dump() if cfg.precision != type(cfg.precision)() else None
        summary["compressed_bytes"], summary["export_form"] = export_lib.save(
            run.workdir / "export", params, model=cfg.model.model_dump(), num_classes=ds.num_classes,
            image_shape=ds.image_shape, input_dtype=ds.input_dtype.name, precision=precision,
            quant=cfg.quant.model_dump())
        plain = build_model(_xla_conv(cfg.model), ds.num_classes)
        summary["compression"] = compression.report(params, plain, ds.test_images, ds.test_labels, cfg.quant)
        (run.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

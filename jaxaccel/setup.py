"""Everything a run is built from, before its first step: :func:`build` returns a :class:`Setup`.

Distributed runtime and compilation cache, data, devices, the plan, the models and keys; and
:func:`initial_state` (fresh, resumed from the run's own checkpoint, or started from ``init.from``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel import data as data_lib
from jaxaccel import durations
from jaxaccel import feed as feed_lib
from jaxaccel import finetune
from jaxaccel import paths
from jaxaccel import prepare
from jaxaccel import sparsity
from jaxaccel import streaming
from jaxaccel import step as step_lib
from jaxaccel import storage
from jaxaccel import surgery
from jaxaccel.surgeons import surgeons
from jaxaccel.checkpoint import Checkpointer
from jaxaccel.config import Config, ConfigError
from jaxaccel.models import ModelConfig, build_model, input_problem
from jaxaccel.models.layers import LowRankWarning
from jaxaccel.optim import build_optimizer
from jaxaccel.parallel import make_parallel
from jaxaccel.plan import Plan, make_plan, with_conv
from jaxaccel.runtime import init_distributed

__all__ = ["Setup", "build", "initial_state", "starting_point", "workdir_of", "DATA_STREAM"]

DATA_STREAM = 1  # with (seed, epoch), seeds the data order; init and step keys are streams 0 and 2


@dataclasses.dataclass(frozen=True)
class Setup:
    """What one run is built from; every field is set by :func:`build`."""
    cfg: Config
    overrides: list[str]
    started: float             # time.perf_counter() when the run was called
    workdir: Path
    is_writer: bool            # process 0 writes metrics, config, summary and export
    dataset: data_lib.Dataset | streaming.StreamDataset
    pipeline: dict[str, Any]   # data.pipeline resolved, and the sizes that decided it (config.json)
    parallel: Any              # jaxaccel.parallel's strategy: devices, shardings, compile
    plan: Plan
    model_cfg: Any             # the model config in force: cfg.model, or what a surgeon made of it (jaxaccel.surgery)
    model: Any                 # the flax module trained (with the plan's conv lowering)
    eval_model: Any            # the same parameters with XLA's own convolution (faster outside loops)
    serialize_calls: bool      # CPU with several devices: one multi-device call in flight at a time
    init_key: jax.Array
    step_key: jax.Array


def workdir_of(cfg: Config) -> storage.StoragePath:
    """Where the run writes: ``workdir``, default ``runs/<experiment>``; a URL (``gs://bucket/run``)
    stays one (an ``epath.Path``, see :mod:`jaxaccel.storage`)."""
    return storage.path(cfg.workdir or f"runs/{cfg.experiment or 'run'}")


def decoding_of(cfg: Config) -> data_lib.Decoding:
    """How text and audio examples become arrays for the model ``cfg`` names."""
    return data_lib.Decoding(getattr(cfg.model, "vocab_size", data_lib.Decoding.vocab_size), cfg.data.max_length)


def models_for(model_cfg: ModelConfig, cfg: Config, conv: str, num_classes: int) -> tuple[Any, Any]:
    """``(model, eval_model)`` of ``model_cfg`` with the run's precision and QAT: the trained one
    with the plan's convolution lowering ``conv``, the evaluated one with XLA's own."""
    return (build_model(with_conv(model_cfg, conv), num_classes, cfg.precision, cfg.quant),
            build_model(with_conv(model_cfg, "xla"), num_classes, cfg.precision, cfg.quant))


def rebuild(setup: Setup, model_cfg: ModelConfig) -> Setup:
    """``setup`` with the model config ``model_cfg`` in force (a model surgery's result, or the
    model a checkpoint names) and its models rebuilt from it; ``setup.cfg`` stays the run's config."""
    model, eval_model = models_for(model_cfg, setup.cfg, setup.plan.conv, setup.dataset.num_classes)
    return dataclasses.replace(setup, model_cfg=model_cfg, model=model, eval_model=eval_model)


def follow(setup: Setup, meta: dict[str, Any]) -> Setup:
    """``setup`` with the model the checkpoint whose record is ``meta`` was written with."""
    model_cfg = surgery.model_of(meta, setup.cfg.model)
    return setup if model_cfg == setup.model_cfg else rebuild(setup, model_cfg)


def _enable_compilation_cache() -> None:
    """Persistent XLA cache: a repeated run loads its executables instead of compiling them."""
    if jax.config.jax_compilation_cache_dir is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "jaxaccel" / "xla"
        jax.config.update("jax_compilation_cache_dir", str(cache))
    # Every executable, also the small ones (init, eval, compression report): with the 0.2 s
    # default threshold a warm command spent half its start-up recompiling them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def check_inputs(cfg: Config, dataset: data_lib.Dataset) -> None:
    """Refuse (exit 2) a model or augmentation that does not fit the dataset's kind of input."""
    problem = input_problem(cfg.model, dataset.input_dtype.name, dataset.input_shape, cfg.data.name)
    if problem:
        raise ConfigError(problem)
    if cfg.augment.enabled and (dataset.input_dtype != np.uint8 or len(dataset.input_shape) != 3):
        raise ConfigError(f"augment.* transforms images; {cfg.data.name} holds {dataset.input_dtype.name} "
                          f"{list(dataset.input_shape)} inputs: leave the augment section off")


def build(cfg: Config, overrides: list[str] | None = None) -> Setup:
    """Start the runtime, load the data and derive everything the loop needs from ``cfg``."""
    started = time.perf_counter()
    init_distributed(cfg)
    _enable_compilation_cache()
    dataset, pipeline = _open_data(cfg)
    parallel = make_parallel(cfg.parallel.mode, cfg.parallel.fsdp, cfg.parallel.fsdp_size)
    if cfg.train.batch_size % parallel.size:
        n, batch = parallel.size, cfg.train.batch_size
        nearest = sorted({max(n, batch // n * n), (batch // n + 1) * n})
        raise ConfigError(f"train.batch_size={batch} must be a multiple of the {n} devices it is split over: "
                          f"use train.batch_size={' or '.join(map(str, nearest))}")
    check_inputs(cfg, dataset)
    root = jax.random.key(cfg.seed)
    streamed = pipeline["pipeline"] == "stream"
    plan = make_plan(cfg, dataset.num_train if streamed else len(dataset.train_labels), jax.default_backend())
    if streamed:
        plan = feed_lib.stream_plan(plan, cfg.train.batch_size * dataset.sizes.example_bytes)
    cfg = durations.resolve(cfg, plan.steps_per_epoch, plan.total_steps)  # from here on, durations are steps
    plan = dataclasses.replace(plan, surgery_points=surgery.points(surgeons(cfg), plan.total_steps))
    # A model named by import path (models.custom) is imported here, when the run is built.
    model, eval_model = models_for(cfg.model, cfg, plan.conv, dataset.num_classes)
    return Setup(
        cfg=cfg, overrides=list(overrides or []), started=started,
        workdir=workdir_of(cfg),
        is_writer=jax.process_index() == 0, dataset=dataset, pipeline=pipeline, parallel=parallel, plan=plan,
        model_cfg=cfg.model, model=model, eval_model=eval_model,
        # XLA:CPU runs each device's part of a call on a shared thread pool; with several calls in
        # flight, threads waiting in one call's all-reduce can starve the devices that have yet
        # to reach it (seen: a deadlock with 8 emulated devices).
        serialize_calls=jax.default_backend() == "cpu" and jax.local_device_count() > 1,
        init_key=jax.random.fold_in(root, 0), step_key=jax.random.fold_in(root, 2))


def _prepared_sizes(cfg: Config, decoding: data_lib.Decoding) -> streaming.DatasetSizes | None:
    """The prepared dataset's sizes; a dataset jaxaccel can prepare itself (prepare.PUBLISHED) that
    is absent is prepared first when its files can be downloaded, else the same exit 3 as before."""
    try:
        return streaming.read_sizes(cfg.data.name, cfg.data.dir, decoding)
    except data_lib.DataError:
        root = data_lib.resolve_data_dir(cfg.data.dir)
        if not prepare.can_prepare(cfg.data.name, root):
            raise
        why = prepare.unreachable(cfg.data.name)
        if why:
            raise data_lib.DataError(
                f"dataset {cfg.data.name!r} is not prepared in {root}, and its published files cannot be downloaded "
                f"to prepare it ({why}): run the same command with network access (jaxaccel then prepares it, no "
                f"TensorFlow needed), or point data.dir (or TFDS_DATA_DIR) at a TFDS data dir that has it") from None
        prepare.prepare_published(cfg.data.name, root, lambda text: print(text, flush=True))
        return streaming.read_sizes(cfg.data.name, cfg.data.dir, decoding)


def _open_data(cfg: Config) -> tuple[data_lib.Dataset | streaming.StreamDataset, dict[str, Any]]:
    """The dataset on the pipeline ``data.pipeline`` resolves to (decided from the prepared files'
    sizes before anything is decoded), and the record of that choice."""
    decoding = decoding_of(cfg)
    sizes = _prepared_sizes(cfg, decoding)
    budget, budget_from = ((cfg.data.device_budget_bytes, "data.device_budget_bytes") if cfg.data.device_budget_bytes
                           else feed_lib.default_device_budget(jax.default_backend()))
    pipeline = streaming.choose_pipeline(cfg, sizes, budget, budget_from)
    if pipeline["pipeline"] == "stream":
        return streaming.open_dataset(cfg, sizes), pipeline
    return data_lib.load(cfg.data.name, cfg.data.dir, cfg.data.cache_dir, decoding), pipeline


def _create_state(model, tx, input_shape, input_dtype, key) -> step_lib.TrainState:
    variables = dict(model.init(key, jnp.zeros((1, *input_shape), input_dtype)))
    params = variables.pop("params")
    return step_lib.TrainState.create(params, tx, model_state=variables)


def _check_sparsity_paths(cfg: Config, params: Any) -> None:
    """``sparsity.exclude`` patterns that select no parameter are typos (exit 2). Checked here, on
    every parameter: the transformation itself sees only the trainable ones under ``init.freeze``."""
    if cfg.sparsity.method != "none" or cfg.sparsity.threshold > 0.0:
        paths.require_matches(params, cfg.sparsity.exclude, "sparsity.exclude", ConfigError)


# What building the state warns about and the run's output says (a layer left as it was).
_SAID_WARNINGS = (sparsity.SparsityWarning, LowRankWarning)


def _created(create: Callable, setup: Setup, message: Callable[[str], None]) -> step_lib.TrainState:
    """The fresh state; what the sparsity transformation or a factorized layer warns about while it
    is built (a layer too small for its N:M structure, or whose rank saves no FLOPs, left dense) is
    said in the run's output."""
    with warnings.catch_warnings(record=True) as caught:
        for said in _SAID_WARNINGS:
            warnings.simplefilter("always", said)
        state = setup.parallel.create_state(create, setup.init_key)
    for warning in caught:
        if issubclass(warning.category, _SAID_WARNINGS):
            message(f"warning: {warning.message}")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return state


def initial_state(setup: Setup, checkpointer: Checkpointer,
                  message: Callable[[str], None]) -> tuple[step_lib.TrainState, int, dict[str, Any]]:
    """:func:`starting_point` without the setup (for runs whose model never changes shape)."""
    return starting_point(setup, checkpointer, message)[1:]


def starting_point(setup: Setup, checkpointer: Checkpointer, message: Callable[[str], None]
                   ) -> tuple[Setup, step_lib.TrainState, int, dict[str, Any]]:
    """The setup and state the run starts from, its step and the record saved with it: the latest
    checkpoint in the workdir if there is one, with the model it was written with (a surgeon may
    have changed the shapes: :mod:`jaxaccel.surgery`), else a fresh state (with ``init.from``'s
    parameters when set) and an empty record."""
    cfg, ds = setup.cfg, setup.dataset
    tx = build_optimizer(cfg, setup.plan.total_steps)

    def fresh(s: Setup) -> step_lib.TrainState:
        create = functools.partial(_create_state, s.model, tx, ds.input_shape, ds.input_dtype)
        return _created(create, s, message)

    # The restore target carries the shardings a checkpoint is read into.
    state = fresh(setup)
    _check_sparsity_paths(cfg, state.params)
    latest = checkpointer.latest_step()
    if latest is not None:
        original = setup

        def target(meta: dict[str, Any]) -> step_lib.TrainState:
            """The restore target of the checkpoint whose record is ``meta``: of its own model."""
            nonlocal setup
            setup = follow(original, meta)
            return state if setup is original else fresh(setup)

        state, latest, notes = checkpointer.restore_latest(target, cfg.checkpoint.fallback)
        for note in notes:
            message(f"warning: {note}")
        message(f"resuming from checkpoint step {latest} in {setup.workdir / 'checkpoints'}")
    elif cfg.init.from_:
        params, model_state = finetune.load_init_variables(cfg.init.from_, cfg.init.include, state.params,
                                                           state.model_state, message)
        # Under jit, so every leaf is a fresh buffer (the train step donates them all).
        state = jax.jit(lambda s, p, m: s.replace(params=p, opt_state=tx.init(p), model_state=m))(
            state, params, model_state)
    meta = checkpointer.meta(latest) if latest is not None else {}
    return setup, setup.parallel.put_state(state), latest or 0, meta

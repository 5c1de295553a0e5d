"""PHASE 1 of ``jaxaccel.aot``: the run's compiled functions, rebuilt outside the trainer.

A first version, to be replaced by the trainer's own setup: it mirrors what ``trainer._Run``
compiles (as of the trainer before its split) from the public pieces (models, steps, optimizer,
sparsity, precision, MeshParallel), so it can drift from the run. Differences it knows of: only
``parallel.mode=jit``; ``init.from`` / ``init.pretrain`` are ignored (they change values, not
shapes); the plan's defaults are the trainer's ``default_loop`` for the target's backend.

Functions (the names in aot.json):

``train_steps``              the step group the loop calls (``_xK`` per unroll size K when unrolled)
``train_steps_fixed_masks``  rollback guard with a mask-changing sparsity: groups with no mask update
``train_steps_guarded``      rollback guard: the per-step-guarded rerun of a non-finite group
``copy_state``               rollback guard: the copy of the state each group starts from
``eval``                     one evaluation batch
``report_float``             the compression report's float forward (one device, batch 1000)
``report_int8``              its int8 forward: the int8 export's inference (one device, batch 1000)
"""
from __future__ import annotations

import functools
import math
from typing import Any

from jaxaccel.aot import AotError, Built, Function

__all__ = ["build_functions"]

_REPORT_BATCH = 1000  # jaxaccel.compression measures each form in batches of this size


def _plan(cfg: Any, num_train: int, backend: str) -> dict[str, Any]:
    """The step arithmetic the trainer derives (its _make_plan), for ``backend``."""
    from jaxaccel.config import ConfigError
    from jaxaccel.trainer import default_loop
    if cfg.train.batch_size > num_train:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training split "
                          f"({num_train} examples)")
    steps_per_epoch = num_train // cfg.train.batch_size
    loop, per_call = default_loop(cfg.model.name, backend, cfg.model.conv)
    if cfg.train.loop != "auto":
        loop, per_call = cfg.train.loop, cfg.train.steps_per_call or (None if cfg.train.loop == "scan" else 10)
    elif cfg.train.steps_per_call:
        per_call = cfg.train.steps_per_call
    return {"loop": loop, "steps_per_call": per_call, "steps_per_epoch": steps_per_epoch,
            "total_steps": cfg.train.steps or cfg.train.epochs * steps_per_epoch}


def build_functions(cfg: Any, devices: list) -> Built:
    """See the module docstring. Raises ConfigError (exit 2) and DataError (exit 3) as the run does."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import SingleDeviceSharding

    from jaxaccel import data as data_lib
    from jaxaccel import precision as prec
    from jaxaccel import sparsity
    from jaxaccel import step as step_lib
    from jaxaccel.config import ConfigError, QuantConfig
    from jaxaccel.models import build_model, input_problem
    from jaxaccel.optim import freeze, make_optimizer
    from jaxaccel.parallel import MeshParallel

    if cfg.parallel.mode != "jit":
        raise AotError(f"parallel.mode={cfg.parallel.mode} is not compiled ahead of time yet: use parallel.mode=jit")
    ds = data_lib.load(cfg.data.name, cfg.data.dir, cfg.data.cache_dir,
                       data_lib.Decoding(cfg.model.vocab_size, cfg.data.max_length))
    problem = input_problem(cfg.model.name, ds.input_dtype.name, ds.image_shape)
    if problem:
        raise ConfigError(f"{problem} ({cfg.data.name}): choose a model for this data")
    par = MeshParallel(cfg.parallel.fsdp, devices=devices)
    for key in ("batch_size", "eval_batch_size"):
        if getattr(cfg.train, key) % par.size:
            raise ConfigError(f"train.{key}={getattr(cfg.train, key)} must be a multiple of the "
                              f"{par.size} devices it is split over")
    backend = devices[0].platform  # "tpu" or "gpu", as jax.default_backend() names them
    n_train, n_test = len(ds.train_labels), len(ds.test_labels)
    plan = _plan(cfg, n_train, backend)
    total = plan["total_steps"]

    model = build_model(cfg.model, ds.num_classes, cfg.precision, cfg.quant)
    xla_conv = cfg.model.model_copy(update={"conv": "xla"})
    eval_model = build_model(xla_conv, ds.num_classes, cfg.precision, cfg.quant)

    def optimizer(assume_finite: bool = False, refresh: bool = True):
        return prec.with_precision(freeze(
            sparsity.make_sparsity(cfg.sparsity, make_optimizer(cfg.optim, total), total, seed=cfg.seed,
                                   refresh=refresh), cfg.init.freeze), cfg.precision, assume_finite=assume_finite)

    tx = optimizer()
    root = jax.random.key(cfg.seed)
    init_key, step_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 2)

    def create(key):
        params = model.init(key, jnp.zeros((1, *ds.image_shape), ds.input_dtype))["params"]
        return step_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    abstract = jax.eval_shape(create, init_key)
    state_sharding = par.state_sharding(abstract)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=par.leaf_sharding(a)), abstract)

    def sds(shape, dtype, sharding=par.replicated):
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

    # The whole dataset is replicated on every device (the run's resident pipeline).
    images, labels = sds((n_train, *ds.image_shape), ds.input_dtype), sds((n_train,), jnp.int32)
    index = sds((), jnp.int32)
    uses_penalty = cfg.sparsity.penalty != "none" and cfg.sparsity.penalty_weight > 0
    step_fn = functools.partial(
        step_lib.train_step, label_smoothing=cfg.train.label_smoothing, axis_name=None,
        penalty=functools.partial(sparsity.penalty, cfg.sparsity) if uses_penalty else None,
        precision=cfg.precision if cfg.precision.params != "float32" else None,
        quant_start_step=cfg.quant.start_step if cfg.quant.mode == "qat" else None,
        augment=cfg.augment if cfg.augment.enabled else None)
    group_kw = dict(batch_size=cfg.train.batch_size, batch_sharding=par.batch_sharding, step_key=step_key)
    unrolls = [None] if plan["loop"] == "scan" else sorted({1, plan["steps_per_call"]})
    functions: dict[str, Function] = {}

    def groups(name: str, fn) -> None:
        for unroll in unrolls:
            functions[name if unroll is None else f"{name}_x{unroll}"] = Function(
                step_lib.make_train_steps(fn, unroll=unroll, **group_kw), (state, images, labels, labels, index, index),
                out_shardings=(state_sharding, par.replicated), donate_argnums=(0,))

    guard = prec.resolve_guard(cfg.precision)
    if guard == "rollback":
        groups("train_steps", functools.partial(step_fn, tx=optimizer(assume_finite=True)))
        if sparsity.changes_masks(cfg.sparsity):
            groups("train_steps_fixed_masks", functools.partial(step_fn, tx=optimizer(True, refresh=False)))
        groups("train_steps_guarded", step_fn)
        functions["copy_state"] = Function(lambda s: jax.tree.map(jnp.copy, s), (state,),
                                           out_shardings=state_sharding)
    else:
        groups("train_steps", step_fn)

    eval_batch = cfg.train.eval_batch_size
    padded = math.ceil(n_test / eval_batch) * eval_batch
    test = (sds((padded, *ds.image_shape), ds.input_dtype), sds((padded,), jnp.int32), sds((padded,), jnp.float32))
    functions["eval"] = Function(step_lib.make_eval(eval_model.apply, eval_batch, par.batch_sharding),
                                 (state.params, *test, index), out_shardings=par.replicated)

    # The compression report (and the export's inference): the plain float model, one device.
    one = SingleDeviceSharding(devices[0])
    plain = build_model(xla_conv, ds.num_classes)
    params = jax.tree.map(lambda a: sds(a.shape, a.dtype, one), state.params)
    quant = cfg.quant if cfg.quant.mode != "none" else QuantConfig(mode="ptq")
    qparams, scales = jax.tree.map(lambda a: sds(a.shape, a.dtype, one),
                                   jax.eval_shape(lambda p: prec.quantize_params(p, quant), params))
    x = sds((min(_REPORT_BATCH, n_test), *ds.image_shape), ds.input_dtype, one)
    functions["report_float"] = Function(lambda p, x: plain.apply({"params": p}, x), (params, x))
    functions["report_int8"] = Function(lambda q, s, x: prec.int8_apply(plain, q, s, x, cfg=quant),
                                        (qparams, scales, x))

    platform = "cuda" if backend == "gpu" else backend
    data_bytes = sum(np.dtype(a.dtype).itemsize * math.prod(a.shape) for a in (images, labels, labels, *test))
    return Built(functions, {
        "parallel": "jit", "fsdp": cfg.parallel.fsdp, "mesh": {"data": par.size}, **plan,
        "conv": cfg.model.conv, "eval_conv": "xla", "guard": guard,
        "int8_conv_result": prec.INT8_CONV_RESULT.get(platform, "float32"),
        "batch_size": cfg.train.batch_size, "eval_batch_size": eval_batch,
        "data_bytes_per_device": int(data_bytes)}, state)

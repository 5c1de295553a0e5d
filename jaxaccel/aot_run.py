"""PHASE 1 of ``jaxaccel.aot``: the run's compiled functions, built outside the trainer.

A first version, to be replaced by hooks in the trainer's own setup: it rebuilds what
``setup.build``, ``StepGroups.compile`` and ``Evaluator.compile`` compile, from the same public
pieces (``plan.make_plan`` for the target's backend, ``durations.resolve``,
``optim.build_optimizer``, ``step_groups.make_step_fn``, ``step.make_train_steps`` / ``make_eval``,
``MeshParallel`` over the target's devices), so it can drift from the run. The dataset's shapes come
from its prepared files' JSON (``streaming.read_sizes``) or, for the registered experiments' datasets
not prepared here, the TFDS catalog (``CATALOG``); nothing is decoded. Differences it knows
of: only ``parallel.mode=jit`` and the resident pipeline; ``init.from`` / ``init.pretrain`` are
ignored (they change values, not shapes).

Functions (the names in aot.json):

``train_steps``              the step group the loop calls (``_nL`` per call length L when the
                             device loop's trip count is compiled in, ``_xK`` per unrolled block K)
``train_steps_fixed_masks``  rollback guard with a mask-changing sparsity: groups with no mask update
``train_steps_guarded``      rollback guard: the per-step-guarded rerun of a non-finite group
``copy_state``               rollback guard: the copy of the state each group starts from
``eval``                     one evaluation batch
``report_float``             the compression report's float forward (one device, batch 1000)
``report_int8``              its int8 forward: the int8 export's inference (one device, batch 1000)
"""
from __future__ import annotations

import dataclasses

import math
from typing import Any

__all__ = ["build_functions", "dataset_sizes", "representatives", "CATALOG"]

_REPORT_BATCH = 1000  # jaxaccel.compression measures each form in batches of this size

# A compile needs a dataset's shapes, not its examples: for the registered experiments' datasets
# that are not prepared on this machine, their sizes from the TFDS catalog
# (name: kind, per-example image shape, classes, train and test examples).
CATALOG = {
    "cifar10": ("image", (32, 32, 3), 10, 50000, 10000),
    "ag_news_subset": ("text", None, 4, 120000, 7600),
    "speech_commands": ("audio", None, 12, 85511, 4890),
}


def dataset_sizes(name: str, data_dir: str | None, decoding: Any) -> tuple[Any, str]:
    """``(sizes, source)``: the sizes of dataset ``name`` from its prepared files, else from
    :data:`CATALOG` (source ``"TFDS catalog"``); DataError (exit 3) for any other absent dataset."""
    from jaxaccel import streaming
    from jaxaccel.data import DataError
    try:
        return streaming.read_sizes(name, data_dir, decoding), "prepared files"
    except DataError:
        if name not in CATALOG:
            raise
    kind, image_shape, classes, train, test = CATALOG[name]
    shape, dtype = ((image_shape, "uint8") if kind == "image" else
                    ((decoding.length(kind),), "int32" if kind == "text" else "int16"))
    return streaming.DatasetSizes(name, None, kind, (), shape, dtype, classes, train, test), "TFDS catalog"


def build_functions(cfg: Any, devices: list) -> tuple[dict[str, dict[str, Any]], dict[str, Any], Any]:
    """``(functions, plan, state)``: each function as ``jaxaccel.aot.Function`` keyword arguments, the
    plan the run would follow on ``devices``, and its abstract train state (with shardings). Raises
    ConfigError (exit 2) and DataError (exit 3) as the run does. (This module imports nothing from
    jaxaccel.aot, which calls it: no import cycle.)"""
    import types

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import SingleDeviceSharding

    from jaxaccel import durations
    from jaxaccel import precision as prec
    from jaxaccel import sparsity
    from jaxaccel import step as step_lib
    from jaxaccel.config import ConfigError, QuantConfig
    from jaxaccel.models import build_model
    from jaxaccel.optim import build_optimizer
    from jaxaccel.parallel import MeshParallel
    from jaxaccel.plan import make_plan, with_conv
    from jaxaccel.setup import check_inputs, decoding_of
    from jaxaccel.step_groups import make_step_fn
    from jaxaccel.surgeons import surgeons
    from jaxaccel.surgery import points

    if cfg.parallel.mode != "jit":
        raise ConfigError(f"parallel.mode={cfg.parallel.mode} is not compiled ahead of time yet: use parallel.mode=jit")
    if cfg.data.pipeline == "stream":
        raise ConfigError("data.pipeline=stream is not compiled ahead of time yet: the AOT compile builds the "
                          "resident pipeline (data.pipeline=resident or auto)")
    # The dataset's shapes from its prepared files' JSON (or the catalog): nothing is decoded.
    sizes, sizes_source = dataset_sizes(cfg.data.name, cfg.data.dir, decoding_of(cfg))
    if sizes is None:
        raise ConfigError(f"{cfg.data.name}: no prepared files to read the shapes from (tfds mock data?)")
    input_dtype = np.dtype(sizes.input_dtype)
    check_inputs(cfg, types.SimpleNamespace(input_dtype=input_dtype, input_shape=sizes.input_shape))
    par = MeshParallel(cfg.parallel.fsdp, cfg.parallel.fsdp_size, devices=devices)
    if cfg.train.batch_size % par.size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the {par.size} "
                          "devices it is split over")
    backend = devices[0].platform  # "tpu" or "gpu", as jax.default_backend() names them
    n_train, n_test = sizes.num_train, sizes.num_test
    plan = make_plan(cfg, n_train, backend)
    cfg = durations.resolve(cfg, plan.steps_per_epoch, plan.total_steps)
    # The step groups the run would compile (a surgery point ends a group); the compiled model is
    # the one the run starts with.
    plan = dataclasses.replace(plan, surgery_points=points(surgeons(cfg), plan.total_steps))
    total = plan.total_steps
    model = build_model(with_conv(cfg.model, plan.conv), sizes.num_classes, cfg.precision, cfg.quant)
    eval_model = build_model(with_conv(cfg.model, "xla"), sizes.num_classes, cfg.precision, cfg.quant)
    tx = build_optimizer(cfg, total)
    root = jax.random.key(cfg.seed)
    init_key, step_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 2)

    def create(key):
        variables = dict(model.init(key, jnp.zeros((1, *sizes.input_shape), input_dtype)))
        params = variables.pop("params")
        return step_lib.TrainState.create(params, tx, model_state=variables)

    abstract = jax.eval_shape(create, init_key)
    state_sharding = par.state_sharding(abstract)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=par.leaf_sharding(a)), abstract)

    def sds(shape, dtype, sharding=par.replicated):
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

    # The resident pipeline: the whole dataset replicated on every device.
    inputs, labels = sds((n_train, *sizes.input_shape), input_dtype), sds((n_train,), jnp.int32)
    index = sds((), jnp.int32)
    if plan.loop == "unroll":
        variants = {f"_x{k}": {"unroll": k} for k in sorted({1, plan.steps_per_call})}
    elif plan.static_trip_count:
        variants = {f"_n{n}": {"unroll": None, "trip_count": n} for n in plan.compiled_lengths()}
    else:
        variants = {"": {"unroll": None}}
    functions: dict[str, dict[str, Any]] = {}

    def function(fn, args, out_shardings=None, donate_argnums=()) -> dict[str, Any]:
        return {"fn": fn, "args": args, "out_shardings": out_shardings, "donate_argnums": donate_argnums}

    def groups(name: str, group_tx) -> None:
        step_fn = make_step_fn(cfg, model.apply, group_tx, total, None)
        for suffix, variant in variants.items():
            fn = step_lib.make_train_steps(step_fn, batch_size=cfg.train.batch_size, batch_sharding=par.batch_sharding,
                                           step_key=step_key, **variant)
            args = (state, inputs, labels, labels, index, index)
            if "trip_count" in variant:  # the measurement sums carried from call to call
                sums = jax.eval_shape(fn.initial_sums, *args[:-1])
                args = (*args, jax.tree.map(lambda a: sds(a.shape, a.dtype), sums))
            functions[name + suffix] = function(fn, args, out_shardings=(state_sharding, par.replicated),
                                                donate_argnums=(0,))

    if plan.guard == "rollback":
        groups("train_steps", build_optimizer(cfg, total, assume_finite=True))
        if sparsity.changes_masks(cfg.sparsity):
            groups("train_steps_fixed_masks", build_optimizer(cfg, total, assume_finite=True, refresh=False))
        groups("train_steps_guarded", tx)
        functions["copy_state"] = function(lambda s: jax.tree.map(jnp.copy, s), (state,),
                                           out_shardings=state_sharding)
    else:
        groups("train_steps", tx)

    eval_batch = -(-cfg.train.eval_batch_size // par.size) * par.size  # as the trainer rounds it
    padded = math.ceil(n_test / eval_batch) * eval_batch
    test = (sds((padded, *sizes.input_shape), input_dtype), sds((padded,), jnp.int32), sds((padded,), jnp.float32))
    functions["eval"] = function(step_lib.make_eval(eval_model.apply, eval_batch, par.batch_sharding),
                                 ({"params": state.params, **state.model_state}, *test, index),
                                 out_shardings=par.replicated)

    # The compression report (and the export's inference): the plain float model, one device.
    one = SingleDeviceSharding(devices[0])
    plain = build_model(with_conv(cfg.model, "xla"), sizes.num_classes)
    params = jax.tree.map(lambda a: sds(a.shape, a.dtype, one), state.params)
    quant = cfg.quant if cfg.quant.mode != "none" else QuantConfig(mode="ptq")
    qparams, scales = jax.tree.map(lambda a: sds(a.shape, a.dtype, one),
                                   jax.eval_shape(lambda p: prec.quantize_params(p, quant), params))
    x = sds((min(_REPORT_BATCH, n_test), *sizes.input_shape), input_dtype, one)
    functions["report_float"] = function(lambda p, x: plain.apply({"params": p}, x), (params, x))
    functions["report_int8"] = function(lambda q, s, x: prec.int8_apply(plain, q, s, x, cfg=quant),
                                        (qparams, scales, x))

    platform = "cuda" if backend == "gpu" else backend
    return functions, {
        "parallel": "jit", "fsdp": cfg.parallel.fsdp, "mesh": dict(par.mesh.shape),
        "loop": plan.loop, "steps_per_call": plan.steps_per_call, "static_trip_count": plan.static_trip_count,
        "steps_per_epoch": plan.steps_per_epoch, "total_steps": total,
        "surgery_points": list(plan.surgery_points), "conv": plan.conv if hasattr(cfg.model, "conv") else None, "eval_conv": "xla", "guard": plan.guard,
        "int8_conv_result": prec.INT8_CONV_RESULT.get(platform, "float32"),
        "batch_size": cfg.train.batch_size, "eval_batch_size": eval_batch,
        "pipeline": "resident", "data_bytes_per_device": int(sizes.resident_bytes),
        "dataset_sizes_from": sizes_source}, state


def representatives(names: list[str]) -> list[str]:
    """``names`` with one step group per family: of the executables that differ only in their
    compiled-in length (``train_steps_n4`` ... ``_n64``, ``_x1``/``_x10``), the longest. The others
    are the same program with another trip count: a check that the run compiles at all need not
    pay for each (each is a full XLA:TPU compile, ~30 s for a sparse MLP on 2 cores)."""
    import re
    longest: dict[str, tuple[int, str]] = {}
    for name in names:
        match = re.fullmatch(r"(.*)_[nx](\d+)", name)
        family, length = (match.group(1), int(match.group(2))) if match else (name, 0)
        longest[family] = max(longest.get(family, (-1, "")), (length, name))
    return [name for _, name in longest.values()]

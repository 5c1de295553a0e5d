"""What a run leaves in its workdir besides checkpoints and metrics: ``config.json`` at the start,
the export and ``summary.json`` at the end (process 0 writes them)."""
from __future__ import annotations

import dataclasses
import json
import platform
from importlib import metadata
from typing import Any

import jax
import numpy as np

from jaxaccel import compression
from jaxaccel import export as export_lib
from jaxaccel import sparsity
from jaxaccel import surgery
from jaxaccel.models import build_model
from jaxaccel.parallel import local_copy
from jaxaccel.plan import with_conv
from jaxaccel.setup import Setup

__all__ = ["write_config", "note_surgery", "finish"]


def _versions() -> dict[str, str]:
    return {p: metadata.version(p) for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")}


def write_config(setup: Setup, state: Any, changes: list[dict[str, Any]] = ()) -> None:
    """``config.json``: the resolved config, overrides, versions, devices and the plan, and the
    model changes so far (``changes``: :func:`jaxaccel.surgery.line` records; a resumed run's)."""
    cfg, devices = setup.cfg, jax.devices()
    record = {"experiment": cfg.experiment, "config": cfg.to_dict(), "overrides": setup.overrides,
              "versions": _versions(), "python": platform.python_version(),
              "device_kind": devices[0].device_kind, "device_count": len(devices),
              "parallel": {"mode": cfg.parallel.mode, "devices": setup.parallel.size, "fsdp": cfg.parallel.fsdp,
                           "state_bytes_per_device": setup.parallel.state_bytes_per_device(state),
                           **setup.parallel.describe(state)},
              "data": setup.pipeline,
              "backend": jax.default_backend(), "process_count": jax.process_count(),
              "plan": dataclasses.asdict(setup.plan)}
    if changes or setup.plan.surgery_points:
        record["surgery"] = list(changes)
    (setup.workdir / "config.json").write_text(json.dumps(record, indent=2))


def note_surgery(setup: Setup, changes: list[dict[str, Any]]) -> None:
    """Record the model changes so far in ``config.json`` (its ``config`` stays the run's as given)."""
    path = setup.workdir / "config.json"
    record = json.loads(path.read_text())
    record["surgery"] = list(changes)
    path.write_text(json.dumps(record, indent=2))


def finish(setup: Setup, state: Any, timings: dict[str, Any], last_eval: dict[str, float],
           flops_per_step: float | None) -> dict[str, Any]:
    """Export the final model and write ``summary.json`` (process 0); returns the summary."""
    cfg, ds, model_cfg = setup.cfg, setup.dataset, setup.model_cfg  # the model in force at the end
    state = setup.parallel.single(state)
    params = local_copy(state.params)
    model_state = local_copy(state.model_state)  # batch statistics (user models, resnet with norm=batch)
    param_count = int(sum(np.size(p) for p in jax.tree.leaves(params)))
    seconds = timings["train_seconds"]
    summary = {
        "experiment": cfg.experiment, "test_accuracy": last_eval["accuracy"], "test_loss": last_eval["loss"],
        "steps": int(local_copy(state.step)), "train_seconds": seconds, "compile_seconds": timings["compile_seconds"],
        "examples_per_second": timings["steps_run"] * cfg.train.batch_size / seconds if seconds else 0.0,
        "sparsity": sparsity.report(params, cfg.sparsity)["sparsity"], "param_count": param_count,
        "model_bytes": param_count * 4, "seconds_to_first_step": timings["startup"],
        "epoch_seconds": timings["epoch_seconds"],
    }
    # The early-bird ticket (sparsity.schedule=early_bird): when it was drawn and why.
    summary.update({k: v for k, v in last_eval.items() if k.startswith("early_bird_")})
    if timings.get("surgery") or setup.plan.surgery_points:
        summary.update(model=surgery.model_record(model_cfg), surgery=timings["surgery"],
                       surgery_compile_seconds=timings["surgery_compile_seconds"])
    # Achieved model FLOP/s: XLA's count for the compiled step (all devices) over the training time.
    if flops_per_step:
        summary["flops_per_step"] = flops_per_step * setup.parallel.size
        summary["model_flops_per_second"] = summary["flops_per_step"] * timings["steps_run"] / seconds if seconds else 0.0
    if setup.is_writer:
        precision = cfg.precision.model_dump() if cfg.precision != type(cfg.precision)() else None
        summary["compressed_bytes"], summary["export_form"] = export_lib.save(
            setup.workdir / "export", params, model=with_conv(model_cfg, setup.plan.conv).model_dump(),
            num_classes=ds.num_classes,
            image_shape=ds.input_shape, input_dtype=ds.input_dtype.name, precision=precision,
            quant=cfg.quant.model_dump(), model_state=model_state)
        plain = build_model(with_conv(model_cfg, "xla"), ds.num_classes)
        plain = export_lib.bind_state(plain, model_state)
        summary["compression"] = compression.report(params, plain, ds.test_inputs, ds.test_labels, cfg.quant)
        (setup.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

"""The training loop of one run: ``train(cfg) -> summary``, readable top to bottom.

Setup (runtime, data, devices, plan, models: setup.py) -> initial state (fresh, resumed or
fine-tuned) -> compile the step groups and the evaluation -> loop over step groups, logging,
changing the model's shapes where a surgeon acts (jaxaccel.surgery), evaluating and checkpointing on
the way -> final evaluation, checkpoint, export and summary.
Pretraining another run first (``init.pretrain``) is :mod:`jaxaccel.pipeline`'s job.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxaccel import failures
from jaxaccel import feed as feed_lib
from jaxaccel import outputs
from jaxaccel import precision as prec
from jaxaccel import setup as setup_lib
from jaxaccel import sparsity
from jaxaccel import step as step_lib
from jaxaccel import surgery
from jaxaccel.surgeons import surgeons
from jaxaccel import workdir as workdir_lib
from jaxaccel.checkpoint import Checkpointer
from jaxaccel.metrics import MetricsWriter, Progress, tensorboard_enabled
from jaxaccel.precision import NonFiniteError
from jaxaccel.runtime import PreemptionNotice, Preempted, fault_point, init_distributed
from jaxaccel.step_groups import StepGroups

__all__ = ["train", "epoch_order"]


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The epoch's example order: a pure function of (seed, epoch), the same on every process.
    Drawn on the host with NumPy's PCG64 (about a millisecond for 60k examples; XLA:CPU's sorts for
    jax.random.permutation took a noticeable part of an epoch, benchmarks/README.md)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, setup_lib.DATA_STREAM, epoch])))
    return rng.permutation(num_examples).astype(np.int32)


def _process_age() -> float | None:
    """Seconds since this process started (Linux /proc, 10 ms resolution); None elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def train(cfg, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate, checkpoint and export the run ``cfg`` describes; returns the summary.

    ``overrides`` (the command-line ``key=value`` strings, if any) are recorded in config.json.
    A run whose workdir already has checkpoints resumes from the latest one; a workdir another
    run holds is refused (:mod:`jaxaccel.workdir`).
    """
    init_distributed(cfg)  # before the workdir lock, which is taken per process index
    with workdir_lib.held(setup_lib.workdir_of(cfg), jax.process_index()):
        return _train(cfg, overrides)


def _train(cfg, overrides: list[str] | None) -> dict[str, Any]:
    # The notice spans the whole run, start-up and export included: a SIGTERM or Ctrl-C is acted on
    # at the next step-group boundary (or before training starts) and never cuts a save short.
    with PreemptionNotice() as notice:
        # ------------------------------------------------------------------------------------
        # Setup: runtime, data, devices, plan, models.
        setup = setup_lib.build(cfg, overrides)
        fault_point("setup", 0)
        setup.workdir.mkdir(parents=True, exist_ok=True)
        tensorboard = tensorboard_enabled(cfg.train.tensorboard)
        progress = Progress(setup.plan.total_steps, 0, cfg.train.batch_size)
        checkpointer = Checkpointer(setup.workdir / "checkpoints", cfg.checkpoint.max_to_keep)
        finished = _finished_summary(setup, checkpointer)
        if finished is not None:
            progress.message(f"already done: {setup.workdir} holds this run, finished at step {finished['steps']} "
                             "(every file left as it was); use another workdir to train it again")
            progress.close()
            checkpointer.close()
            return finished
        # The setup comes back with the model in force at the end (a surgeon may have changed it).
        setup, state, timings, last_eval, flops = _run(setup, checkpointer, tensorboard, progress, notice)
        fault_point("export", setup.plan.total_steps)
        summary = outputs.finish(setup, state, timings, last_eval, flops)
        if notice.received:
            print(f"{notice.signal_name} during the export: finished it first (the run is complete)", flush=True)
        return summary


def _run(setup: setup_lib.Setup, checkpointer: Checkpointer, tensorboard: bool, progress: Progress,
         notice: PreemptionNotice):
    """The initial state and the loop, with what any failure must leave behind: the checkpoints
    already started committed, one clear error for a lost peer or a full disk."""
    writer = None
    try:
        # ------------------------------------------------------------------------------------
        # Initial state: the latest checkpoint, init.from, or fresh.
        setup, state, step, resumed = setup_lib.starting_point(setup, checkpointer, progress.message)
        if setup.is_writer:
            writer = MetricsWriter(setup.workdir / "metrics.jsonl", resume_step=step, tensorboard=tensorboard)
            outputs.write_config(setup, state, resumed.get("surgery", []))
        with feed_lib.make_feed(setup, epoch_order) as feed:  # closed on errors and preemption too
            return _loop(setup, feed, state, step, resumed, checkpointer, writer, progress, notice)
    except Exception as e:
        if jax.process_count() > 1 and failures.peer_failure(e):
            raise failures.lost_peer(e, checkpointer) from None
        if failures.out_of_space(e):
            raise failures.disk_full(e, setup.workdir, checkpointer) from None
        raise
    finally:
        # Also on errors: commit the checkpoints already started, so nothing saved is lost
        # (a second report of a write error that is already propagating is not raised again).
        failing = sys.exc_info()[0] is not None
        try:
            checkpointer.close()
        except Exception as e:
            if not failing:
                if failures.out_of_space(e):
                    raise failures.disk_full(e, setup.workdir, checkpointer) from None
                raise
        progress.close()
        if writer:
            writer.close()


def _finished_summary(setup: setup_lib.Setup, checkpointer: Checkpointer) -> dict[str, Any] | None:
    """The summary of this very run if the workdir holds it finished (its last checkpoint, its
    summary.json and the same config), else None."""
    summary, config = setup.workdir / "summary.json", setup.workdir / "config.json"
    if checkpointer.latest_step() != setup.plan.total_steps or not (summary.exists() and config.exists()):
        return None
    if json.loads(config.read_text()).get("config") != setup.cfg.to_dict():
        return None
    return json.loads(summary.read_text())


def _compiled(setup: setup_lib.Setup, feed, state) -> tuple[StepGroups, Any]:
    """The step groups and the evaluator of the model in force, compiled for ``state``."""
    cfg, par = setup.cfg, setup.parallel
    groups = StepGroups(cfg, setup.plan, par, setup.model.apply, setup.step_key, setup.serialize_calls)
    groups.compile(state, feed)
    # Evaluation batches split over the devices: rounded up to a multiple of them (padding weighs 0).
    eval_batch = -(-cfg.train.eval_batch_size // par.size) * par.size
    evaluator = feed.evaluator(setup.eval_model.apply, eval_batch, setup.serialize_calls)
    evaluator.compile(state)
    return groups, evaluator


def _loop(setup: setup_lib.Setup, feed, state, step: int, resumed: dict[str, Any], checkpointer: Checkpointer,
          writer: MetricsWriter | None, progress: Progress, notice: PreemptionNotice):
    """Compile, then train step groups to the end with model changes, evaluations and checkpoints on
    the way. ``feed`` brings the batches (jaxaccel.feed: resident or streamed); ``resumed`` is the
    record of the checkpoint the run resumed from: the training time and model changes so far.
    Returns the setup of the final model with the state, timings, last evaluation and FLOPs."""
    cfg, plan, par = setup.cfg, setup.plan, setup.parallel
    if notice.should_stop():  # a notice during start-up: nothing trained, nothing new to save
        progress.message(f"{notice.signal_name} during start-up: stopped before training (the workdir is as it "
                         f"was at step {step}); run the same command again to resume")
        raise Preempted(step, notice.signal_name)

    # ----------------------------------------------------------------------------------------
    # Data (on device, or streaming from here on), and the compiled functions (timed apart from training).
    feed.start(step)
    for warning in prec.check_backend(cfg.precision):
        progress.message(f"warning: {warning}")
    t0 = time.perf_counter()
    groups, evaluator = _compiled(setup, feed, state)
    compile_seconds = time.perf_counter() - t0
    progress.message(f"compiled in {compile_seconds:.1f}s; {plan.total_steps - step} steps to run "
                     f"({plan.loop}, {plan.steps_per_call or 'any'} steps per call) on "
                     f"{par.size} {jax.devices()[0].platform} device(s), parallel.mode={cfg.parallel.mode}")
    progress.restart(step)
    # Start-up: everything before the first training step (imports, data, init, restore, compile).
    startup = {"from_train_call": time.perf_counter() - setup.started, "from_process_start": _process_age()}

    # ----------------------------------------------------------------------------------------
    # Evaluation and logging.
    def evaluate(state, at_step):
        fault_point("eval", at_step)
        if cfg.parallel.check_replicas and par.size > 1:
            # Divergent replicas would train different models while reporting one.
            leaves = par.check_replicas(state)
            progress.message(f"step {at_step}: replica check: {leaves} state leaves bit-identical on "
                             f"{par.size} devices, {jax.process_count()} process(es)")
        record = {"step": at_step, "split": "test", **evaluator(state), "train_seconds": train_seconds,
                  **sparsity.report(par.single(state).params, cfg.sparsity),
                  **sparsity.early_bird_record(par.host(sparsity.early_bird_state(state.opt_state)))}
        if writer:
            writer.write(record)
        ticket = (f", early-bird ticket drawn at step {record['early_bird_step']} ({record['early_bird_reason']})"
                  if record.get("early_bird_step") is not None else "")
        progress.message(f"step {at_step}: test accuracy {record['accuracy']:.4f}, loss {record['loss']:.4f}, "
                         f"sparsity {record['sparsity']:.4f}{ticket}")
        return record

    def flush(pending):
        """Write the training line of a finished step group (fetched one group late, so the host
        does not wait for the device except at evaluations and checkpoints)."""
        if pending is None:
            return
        end, count, sums = pending
        raw = par.host(sums)
        finite, skipped = float(raw.pop("finite_steps")), int(raw.pop("skipped_steps"))
        scale, run_length = float(raw.pop("loss_scale")), int(raw.pop("nonfinite_run"))  # the group's longest run
        record = {"step": end, **{k: float(v) if k in step_lib.LAST_OF_GROUP else float(v) / max(finite, 1.0)
                                  for k, v in raw.items()}}
        if prec.resolve_mode(cfg.precision) != "none":
            record["loss_scale"] = scale
        if skipped:
            record["skipped_nonfinite_steps"] = skipped
            progress.message(f"skipped {skipped} non-finite step(s) in steps {end - count + 1}-{end}")
        if writer:
            writer.write(record)
        if run_length >= cfg.precision.max_nonfinite_steps:
            raise NonFiniteError(
                f"{run_length} consecutive non-finite steps (loss or gradients) by step {end} "
                f"(precision.max_nonfinite_steps={cfg.precision.max_nonfinite_steps}); stopped. Nothing "
                f"non-finite was checkpointed or exported. {failures.nonfinite_advice(cfg)}")
        progress.update(end, record["loss"] if finite else float("nan"))

    # ----------------------------------------------------------------------------------------
    # Model surgery: a surgeon changes the model's shapes; the new model is compiled (timed apart).
    active, changes = surgeons(cfg), list(resumed.get("surgery", []))
    flops = surgery.FlopsTally(step)

    def change_model(state, at_step):
        """The state after the surgeons due at ``at_step`` acted, and the seconds compiling took."""
        nonlocal setup, groups, evaluator
        change = surgery.operate(active, at_step, par.single(state), setup.model_cfg, groups.tx)
        if change is None:
            return state, 0.0
        setup, state = setup_lib.rebuild(setup, change.model), par.put_state(change.state)
        t0 = time.perf_counter()  # from here to the new model's first step: not training time
        flops.add(groups.flops_per_step(), at_step)  # the old model's XLA cost analysis
        groups, evaluator = _compiled(setup, feed, state)
        line = surgery.line(at_step, change, time.perf_counter() - t0, state.params)
        changes.append(line)
        if writer:
            writer.write(line)
            outputs.note_surgery(setup, changes)
        progress.message(f"step {at_step}: {surgery.describe(line)}")
        progress.restart(at_step)  # rates and ETA from here on, without the compile
        fault_point("surgery", at_step)
        return state, line["compile_seconds"]

    # ----------------------------------------------------------------------------------------
    # The loop: step groups between log points, epoch ends and checkpoints.
    last_eval, pending = None, None
    # Training time over the whole run (kept in each checkpoint's record across restarts), and the
    # steps it covers; the time of each epoch run whole in one process (a resumed partial epoch is
    # left out).
    train_seconds, timed_steps = resumed.get("train_seconds", 0.0), resumed.get("timed_steps", 0)
    epoch_seconds = list(resumed.get("epoch_seconds", []))
    first_step, t_start = step, time.perf_counter()
    epoch_mark = train_seconds if step % plan.steps_per_epoch == 0 else None
    while step < plan.total_steps:
        end = plan.next_boundary(step)
        state, sums = groups.run(state, feed.group(step, end - step), step % plan.steps_per_epoch, end - step)
        flush(pending)
        pending, step = (end, end - step, sums), end
        at_epoch_end = step % plan.steps_per_epoch == 0
        preempted = notice.should_stop()
        at_checkpoint = step % plan.checkpoint_every == 0 or preempted
        at_surgery = step in plan.surgery_points  # the surgeons' points, each a group boundary
        if at_epoch_end or at_checkpoint or at_surgery or step == plan.total_steps:
            flush(pending)  # raises on a non-finite loss before anything is checkpointed
            pending = None
            jax.block_until_ready(state)
            state, recompile_seconds = change_model(state, step) if at_surgery else (state, 0.0)
            train_seconds += time.perf_counter() - t_start - recompile_seconds
            if at_epoch_end:
                if epoch_mark is not None:
                    epoch_seconds.append(train_seconds - epoch_mark)
                epoch_mark = train_seconds
            if at_epoch_end or step == plan.total_steps:
                last_eval = evaluate(state, step)
            # ------------------------------------------------------------------------------------
            # Checkpoint.
            if at_checkpoint or step == plan.total_steps:
                single = par.single(state)
                checkpointer.save(step, single, Checkpointer.meta_for(
                    single, step=step, train_seconds=train_seconds, timed_steps=timed_steps + step - first_step,
                    epoch_seconds=epoch_seconds, **surgery.checkpoint_record(setup, changes)))
                fault_point("save", step)  # the async write is still in flight here
            t_start = time.perf_counter()
        if preempted:
            # Said only once it is true; a second SIGTERM meanwhile only sets the notice again.
            checkpointer.wait()
            progress.message(f"{notice.signal_name}: checkpointed step {step}; run the same command again to resume")
            raise Preempted(step, notice.signal_name)
    if last_eval is None:  # resumed at the end: nothing left to train
        last_eval = evaluate(state, step)
    if feed.examples_read is not None:
        progress.message(f"data: process {jax.process_index()} of {jax.process_count()} read {feed.examples_read} "
                         f"training examples ({setup.pipeline['pipeline']} pipeline)")
    timings = {"steps_run": timed_steps + step - first_step, "train_seconds": train_seconds, "compile_seconds": compile_seconds,
               "startup": startup, "epoch_seconds": epoch_seconds, "surgery": changes,
               "surgery_compile_seconds": sum(c["compile_seconds"] for c in changes)}
    return setup, state, timings, last_eval, flops.per_step(groups.flops_per_step(), step)

"""Checkpoints through orbax's CheckpointManager: atomic, kept to ``max_to_keep``, written async.

A checkpoint holds the whole train state (params, optimizer state, step, model state) plus a small JSON record
(the step, leaf shapes and a checksum of every leaf). Data order and per-step RNG are pure
functions of (seed, step), so the step is all a resumed run needs to continue exactly where it
stopped. A restored state is checked against the checksums written with it: orbax reads flipped
bytes in a data file back without complaint, and a corrupt Adam moment only shows up (if at all)
as a non-finite loss thousands of steps later.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxaccel import storage
from jaxaccel.parallel import checksum

__all__ = ["Checkpointer", "CheckpointMismatch", "CheckpointUnreadable", "CheckpointCorrupt", "checksums"]


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit this model/config; the CLI exits 2 with the listed differences."""


class CheckpointUnreadable(RuntimeError):
    """The latest checkpoint is corrupt or incomplete (and no fallback was asked for)."""


class CheckpointCorrupt(RuntimeError):
    """A restored leaf does not match the checksum written with it (handled as unreadable)."""


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> jax.Array:
    """[leaves, 2] uint32: each leaf's :func:`jaxaccel.parallel.checksum` (integer sums, exact in
    any order, so the same however the leaf is sharded); only these bytes leave the device."""
    return jnp.stack([checksum(leaf) for leaf in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def checksums(tree: Any) -> dict[str, str]:
    """A checksum of every array leaf of ``tree`` (global arrays: every process of a multi-process
    run must call this at the same point), computed on device, keyed by leaf path."""
    flat = [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(leaf, (jax.Array, np.ndarray))]
    sums = _leaf_sums([leaf for _, leaf in flat])
    table = np.asarray(sums.addressable_data(0) if isinstance(sums, jax.Array) else sums)
    return {name: f"{a:08x}{b:08x}" for (name, _), (a, b) in zip(flat, table.tolist())}


def _shapes(tree: Any) -> dict[str, tuple]:
    return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", ()))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def describe_mismatch(expected: Any, found: dict[str, tuple]) -> list[str]:
    """Lines naming parameter paths whose presence or shape differs."""
    want = _shapes(expected)
    lines = [f"  {k}: checkpoint {found.get(k, 'missing')}, model {v}" for k, v in want.items() if found.get(k) != v]
    lines += [f"  {k}: checkpoint {v}, model missing" for k, v in found.items() if k not in want]
    return lines


def _quiet_cancelled_io() -> None:
    """After a failed restore, orbax's I/O threads report callbacks onto the event loop it closed
    ("Event loop is closed"); drop exactly those reports, let every other error through.
    Idempotent: installs the filters once per process."""
    import sys
    import threading

    def cancelled(exc: BaseException | None) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    if getattr(threading.excepthook, "_jaxaccel_filter", False):
        return
    previous_thread, previous_unraisable = threading.excepthook, sys.unraisablehook
    def thread_hook(args):
        if not cancelled(args.exc_value):
            previous_thread(args)

    thread_hook._jaxaccel_filter = True
    threading.excepthook = thread_hook
    sys.unraisablehook = lambda u: None if cancelled(u.exc_value) else previous_unraisable(u)


class _OrbaxFailureEcho(logging.Filter):
    """Drops orbax's ERROR log lines about a failed background write: the same error is raised in
    the main thread at the next save or at close, where the run reports it in one line."""
    ECHOES = ("_SignalingThread.run() raised an exception", "Handler Commit operations",
              "Save Finalize thread", "background save thread")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname
                    and any(echo in record.getMessage() for echo in self.ECHOES))


def _quiet_background_failures() -> None:
    """Idempotent: one filter on absl's logger, and the cancelled-I/O reports dropped."""
    _quiet_cancelled_io()
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxFailureEcho) for f in logger.filters):
        logger.addFilter(_OrbaxFailureEcho())
class _Manager(ocp.CheckpointManager):
    """Orbax's manager without its own calls to JAX's preemption sync point.

    The sync point is one process-wide counter that every caller must advance in step: orbax
    calls it with checkpoint step numbers (at save start, and again from its background commit
    thread with older steps), while the training loop calls it with consecutive step-group
    counts (:class:`jaxaccel.runtime.PreemptionNotice`). Mixed, the agreed stop point was a
    number the loop never calls with, and a preempted multi-process run trained on to the end.
    The loop alone decides when to save for a preemption, so orbax does not need to know."""

    def reached_preemption(self, step: int) -> bool:
        return False


class Checkpointer:
    """Saves and restores the train state under ``directory``."""

    def __init__(self, directory: str | storage.StoragePath, max_to_keep: int):
        _quiet_background_failures()
        # A URL reaches orbax as the text given: orbax picks its commit protocol from the scheme (on
        # gs:// a commit_success file, as an object store cannot rename a directory atomically) and
        # TensorStore its driver. A local path is made absolute, as it always was.
        target = os.fspath(directory) if storage.is_url(directory) else Path(directory).absolute()
        self.manager = _Manager(
            target, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start writing a checkpoint; the device-to-host copy finishes before this returns, so the
        caller may donate ``state`` right after."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore_latest(self, target: Any, fallback: bool) -> tuple[Any, int, list[str]]:
        """Restore the newest readable checkpoint into ``target``'s structure and shardings
        (``target``: a state, or a function of a checkpoint's record returning one, see :meth:`restore`).

        Returns (state, step, notes). An unreadable newest checkpoint is an error naming it,
        unless ``fallback``: then older ones are tried in turn and ``notes`` says what was skipped.
        A checkpoint of another model is always an error (CheckpointMismatch), never skipped.
        """
        notes = []
        _quiet_cancelled_io()  # installed first: the reports can come before the error surfaces
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                state, _ = self.restore(step, target)
                return state, step, notes
            except CheckpointMismatch:
                raise
            except CheckpointCorrupt as e:
                problem = f"checkpoint step {step} in {self.manager.directory} is corrupt ({e})"
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for bad files
                problem = f"checkpoint step {step} in {self.manager.directory} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            older = steps[i + 1:]
            if not fallback:
                hint = (f"set checkpoint.fallback=true to restore step {older[0]} instead, or " if older else "")
                raise CheckpointUnreadable(f"{problem}; {hint}delete {self.manager.directory / str(step)} "
                                           "to start from the checkpoint before it") from None
            notes.append(f"{problem}; falling back to an older one")
        raise CheckpointUnreadable(f"no readable checkpoint in {self.manager.directory}: " + "; ".join(notes))

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restore checkpoint ``step`` into the structure, shapes and shardings of ``target``: a
        state, or a function of the checkpoint's JSON record returning one (a run whose model
        changed shapes mid-run builds the target of the model the record names)."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if callable(target):
            target = target(meta)
        found = {k: tuple(v) for k, v in meta.get("shapes", {}).items()}
        problems = describe_mismatch(target, found)
        if problems:
            raise CheckpointMismatch(
                f"checkpoint step {step} in {self.manager.directory} was written for another model or "
                "config; mismatched parameter paths and shapes:\n" + "\n".join(problems) +
                "\nUse a new workdir, or the config that wrote it.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        if "checksums" in meta:  # checkpoints written before checksums existed are taken as they are
            found = checksums(restored["state"])
            bad = [k for k, v in meta["checksums"].items() if found.get(k) != v]
            if bad:
                raise CheckpointCorrupt(f"{len(bad)} of {len(found)} leaves differ from the checksums written "
                                        f"with them ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
        return restored["state"], meta

    @staticmethod
    def meta_for(state: Any, **extra: Any) -> dict[str, Any]:
        """The JSON record saved beside ``state``: its leaf shapes (to detect mismatches), a checksum
        of every leaf (to detect corruption; computed on device, so every process must call this
        at the same step) and extras."""
        return {"shapes": {k: list(v) for k, v in _shapes(state).items()}, "checksums": checksums(state), **extra}

    def committed_steps(self) -> list[int]:
        """Steps whose checkpoints are fully written, oldest first (read from the directory, with
        orbax's own test of a finished checkpoint: renamed from its temporary name on a local
        disk, holding its commit_success file on GCS)."""
        return sorted(ocp.step.checkpoint_steps(self.manager.directory))

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON record saved with checkpoint ``step``."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        """Block until every checkpoint started so far is committed (surfacing write errors)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for async writes (surfacing their errors) and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

"""What a failed run says: one line naming the problem, what is kept and what to do.

The training loop raises these (or turns lower-level errors into them); ``jaxaccel.run`` prints
them and exits with the contract's status.
"""
from __future__ import annotations

import errno
from pathlib import Path

import jax

from jaxaccel import precision as prec
from jaxaccel.checkpoint import Checkpointer
from jaxaccel.runtime import DistributedError

__all__ = ["DiskFull", "out_of_space", "disk_full", "nonfinite_advice", "peer_failure", "lost_peer"]


class DiskFull(OSError):
    """A write failed for lack of space; what was committed before is kept (the CLI exits 1)."""


def out_of_space(error: BaseException | None) -> bool:
    """Whether ``error`` (or one it was raised from) is a write that ran out of space."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full(error: BaseException, workdir: Path, checkpointer: Checkpointer) -> DiskFull:
    """The one-line error for a write that ran out of space, naming what was committed before."""
    where = getattr(error, "filename", None) or workdir
    committed = checkpointer.committed_steps()
    kept = (f"checkpoints already committed are kept (latest: step {committed[-1]})" if committed
            else "no checkpoint had been committed yet")
    return DiskFull(f"no space left on the device writing under {where}; {kept}. Free space (or choose another "
                    "workdir=) and run the same command again to resume.")


def nonfinite_advice(cfg) -> str:
    """What to change after a run of non-finite steps, for the precision mode that ran."""
    mode = prec.resolve_mode(cfg.precision)
    if mode == "static":
        return (f"The static loss scale (precision.loss_scale_init={cfg.precision.loss_scale_init:g}) overflows "
                "the gradients: lower it, or use precision.loss_scale=dynamic.")
    if mode == "dynamic":
        return ("The dynamic loss scale did not recover: lower precision.loss_scale_init, "
                "lower optim.learning_rate, or set optim.grad_clip_norm.")
    return "Lower optim.learning_rate, set optim.grad_clip_norm, or use float32/bfloat16."


# What a failed cross-process collective says when raised as a plain ValueError/RuntimeError
# rather than a JaxRuntimeError: orbax's save barrier (multihost_utils.sync_global_devices, a jitted
# allgather) raised "ValueError: UNKNOWN: Gloo AllGather failed: ... Connection reset by peer".
_COLLECTIVE_FAILURES = ("Gloo", "Connection reset by peer", "coordination service", "Socket closed")


def peer_failure(error: BaseException) -> bool:
    """Whether ``error``, raised in a multi-process run, is a collective that failed (a peer lost):
    any runtime error from XLA, or a ValueError/RuntimeError naming a failed collective."""
    if isinstance(error, jax.errors.JaxRuntimeError):
        return True
    return isinstance(error, (ValueError, RuntimeError)) and any(m in str(error) for m in _COLLECTIVE_FAILURES)


def lost_peer(error: Exception, checkpointer: Checkpointer) -> DistributedError:
    """With several processes a runtime error is almost always a lost peer (its collectives fail
    with "connection reset" at once): say so instead of a C++ trace."""
    latest = checkpointer.latest_step()
    resume = (f"the run resumes from its latest checkpoint (step {latest})." if latest is not None
              else "no checkpoint was written yet, so it starts over.")
    return DistributedError(
        f"process {jax.process_index()} of {jax.process_count()} stopped: {str(error).splitlines()[0][:300]}. "
        f"If another process died or was killed, restart every process with the same command: {resume}")

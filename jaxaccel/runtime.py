"""The process around a run: the multi-process runtime, preemption notices, fault injection.

Kept apart from the training loop: these talk to the operating system and to other processes,
not to the model.
"""
from __future__ import annotations

import os
import time

import jax

from jaxaccel.config import Config

__all__ = ["DistributedError", "Preempted", "PreemptionNotice", "init_distributed", "fault_point"]


class DistributedError(RuntimeError):
    """The multi-process runtime could not start (wrong address, missing peer)."""


class Preempted(Exception):
    """Raised after a SIGTERM once the reached step is checkpointed; the CLI exits 0."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}; checkpoint saved")
        self.step = step


class PreemptionNotice:
    """Turns SIGTERM (a cloud preemption notice) into a decision the loop takes at step-group ends:
    the run then checkpoints the step it reached and returns normally, instead of dying.

    One process: our own SIGTERM handler sets a flag. Several processes: JAX's preemption sync
    manager (started by ``jax.distributed.initialize``) catches the notice on any host and
    ``reached_preemption_sync_point`` makes every process stop at the same boundary, through the
    coordination service rather than a device collective that could interleave with the step's.
    """

    def __init__(self) -> None:
        self.received = False
        self._previous = None
        self._boundary = 0

    def __enter__(self):
        import signal
        import threading
        # With several processes SIGTERM belongs to JAX's notifier: a Python handler would replace it.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __exit__(self, *exc) -> None:
        import signal
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self) -> bool:
        """True (on every process at the same boundary) once a preemption notice arrived."""
        if jax.process_count() == 1:
            return self.received
        from jax.experimental import multihost_utils
        # The sync point is "max id seen + 1", so ids must be consecutive: count boundaries,
        # which are the same sequence on every process.
        self._boundary += 1
        return multihost_utils.reached_preemption_sync_point(self._boundary)


def fault_point(name: str, step: int) -> None:
    """Test hook: ``JAXACCEL_FAULT=eval@468`` (or ``save@500``) SIGKILLs this process when the run
    reaches that point, so tests can kill it deterministically during an evaluation or while a
    checkpoint is being written."""
    if os.environ.get("JAXACCEL_FAULT") == f"{name}@{step}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Fail clearly if nothing listens at ``address``: JAX's own client aborts the process with a
    C++ stack trace instead of raising when the coordinator cannot be reached."""
    import socket
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host or "localhost", int(port)), timeout=2):
                return
        except (OSError, ValueError) as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"cannot reach the coordinator at {address} within {timeout}s ({e}). Start process 0 "
                    "with the same distributed.coordinator, and check the host:port is reachable.") from None
            time.sleep(0.5)


def init_distributed(cfg: Config) -> None:
    """Start jax.distributed before anything touches devices. With no distributed.* keys set on a
    cluster JAX can detect (Cloud TPU, SLURM, ...), call it with no arguments and let it detect."""
    d = cfg.distributed
    if jax.distributed.is_initialized():
        return
    explicit = d.coordinator is not None or d.num_processes is not None or d.process_id is not None
    if not explicit and not os.environ.get("JAXACCEL_AUTO_DISTRIBUTED"):
        return
    if d.coordinator and d.process_id:  # process 0 starts the coordinator; the others must reach it
        _wait_for_coordinator(d.coordinator, d.init_timeout_seconds)
    print(f"jax.distributed: process {d.process_id} of {d.num_processes}, coordinator {d.coordinator}; "
          f"waiting up to {d.init_timeout_seconds}s for all processes", flush=True)
    try:
        jax.distributed.initialize(coordinator_address=d.coordinator, num_processes=d.num_processes,
                                   process_id=d.process_id, initialization_timeout=d.init_timeout_seconds,
                                   heartbeat_timeout_seconds=d.heartbeat_timeout_seconds)
    except Exception as e:  # noqa: BLE001 - re-raised with what to check
        raise DistributedError(
            f"jax.distributed.initialize failed (coordinator={d.coordinator}, num_processes={d.num_processes}, "
            f"process_id={d.process_id}) within {d.init_timeout_seconds}s: {str(e).splitlines()[0][:300]}. "
            "Check that every process is started with the same coordinator host:port, reachable from all, "
            "and a distinct process_id in [0, num_processes).") from None

"""The process around a run: the multi-process runtime, preemption notices, fault injection.

Kept apart from the training loop: these talk to the operating system and to other processes,
not to the model.
"""
from __future__ import annotations

import os
import time

import jax

from jaxaccel.config import Config, ConfigError

__all__ = ["DistributedError", "Preempted", "PreemptionNotice", "init_distributed", "fault_point",
           "check_distributed", "detected_cluster"]


class DistributedError(RuntimeError):
    """The multi-process runtime could not start (wrong address, missing peer)."""


class Preempted(Exception):
    """Raised after a SIGTERM (or Ctrl-C) once the reached step is checkpointed; the CLI exits 0
    (130 for Ctrl-C, as a shell expects of an interrupted command)."""

    def __init__(self, step: int, signal_name: str = "SIGTERM"):
        super().__init__(f"{signal_name}: stopped at step {step}; checkpoint saved")
        self.step, self.signal_name = step, signal_name


class PreemptionNotice:
    """Turns SIGTERM (a cloud preemption notice) into a decision the loop takes at step-group ends:
    the run then checkpoints the step it reached and returns normally, instead of dying.

    One process: our own SIGTERM and SIGINT (Ctrl-C) handler sets a flag, so Ctrl-C stops at a
    checkpoint too instead of a KeyboardInterrupt traceback. Several processes: JAX's preemption sync
    manager (started by ``jax.distributed.initialize``) catches the notice on any host and
    ``reached_preemption_sync_point`` makes every process stop at the same boundary, through the
    coordination service rather than a device collective that could interleave with the step's.
    """

    def __init__(self) -> None:
        self.received = False
        self.signal_name = "SIGTERM"
        self._previous: dict = {}
        self._boundary = 0

    def __enter__(self):
        import signal
        import threading
        # With several processes SIGTERM belongs to JAX's notifier: a Python handler would replace it.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        import signal
        if not self.received:
            self.signal_name = signal.Signals(signum).name
        self.received = True

    def __exit__(self, *exc) -> None:
        import signal
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

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
    """Test hook: ``JAXACCEL_FAULT=eval@468`` (or ``save@500``, ``setup@0``, ``export@600``,
    ``surgery@25``) SIGKILLs this process when the run reaches that point, so tests can kill it
    deterministically during an evaluation, while a checkpoint is being written, or right after a
    model change (``surgery@STEP``: the new model is compiled and its ``metrics.jsonl`` line written,
    no checkpoint of it yet); ``...:SIGTERM`` (or ``:SIGINT``) sends that signal instead."""
    point, _, sig = os.environ.get("JAXACCEL_FAULT", "").partition(":")
    if point == f"{name}@{step}":
        import signal
        os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Fail clearly if nothing listens at ``address``: JAX's own client aborts the process with a
    C++ stack trace instead of raising when the coordinator cannot be reached."""
    import socket
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"cannot reach the coordinator at {address} within {timeout}s ({e}). Start process 0 "
                    "with the same distributed.coordinator, and check the host:port is reachable.") from None
            time.sleep(0.5)


_KEYS = ("distributed.coordinator", "distributed.num_processes", "distributed.process_id")


def check_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Raise ConfigError (exit 2, at once) for ``distributed.*`` values that cannot work: a
    coordinator that is not host:port, or a process id outside [0, num_processes). Without this
    JAX says "invalid literal for int()", or process 2 of 2 waits for the whole init timeout."""
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"distributed.coordinator must be host:port, the address of process 0 and a free "
                              f"port, e.g. 10.0.0.2:1234 (got {coordinator!r})")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"distributed.process_id={process_id} is not below distributed.num_processes="
                          f"{num_processes}: process ids are 0 to {num_processes - 1}")


def detected_cluster(environ: dict[str, str] | None = None) -> str | None:
    """The multi-process job this process was started in, read from its environment (SLURM with
    more than one task, Open MPI, a multi-host Cloud TPU, ``JAX_COORDINATOR_ADDRESS``); None when
    it runs alone. Such a process must join its peers, never train as an independent run."""
    env = os.environ if environ is None else environ

    def more_than_one(key: str) -> bool:
        value = env.get(key, "")
        return value.isdigit() and int(value) > 1

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']} is set"
    for key, what in (("SLURM_NTASKS", "a SLURM job"), ("OMPI_COMM_WORLD_SIZE", "an Open MPI job"),
                      ("MEGASCALE_NUM_SLICES", "a multi-slice TPU job")):
        if more_than_one(key):
            return f"this is {what} ({key}={env[key]})"
    for key in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        if len([h for h in env.get(key, "").split(",") if h]) > 1:
            return f"this is a multi-host Cloud TPU ({key} lists {len(env[key].split(','))} hosts)"
    return None


def _auto_detect(coordinator, num_processes, process_id, timeout):
    """Fill unset values from the cluster environment exactly as ``jax.distributed.initialize``
    will (its ClusterEnv detection), so they can be checked before JAX is called."""
    try:
        from jax._src import clusters
        detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
    except (ImportError, AttributeError):  # a JAX without it: leave the detection to initialize()
        return coordinator, num_processes, process_id
    try:
        return tuple(detect(coordinator, num_processes, process_id, None, None, timeout)[:3])
    except Exception as e:  # noqa: BLE001 - a cluster environment that is present but broken
        raise DistributedError(f"JAX's cluster detection failed: {str(e).splitlines()[0][:300]}") from None


def _jax_default(parameter: str) -> int:
    import inspect
    return inspect.signature(jax.distributed.initialize).parameters[parameter].default


def _resolve(explicit: tuple, cluster: str | None, timeout: int) -> tuple[str, int, int]:
    """(coordinator, num_processes, process_id): the ``distributed.*`` values given, the unset
    ones from ``JAX_COORDINATOR_ADDRESS`` and JAX's cluster detection; ConfigError (exit 2)
    naming the keys that are still missing."""
    coordinator, n, pid = explicit
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")  # as initialize() reads it
    if None in (coordinator, n, pid):
        coordinator, n, pid = _auto_detect(coordinator, n, pid, timeout)
    missing = [key for key, value in zip(_KEYS, (coordinator, n, pid)) if value is None]
    if missing:
        why = cluster or ("distributed.* is partly set" if explicit != (None, None, None)
                          else "JAXACCEL_AUTO_DISTRIBUTED is set")
        alone = "; unset the cluster's variables to train one process alone" if cluster else ""
        raise ConfigError(
            f"{why}, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set and JAX could not "
            f"detect {'it' if len(missing) == 1 else 'them'} from the environment: set "
            f"{' '.join(k + '=...' for k in missing)} on every process (under SLURM, start them with srun){alone}")
    check_distributed(coordinator, n, pid)
    return coordinator, n, pid


def init_distributed(cfg: Config) -> None:
    """Start jax.distributed before anything touches devices.

    With ``distributed.*`` set, with them (all three, or the ones a detected cluster does not
    give). With none set, in a cluster job (:func:`detected_cluster`, or with
    ``JAXACCEL_AUTO_DISTRIBUTED=1``) through JAX's detection of the cluster; if that cannot find
    the coordinator, process count and id, ConfigError (exit 2) names what to set: never one of
    N independent runs in a shared workdir. Timeouts left unset (None) are JAX's own.
    """
    d = cfg.distributed
    if jax.distributed.is_initialized():
        return
    check_distributed(d.coordinator, d.num_processes, d.process_id)
    explicit = (d.coordinator, d.num_processes, d.process_id)
    cluster = detected_cluster()
    if explicit == (None, None, None) and cluster is None and not os.environ.get("JAXACCEL_AUTO_DISTRIBUTED"):
        return
    init_timeout = getattr(d, "init_timeout_seconds", None) or _jax_default("initialization_timeout")
    heartbeat = getattr(d, "heartbeat_timeout_seconds", None)
    detect = None in explicit
    coordinator, n, pid = _resolve(explicit, cluster, init_timeout)
    if pid:  # process 0 starts the coordinator; the others must reach it
        _wait_for_coordinator(coordinator, init_timeout)
    print(f"jax.distributed: process {pid} of {n}, coordinator {coordinator}"
          f"{f' (detected: {cluster})' if detect and cluster else ''}; waiting up to {init_timeout}s for all processes",
          flush=True)
    timeouts = {"initialization_timeout": init_timeout, **({"heartbeat_timeout_seconds": heartbeat} if heartbeat else {})}
    try:
        # All given by hand: no detection (it would also pick this process's GPUs from SLURM's ids).
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=pid,
                                   cluster_detection_method=None if detect else "deactivate", **timeouts)
    except Exception as e:  # noqa: BLE001 - re-raised with what to check
        raise DistributedError(
            f"jax.distributed.initialize failed (coordinator={coordinator}, num_processes={n}, "
            f"process_id={pid}) within {init_timeout}s: {str(e).splitlines()[0][:300]}. "
            "Check that every process is started with the same coordinator host:port, reachable from all, "
            "and a distinct process_id in [0, num_processes).") from None

"""The run directory: checked to be a writable directory, and held by one run at a time.

Two runs writing one workdir interleave ``metrics.jsonl`` and trip over each other's checkpoints,
so a run takes an OS lock (``fcntl.flock``) on ``<workdir>/.jaxaccel.lock.<process index>`` for its
whole duration. The kernel drops the lock when the process ends however it ends (SIGKILL
included), so a lock left by a killed run never blocks the restart. Each process of a
multi-process run locks its own index, so the processes of one run share the workdir while a
second run's processes are refused. The lock file holds who has it (pid, host, command) while
it is held, and is removed when released.

A URL workdir (``gs://...``) is not held: object stores have no locks a dead process gives back.
An object created only-if-absent (GCS can) would be one, but a killed run could not remove it, and
it would then refuse the very restart a preempted run relies on; a lease renewed while the run
lives is more machinery than the case is worth. So two runs into one URL workdir are not detected,
and the run says so in one warning line rather than silently.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from jaxaccel import storage
from jaxaccel.config import ConfigError

__all__ = ["WorkdirError", "WorkdirBusy", "held", "check_writable", "lock_path"]


class WorkdirError(ConfigError):
    """The workdir cannot be a run directory (a file, under a file, read-only); the CLI exits 2."""


class WorkdirBusy(ConfigError):
    """Another live run holds the workdir; the CLI exits 2 naming it."""


def lock_path(workdir: Path, process_index: int) -> Path:
    """The lock file process ``process_index`` of a run takes in ``workdir``."""
    return Path(workdir) / f".jaxaccel.lock.{process_index}"


def check_writable(workdir: Path) -> None:
    """Create ``workdir`` if needed; raise :class:`WorkdirError` (one line) if it is not a
    directory this process can write in."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir={workdir} is a file, not a directory: choose another workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"workdir={workdir} cannot be created ({_reason(e, workdir)}): choose another workdir") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir={workdir} is not writable by this user: choose another workdir")


def _reason(e: OSError, workdir: Path) -> str:
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        parent = next((p for p in workdir.parents if p.exists() and not p.is_dir()), None)
        return f"{parent} is a file" if parent else e.strerror
    if e.errno == errno.EROFS:
        return "read-only file system"
    return e.strerror or str(e)


def _holder(path: Path) -> str:
    """Who holds the lock at ``path``, as its holder wrote it."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (starting up)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} since {started}: {info.get('command')}"


def _acquire(path: Path) -> int:
    """An open descriptor on ``path`` holding its exclusive flock; raises WorkdirBusy if held.
    Retries when the file was removed between open and lock (its holder releasing it), so two
    runs can never both hold it."""
    import fcntl
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"workdir={path.parent} is not writable ({_reason(e, path.parent)}): "
                               "choose another workdir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirBusy(f"workdir={path.parent} is in use by {_holder(path)}. Wait for that run to end "
                              "or stop it (a killed run's hold ends with its process), or choose another "
                              "workdir") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _record(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(getattr(sys, "orig_argv", sys.argv))}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


@contextlib.contextmanager
def held(workdir: str | storage.StoragePath, process_index: int = 0) -> Iterator[storage.StoragePath]:
    """Hold ``workdir`` for process ``process_index`` of a run for the duration of the block.

    Raises :class:`WorkdirError` if it is not a writable directory and :class:`WorkdirBusy`
    (naming the holder's pid, host and command) if another live run holds it; both exit 2.
    A URL workdir is not held (see the module's docstring): process 0 prints a warning instead,
    after checking that the package its scheme needs is installed
    (:class:`jaxaccel.storage.StorageUnavailable`, exit 3).
    """
    if storage.is_url(workdir):
        workdir = storage.path(workdir)
        storage.check_reachable(workdir)
        if process_index == 0:
            print(f"warning: workdir={workdir} is a URL: object stores have no locks, so another run writing "
                  "the same workdir is not detected; start one run per URL workdir", flush=True)
        yield workdir
        return
    workdir = Path(workdir)
    check_writable(workdir)
    path = lock_path(workdir, process_index)
    fd = _acquire(path)
    try:
        _record(fd)
        yield workdir
    finally:
        # Unlink before unlocking: a run that opened the old file meanwhile sees it gone and retries.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)

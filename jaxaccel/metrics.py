"""``metrics.jsonl`` writing, TensorBoard event files and progress output.

A resumed run first drops the lines written after the checkpoint it resumes from, so the file has
each step once, as if the run had never stopped. The TensorBoard events of a resumed run go to a
new event file that starts with a purge marker at the resume step + 1 (``purge_step`` of
tensorboardX): TensorBoard then hides the older events from that step on, so its curves show each
step once too (a raw reader of the files sees both).

In a URL workdir (``gs://...``) both files go through :mod:`jaxaccel.storage`: an object store
cannot append, so each line's flush rewrites the whole object (one upload of the file so far per
log line; the lines written before a checkpoint are stored when it is). TensorBoard's event files
take the same route, through a tensorboardX writer factory for the URL's scheme.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

from jaxaccel import storage
from jaxaccel.config import ConfigError

__all__ = ["MetricsWriter", "Progress", "tensorboard_enabled"]

# Numbers this process's event files: tensorboardX names them by the second, host and our suffix,
# so two runs started in one second by one process (a resume from Python) would share a name.
_event_files = itertools.count()


def tensorboard_enabled(setting: bool | None) -> bool:
    """Whether to write TensorBoard events for ``train.tensorboard``: null = when tensorboardX is
    installed, true = required (an error if missing), false = never."""
    if setting is False:
        return False
    available = importlib.util.find_spec("tensorboardX") is not None
    if setting and not available:
        raise ConfigError("train.tensorboard=true needs tensorboardX: pip install 'jaxaccel[tensorboard]' "
                          "(or set train.tensorboard=null to write events only when it is installed)")
    return available


def _summary_writer_class():
    """``tensorboardX.SummaryWriter``, imported without PyTorch: tensorboardX imports torch when
    it is installed (1.6-2 s of start-up here) only to accept torch tensors, and we log floats.
    torch is hidden for that one import unless something has loaded it already."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class _EventFilesThroughStorage:
    """A tensorboardX writer factory: event files under a URL written through
    :mod:`jaxaccel.storage`, as the run's other files are (not through tensorboardX's own GCS and S3
    writers, which would need google-cloud-storage or boto3 besides)."""

    def open(self, location: str):
        return storage.open_write(storage.path(location), binary=True)

    def directory_check(self, location: str) -> None:
        storage.path(location).mkdir(parents=True, exist_ok=True)


def _route_event_files(location: storage.StoragePath) -> None:
    """Send tensorboardX's event files for ``location``'s URL scheme through :mod:`jaxaccel.storage`."""
    from tensorboardX import record_writer
    record_writer.register_writer_factory(os.fspath(location).split("://", 1)[0], _EventFilesThroughStorage())


class MetricsWriter:
    """Appends one JSON object per line to ``path`` and, with ``tensorboard``, each number of it as
    a TensorBoard scalar ``<split>/<key>`` (split ``train`` for training lines) in the same folder."""

    def __init__(self, path: str | storage.StoragePath, resume_step: int | None = None, tensorboard: bool = False):
        self.path = storage.path(path)
        lines = self.path.read_text().splitlines() if self.path.exists() and resume_step is not None else []
        kept = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= resume_step]
        self.path.write_text("".join(l + "\n" for l in kept))
        # A run resumed at a step it already logged (its last one) must not log that step twice.
        self._logged = {(r.get("step"), r.get("split", "train")) for r in map(json.loads, kept)}
        self._file: TextIO = storage.open_append(self.path)
        self._events = None
        if tensorboard:
            SummaryWriter = _summary_writer_class()
            if storage.is_url(self.path):
                _route_event_files(self.path)
            # The pid keeps a quick restart from reusing the previous file's name (seconds + host),
            # the counter a second run in this process (which sorts after the first: TensorBoard
            # must read the resumed run's purge marker after the events it hides).
            suffix = f".{os.getpid()}.{next(_event_files):04d}"
            self._events = SummaryWriter(str(self.path.parent), filename_suffix=suffix,
                                         purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (and its TensorBoard scalars), unless a kept line has its step and split."""
        if (record.get("step"), record.get("split", "train")) in self._logged:
            return
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._events is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._events.add_scalar(f"{split}/{key}", value, record["step"])
            # Flushed per line, like the JSON: a killed run must not lose events before its checkpoint.
            self._events.flush()

    def close(self) -> None:
        self._file.close()
        if self._events is not None:
            self._events.close()


class Progress:
    """A tqdm bar (ETA, loss, examples/s) on a terminal; plain log lines when stdout is not a TTY."""

    def __init__(self, total_steps: int, initial_step: int, batch_size: int, stream: TextIO = sys.stdout):
        self.total, self.batch_size, self.stream = total_steps, batch_size, stream
        self.interactive = stream.isatty()
        self.bar = None
        if self.interactive:
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, file=stream)
        self._last_step, self._last_time = initial_step, time.perf_counter()

    def update(self, step: int, loss: float) -> None:
        # Averaged since the (re)start: lines are fetched one step group late, so the time between
        # two lines is not the time of one group.
        now = time.perf_counter()
        rate = (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:,.0f}")
        else:
            eta = (self.total - step) * self.batch_size / rate if rate > 0 else math.inf
            print(f"step {step}/{self.total}  loss {loss:.4f}  {rate:,.0f} ex/s  eta {eta:.0f}s",
                  file=self.stream, flush=True)

    def restart(self, step: int) -> None:
        """Measure rates from now on (after compilation), starting at ``step``."""
        self._last_step, self._last_time = step, time.perf_counter()
        if self.bar is not None:
            self.bar.n = step
            self.bar.reset(total=self.total)
            self.bar.update(step)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

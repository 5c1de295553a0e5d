"""``metrics.jsonl`` writing and progress output.

A resumed run first drops the lines written after the checkpoint it resumes from, so the file has
each step once, as if the run had never stopped.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["MetricsWriter", "Progress"]


class MetricsWriter:
    """Appends one JSON object per line to ``path``."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        lines = self.path.read_text().splitlines() if self.path.exists() and resume_step is not None else []
        kept = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= resume_step]
        self.path.write_text("".join(l + "\n" for l in kept))
        self._file: TextIO = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Progress:
    """A tqdm bar (ETA, loss, examples/s) on a terminal; plain log lines when stdout is not a TTY."""

    def __init__(self, total_steps: int, initial_step: int, batch_size: int, stream: TextIO = sys.stdout):
        self.total, self.batch_size, self.stream = total_steps, batch_size, stream
        self.interactive = stream.isatty()
        self.bar = None
        if self.interactive:
            from tqdm import tqdm
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

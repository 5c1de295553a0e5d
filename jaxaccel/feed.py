"""How training batches reach the compiled step groups, on either input pipeline.

The step groups (:mod:`jaxaccel.step_groups`) ask a *feed* for the arguments of each compiled call:

- :class:`ResidentFeed` (``data.pipeline=resident``): the decoded training split replicated on
  every device and the epoch's order; each call gathers its batches on device (no host work per
  step).
- :class:`StreamFeed` (``data.pipeline=stream``): a background thread pulls this process's rows of
  each step's global batch from Grain (:mod:`jaxaccel.streaming`), stacks the steps of one compiled
  call into ``[n, B, ...]`` and assembles global arrays with
  ``jax.make_array_from_process_local_data``, up to ``DEPTH`` step groups ahead, so reading,
  decoding and the transfer to the devices overlap the running steps. Each compiled call then
  takes exactly its ``n`` batches (one executable per call length).

Both give a compiled step the same ``[B, ...]`` batch of the same examples, so the two pipelines
train bit for bit alike. Evaluation follows the same split: :class:`StreamEvaluator` reads the
test split through Grain at each evaluation instead of holding it on the devices.
"""
from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxaccel import step as step_lib
from jaxaccel import streaming
from jaxaccel.evaluation import Evaluator

__all__ = ["ResidentFeed", "StreamFeed", "StreamEvaluator", "Layout", "WorkerDied", "default_device_budget",
           "make_feed", "stream_plan", "STREAM_GROUP_BYTES"]

# A streamed step group holds at most this many bytes of batches on the device (longer groups are
# split: plan.steps_per_call); DEPTH groups wait on the device ahead of the running one.
STREAM_GROUP_BYTES = 32 << 20
DEPTH = 2
# Steps Grain decodes ahead on the host (a bound on its memory): at least two per worker thread.
HOST_BUFFER_BYTES = 32 << 20


class WorkerDied(RuntimeError):
    """The input pipeline stopped (a worker process died, or its thread ended without a batch);
    the CLI prints it on one line and exits 1."""


def default_device_budget(backend: str) -> tuple[int, str]:
    """``data.device_budget_bytes=null``: (bytes per device a resident dataset may take, why).
    Accelerators: 40% of the first device's memory (the rest is for the state, activations and
    the compiler's buffers). CPU: the devices are host memory, each holding its own copy, so a
    quarter of the host's RAM over the local device count."""
    devices = jax.local_devices()
    if backend == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total // 4 // len(devices), (f"default: a quarter of this host's {total / 2**30:.1f} GiB over "
                                            f"{len(devices)} CPU device(s)")
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    if limit:
        return int(limit * 0.4), f"default: 40% of the {devices[0].device_kind}'s {limit / 2**30:.1f} GiB"
    return 4 << 30, f"default: 4 GiB ({devices[0].device_kind} reports no memory size)"


def stream_plan(plan: Any, batch_bytes: int) -> Any:
    """``plan`` for streamed batches: each device-loop call takes its batches stacked, so its trip
    count is compiled in (one executable per call length, Plan.call_lengths), and a group holds at most
    ``STREAM_GROUP_BYTES`` of batches (``batch_bytes`` each) on the device."""
    if plan.loop != "device_loop":
        return plan
    cap = max(1, STREAM_GROUP_BYTES // max(batch_bytes, 1))
    return dataclasses.replace(plan, steps_per_call=min(plan.steps_per_call or cap, cap), static_trip_count=True)


class Layout:
    """Which rows of a global batch of ``batch_size`` this process holds (its devices' shards, in
    order), and how its local rows become one global array sharded as the step expects: over the
    mesh's data axis (jit), or one slice per device on a leading device axis (pmap)."""

    def __init__(self, parallel: Any, batch_size: int):
        self.batch_size = batch_size
        self.pmap = parallel.axis_name is not None
        if self.pmap:
            devices = list(parallel.mesh.devices.flat)
            self.size, per = len(devices), batch_size // len(devices)
            self.mesh = Mesh(np.asarray(devices), ("devices",))
            positions = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
            self.rows = np.concatenate([np.arange(p * per, (p + 1) * per) for p in positions])
            self.local_devices = len(positions)
        else:
            self.mesh, self.spec = parallel.mesh, parallel.batch_sharding.spec
            slices = {(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                      for s in parallel.batch_sharding.addressable_devices_indices_map((batch_size,)).values()}
            self.rows = np.concatenate([np.arange(a, b) for a, b in sorted(slices)])

    def put(self, local: np.ndarray, stacked: bool) -> jax.Array:
        """A global array from this process's rows: ``local`` is ``[b_local, ...]``, or
        ``[n, b_local, ...]`` (n steps) when ``stacked``."""
        rest = local.shape[2:] if stacked else local.shape[1:]
        if self.pmap:
            per = self.batch_size // self.size
            if stacked:
                n = local.shape[0]
                local = np.moveaxis(local.reshape(n, self.local_devices, per, *rest), 1, 0)
                shape = (self.size, n, per, *rest)
            else:
                local, shape = local.reshape(self.local_devices, per, *rest), (self.size, per, *rest)
            sharding = NamedSharding(self.mesh, P("devices"))
        else:
            shape = (local.shape[0], self.batch_size, *rest) if stacked else (self.batch_size, *rest)
            sharding = NamedSharding(self.mesh, P(None, *self.spec) if stacked else self.spec)
        return jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(local), shape)


# ---------------------------------------------------------------------------------------------
# The resident feed: what the loop did before there were two.

class ResidentFeed:
    """The decoded training split on every device and the epoch's order (``order(seed, epoch, n)``)."""
    streamed = False
    examples_read = None

    def __init__(self, setup: Any, order: Callable[[int, int, int], np.ndarray]):
        par, ds = setup.parallel, setup.dataset
        self.setup, self.steps_per_epoch = setup, setup.plan.steps_per_epoch
        self.inputs, self.labels = par.replicate(ds.train_inputs), par.replicate(ds.train_labels)
        self._order = lambda epoch: par.replicate(order(setup.cfg.seed, epoch, len(ds.train_labels)))
        self._epoch, self._perm = None, None

    def start(self, step: int) -> None:
        """Nothing to start: the data is on the devices."""

    def _perm_of(self, epoch: int):
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, self._order(epoch)
        return self._perm

    def example_args(self, n: int) -> tuple:
        """Arguments of a call of ``n`` steps (before its count), to compile it with."""
        return self.inputs, self.labels, self._perm_of(0), np.int32(0)

    def group(self, step: int, count: int) -> tuple:
        """What the calls of the steps from ``step`` gather their batches from."""
        return self.inputs, self.labels, self._perm_of(step // self.steps_per_epoch)

    def evaluator(self, apply_fn, batch_size: int, serialize_calls: bool) -> Evaluator:
        ds = self.setup.dataset
        return Evaluator(apply_fn, batch_size, self.setup.parallel, (ds.test_inputs, ds.test_labels), serialize_calls)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The streaming feed.

class _StreamGroup:
    """The batches of one step group, one stacked ``(inputs, labels)`` per compiled call, keyed by
    the call's first step within the group."""

    def __init__(self, start: int, calls: dict[int, tuple[int, jax.Array, jax.Array]]):
        self.start, self.calls = start, calls

    def call_args(self, position: int, n: int) -> tuple:
        count, inputs, labels = self.calls[position - self.start]
        assert count == n, f"the stream prepared a call of {count} steps at {position}, the step group ran {n}"
        return inputs, labels, np.int32(0)


class _Failed:
    def __init__(self, error: BaseException, start: int, end: int):
        self.error, self.start, self.end = error, start, end


class StreamFeed:
    """Batches read, decoded and put on the devices by a background thread, ``DEPTH`` step groups
    ahead of the loop. ``examples_read`` counts the training examples this process read."""
    streamed = True

    def __init__(self, setup: Any, order: Callable[[int, int, int], np.ndarray]):
        cfg, plan, ds = setup.cfg, setup.plan, setup.dataset
        self.setup, self.plan = setup, plan
        self.layout = Layout(setup.parallel, cfg.train.batch_size)
        self.rows = streaming.StepRows(ds.train, order, cfg.seed, cfg.train.batch_size, plan.steps_per_epoch,
                                       self.layout.rows)
        self.examples_read = 0
        self._queue: queue.Queue = queue.Queue(maxsize=DEPTH)
        self._stop = threading.Event()
        self._thread = self._iterator = None
        self._reading = (0, 0)

    def start(self, step: int) -> None:
        """Start reading at ``step`` (a resumed run's checkpoint step: nothing else is needed)."""
        cfg = self.setup.cfg
        local_batch_bytes = len(self.layout.rows) * self.setup.dataset.sizes.example_bytes
        workers = streaming.default_workers(cfg.data.workers) * max(cfg.data.worker_processes, 1)
        buffer = max(2 * workers, min(HOST_BUFFER_BYTES // max(local_batch_bytes, 1), 256))
        self.rows.records.open()  # here, not first in Grain's threads (TFDS's lazy imports are not thread-safe)
        if cfg.data.worker_processes:
            _quiet_resource_tracker()
        self._iterator = streaming.step_batches(self.rows, step, self.plan.total_steps, cfg.data.workers,
                                                cfg.data.worker_processes, buffer)
        self._thread = threading.Thread(target=self._produce, args=(step,), name="jaxaccel-stream", daemon=True)
        self._thread.start()

    def _produce(self, step: int) -> None:
        try:
            while step < self.plan.total_steps and not self._stop.is_set():
                end = self.plan.next_boundary(step)
                self._reading = (step, end)
                calls, offset = {}, 0
                for n in self.plan.call_lengths(end - step):
                    parts = [next(self._iterator) for _ in range(n)]
                    self.examples_read += sum(len(p["index"]) for p in parts)
                    inputs = self.layout.put(np.stack([p["inputs"] for p in parts]), stacked=True)
                    labels = self.layout.put(np.stack([p["labels"] for p in parts]), stacked=True)
                    calls[offset], offset = (n, inputs, labels), offset + n
                self._put((step, end - step, calls))
                step = end
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it
            self._put(_Failed(e, *self._reading))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def example_args(self, n: int) -> tuple:
        """Zero batches of a call of ``n`` steps, to compile it with."""
        sizes, b = self.setup.dataset.sizes, len(self.layout.rows)
        inputs = np.zeros((n, b, *sizes.input_shape), sizes.input_dtype)
        return (self.layout.put(inputs, True), self.layout.put(np.zeros((n, b), np.int32), True), np.int32(0))

    def group(self, step: int, count: int) -> _StreamGroup:
        """The batches of the ``count`` steps from ``step`` (waits for them if they are not ready)."""
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    raise WorkerDied(f"the input pipeline stopped before step {step} without a batch or an error; "
                                     "run the same command again to resume from the latest checkpoint") from None
        if isinstance(item, _Failed):
            raise _explain(item.error, item.start, item.end) from None
        start, n, calls = item
        assert (start, n) == (step, count), f"the stream is at steps {start}+{n}, the loop asks for {step}+{count}"
        return _StreamGroup(step % self.plan.steps_per_epoch, calls)

    def evaluator(self, apply_fn, batch_size: int, serialize_calls: bool) -> "StreamEvaluator":
        return StreamEvaluator(apply_fn, batch_size, self.setup.parallel, self.setup.dataset.test,
                               self.setup.cfg.data.workers, serialize_calls)

    def close(self) -> None:
        """Stop the thread and Grain's workers (also on errors and preemption)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        close = getattr(self._iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - a pipeline that failed may fail to close as well
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _quiet_resource_tracker() -> None:
    """Grain's worker processes pass batches in shared memory; when one dies, the blocks it held
    are unlinked at exit by multiprocessing's resource tracker, which then warns about each "leak"
    after our one-line error. The tracker is a separate interpreter started with this one's -W
    options, so the filter is added there before Grain starts it."""
    option = "ignore:resource_tracker:UserWarning"
    if option not in sys.warnoptions:
        sys.warnoptions.append(option)


def _explain(error: BaseException, start: int, end: int) -> BaseException:
    """Damaged data stays a DataError (exit 3); a dead worker becomes one line, not Grain's trace."""
    if isinstance(error, streaming.DataError):
        return error
    message = str(error)
    found = next((line for line in message.splitlines() if "jaxaccel.data.DataError:" in line), None)
    if found:  # raised in a worker process: Grain re-raises it as its own error with the text
        return streaming.DataError(found.split("jaxaccel.data.DataError:", 1)[1].strip())
    if "terminated unexpectedly" in message:
        code = message.split("exit code", 1)[1].split(".")[0].strip() if "exit code" in message else "unknown"
        return WorkerDied(f"a data worker process died (exit code {code}) while reading the batches of steps "
                          f"{start + 1}-{end}; "
                          "nothing is lost: run the same command again to resume from the latest checkpoint "
                          "(check the host's memory if it happens again: a killed worker is often out of memory)")
    return error


# ---------------------------------------------------------------------------------------------
# Evaluation on the streaming path.

def _eval_batch(apply_fn: Callable, batch_sharding: Any, axis_name: str | None) -> Callable:
    """``(variables, inputs, labels, weights) -> sums`` over one passed-in evaluation batch: what
    :func:`jaxaccel.step.make_eval` computes over a batch it slices itself."""
    def one(variables, inputs, labels, weights):
        batch = (inputs, labels, weights)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        sums = step_lib.eval_step(variables, apply_fn, *batch)
        return sums if axis_name is None else jax.lax.psum(sums, axis_name)
    return one


class StreamEvaluator:
    """Test-split loss and accuracy read through Grain at each evaluation (each process its rows
    of every batch); the same sums, added in the same order, as :class:`Evaluator`."""

    def __init__(self, apply_fn, batch_size: int, parallel: Any, records: streaming.Records,
                 workers: int | None, serialize_calls: bool):
        self.apply_fn, self.batch_size, self.parallel = apply_fn, batch_size, parallel
        self.workers, self.serialize_calls = workers, serialize_calls
        self.layout = Layout(parallel, batch_size)
        self.rows = streaming.EvalRows(records, batch_size, self.layout.rows)

    def _put(self, batch: dict[str, np.ndarray]) -> tuple:
        return tuple(self.layout.put(batch[k], stacked=False) for k in ("inputs", "labels", "weights"))

    def compile(self, state) -> None:
        self.rows.records.open()
        sizes, b = self.rows.records.sizes, len(self.layout.rows)
        example = self._put({"inputs": np.zeros((b, *sizes.input_shape), sizes.input_dtype),
                             "labels": np.zeros(b, np.int32), "weights": np.zeros(b, np.float32)})
        fn = _eval_batch(self.apply_fn, self.parallel.batch_sharding, self.parallel.axis_name)
        self.one = self.parallel.compile(fn, (state.variables(), *example), donate=False)

    def __call__(self, state) -> dict[str, float]:
        sums = []
        batches = streaming.eval_batches(self.rows, self.workers)
        try:
            for batch in batches:
                sums.append(self.one(state.variables(), *self._put(batch)))
                if self.serialize_calls:
                    jax.block_until_ready(sums[-1])
        finally:
            getattr(batches, "close", lambda: None)()
        total = self.parallel.host(jax.tree.map(lambda *x: sum(x), *sums))
        return {"accuracy": float(total["correct"] / total["count"]), "loss": float(total["loss_sum"] / total["count"])}


def make_feed(setup: Any, order: Callable[[int, int, int], np.ndarray]) -> ResidentFeed | StreamFeed:
    """The feed of the pipeline ``setup`` chose."""
    return StreamFeed(setup, order) if setup.pipeline["pipeline"] == "stream" else ResidentFeed(setup, order)

"""Data parallelism: where arrays live and how step functions are compiled across devices.

Two strategies over the same pure step functions:

- :class:`MeshParallel` (``parallel.mode=jit``, the default; what pjit became): one global
  ``Mesh`` with a ``data`` axis over every device of every process; the batch is sharded over it,
  the state replicated, and XLA inserts the gradient reductions.
- :class:`PmapParallel` (``parallel.mode=pmap``): state replicated with a leading device axis,
  each device gathers its slice of the global batch, gradients and metrics are ``lax.pmean``-ed.

The loop calls only ``replicate``, ``put_state``, ``single``, ``host`` and ``compile``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["MeshParallel", "PmapParallel", "make_parallel", "local_copy"]


def local_copy(tree: Any) -> Any:
    """Host NumPy copies of (replicated or single-device) arrays, read from this process's first
    shard, so it also works when the global array spans several processes."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


class MeshParallel:
    """jit over a Mesh with NamedSharding: batch split on ``data``, everything else replicated."""

    axis_name = None  # reductions are inserted by the compiler, not written in the step

    def __init__(self) -> None:
        self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
        self.size = self.mesh.size
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))

    def replicate(self, host: np.ndarray) -> jax.Array:
        """A replicated global array from a host array every process holds in full."""
        return jax.make_array_from_callback(host.shape, self.replicated, lambda index: host[index])

    def put_state(self, state: Any) -> Any:
        return jax.device_put(state, self.replicated)

    def single(self, state: Any) -> Any:
        """The state as one (global) copy, for checkpoints and export."""
        return state

    def host(self, tree: Any) -> Any:
        """Replicated results to host NumPy."""
        return local_copy(tree)

    def compile(self, fn: Callable, args: tuple, donate: bool = True):
        """Ahead-of-time compile ``fn(*args)``, replicating its outputs."""
        jitted = jax.jit(fn, donate_argnums=0 if donate else (), out_shardings=self.replicated)
        return jitted.lower(*args).compile()


class PmapParallel:
    """pmap over the local devices: replicated state, per-device batch slices, pmean."""

    axis_name = "data"

    def __init__(self) -> None:
        self.devices = jax.local_devices()
        self.size = jax.device_count()
        self.batch_sharding = None  # each device gathers its own slice; nothing to constrain
        # A leading axis of one entry per device, laid out one entry on each device (what
        # pmap consumes without moving data; jax.device_put_replicated is gone since jax 0.8).
        self._stacked = NamedSharding(Mesh(np.asarray(self.devices), ("devices",)), P("devices"))

    def replicate(self, host: np.ndarray) -> jax.Array:
        host = np.asarray(host)
        return jax.make_array_from_callback((len(self.devices), *host.shape), self._stacked,
                                            lambda index: host[None])

    def put_state(self, state: Any) -> Any:
        return jax.tree.map(self.replicate, local_copy(state))

    def single(self, state: Any) -> Any:
        return jax.tree.map(lambda x: x[0], state)

    def host(self, tree: Any) -> Any:
        """Per-device results (identical after pmean/psum) to host NumPy, from device 0."""
        return jax.tree.map(lambda a: np.asarray(a[0]) if getattr(a, "ndim", 0) else np.asarray(a), tree)

    def compile(self, fn: Callable, args: tuple, donate: bool = True):
        """pmap ``fn``; leading arguments are per-device, trailing Python/NumPy scalars broadcast."""
        in_axes = tuple(None if isinstance(a, (int, np.integer)) else 0 for a in args)
        pmapped = jax.pmap(fn, axis_name=self.axis_name, in_axes=in_axes,
                           donate_argnums=0 if donate else ())
        return pmapped.lower(*args).compile()


def make_parallel(mode: str) -> MeshParallel | PmapParallel:
    """The strategy ``parallel.mode`` names."""
    return PmapParallel() if mode == "pmap" else MeshParallel()

"""Data parallelism: where arrays live and how step functions are compiled across devices.

Two strategies over the same pure step functions:

- :class:`MeshParallel` (``parallel.mode=jit``, the default; what pjit became): one global
  ``Mesh`` with a ``data`` axis over every device of every process; the batch is sharded over it,
  the state replicated, and XLA inserts the gradient reductions. With ``parallel.fsdp=true`` the
  parameters and optimizer state are sharded over the same axis too (fully sharded data
  parallelism: XLA all-gathers each weight where it is used and reduce-scatters its gradient).
- :class:`PmapParallel` (``parallel.mode=pmap``): state replicated with a leading device axis,
  each device gathers its slice of the global batch, gradients and metrics are ``lax.pmean``-ed.

The loop calls only ``create_state``, ``replicate``, ``put_state``, ``single``, ``host``,
``compile``, ``check_replicas`` and ``state_bytes_per_device``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["MeshParallel", "PmapParallel", "make_parallel", "local_copy", "ReplicaMismatch"]


class ReplicaMismatch(RuntimeError):
    """Copies of replicated state differ between devices or processes (the CLI exits 1)."""


def local_copy(tree: Any) -> Any:
    """Host NumPy copies of global arrays. Replicated ones are read from this process's first
    shard (so it works when the array spans several processes); sharded ones (FSDP) are assembled,
    across processes with an all-gather, so every process must call this at the same point."""
    def copy(a):
        if not isinstance(a, jax.Array) or a.is_fully_replicated:
            return np.asarray(a.addressable_data(0) if isinstance(a, jax.Array) else a)
        if a.is_fully_addressable:
            return np.asarray(a)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return jax.tree.map(copy, tree)


def _digest(shard_data: jax.Array) -> int:
    import zlib
    if jax.dtypes.issubdtype(shard_data.dtype, jax.dtypes.prng_key):
        shard_data = jax.random.key_data(shard_data)
    return zlib.crc32(np.ascontiguousarray(np.asarray(shard_data)).view(np.uint8))


def _check_copies(tree: Any, copies_of: Callable[[jax.Array], list[list[Any]]],
                  same_on_every_process: Callable[[jax.Array], bool]) -> int:
    """Compare, leaf by leaf, every group of shards that must hold the same bytes (on this
    process), then, for leaves every process holds whole, their digests across processes.
    Returns the number of leaves checked; raises :class:`ReplicaMismatch` naming those that differ."""
    flat = [(jax.tree_util.keystr(p), a) for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(a, jax.Array)]
    local_bad, digests = [], []
    for name, leaf in flat:
        groups = copies_of(leaf)
        sums = [[_digest(s.data) for s in group] for group in groups]
        if any(len(set(g)) > 1 for g in sums):
            devices = [str(s.device) for g, d in zip(groups, sums) if len(set(d)) > 1 for s in g]
            local_bad.append(f"{name} (devices {', '.join(devices)})")
        digests.append(sums[0][0] if same_on_every_process(leaf) else 0)
    if local_bad:
        raise ReplicaMismatch(f"replicated state differs between devices of process {jax.process_index()}: "
                              + "; ".join(local_bad[:5]) + (f" and {len(local_bad) - 5} more" if len(local_bad) > 5 else ""))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        table = np.asarray(multihost_utils.process_allgather(np.asarray(digests, np.uint32)))
        differ = [name for (name, _), column in zip(flat, table.T) if len(set(column.tolist())) > 1]
        if differ:
            raise ReplicaMismatch(f"replicated state differs between processes: {', '.join(differ[:5])}")
    return len(flat)


def _device_bytes(tree: Any, device: jax.Device) -> int:
    """Bytes of ``tree``'s shards that live on ``device``."""
    return sum(s.data.nbytes for a in jax.tree.leaves(tree) if isinstance(a, jax.Array)
               for s in a.addressable_shards if s.device == device)


class MeshParallel:
    """jit over a Mesh with NamedSharding: batch split on ``data``; the state replicated, or with
    ``fsdp`` sharded over ``data`` as well."""

    axis_name = None  # reductions are inserted by the compiler, not written in the step

    def __init__(self, fsdp: bool = False) -> None:
        self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
        self.size = self.mesh.size
        self.fsdp = fsdp
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))

    def leaf_sharding(self, leaf: Any) -> NamedSharding:
        """Where one state leaf lives. FSDP splits its largest axis that the device count divides
        (masks and optimizer moments have their parameter's shape, so they split alike); leaves
        with no such axis (scalars, counters, a 10-wide bias on 4 devices) stay replicated."""
        shape = tuple(getattr(leaf, "shape", ()))
        axes = [i for i, n in enumerate(shape) if n >= self.size and n % self.size == 0]
        if not self.fsdp or self.size == 1 or not axes:
            return self.replicated
        axis = max(axes, key=lambda i: shape[i])
        return NamedSharding(self.mesh, P(*[("data" if i == axis else None) for i in range(len(shape))]))

    def state_sharding(self, state: Any) -> Any:
        """A pytree of shardings for ``state`` (a single one when nothing is sharded)."""
        return jax.tree.map(self.leaf_sharding, state) if self.fsdp else self.replicated

    def replicate(self, host: np.ndarray) -> jax.Array:
        """A replicated global array from a host array every process holds in full."""
        return jax.make_array_from_callback(host.shape, self.replicated, lambda index: host[index])

    def create_state(self, create: Callable, key: jax.Array) -> Any:
        """``create(key)`` compiled to write each leaf straight into its sharding (with FSDP no
        device ever holds the whole state), as one global array on every process."""
        shardings = self.state_sharding(jax.eval_shape(create, key))
        return jax.jit(create, out_shardings=shardings)(key)

    def put_state(self, state: Any) -> Any:
        """The (global) state resharded as this strategy keeps it."""
        return jax.jit(lambda s: s, out_shardings=self.state_sharding(state))(state)

    def single(self, state: Any) -> Any:
        """The state as one (global) copy, for checkpoints and export."""
        return state

    def state_bytes_per_device(self, state: Any) -> int:
        """Bytes of the train state held by this process's first device."""
        return _device_bytes(state, jax.local_devices()[0])

    def check_replicas(self, state: Any) -> int:
        """Raise :class:`ReplicaMismatch` unless every copy of every state leaf is bit-identical:
        shards holding the same index of a leaf on this process's devices, and (for replicated
        leaves, across processes) each process's copy. Returns the number of leaves checked."""
        def copies_of(leaf):
            groups: dict[str, list] = {}
            for shard in leaf.addressable_shards:
                groups.setdefault(repr(shard.index), []).append(shard)
            return list(groups.values())
        return _check_copies(state, copies_of, lambda leaf: leaf.is_fully_replicated)

    def host(self, tree: Any) -> Any:
        """Replicated results to host NumPy."""
        return local_copy(tree)

    def compile(self, fn: Callable, args: tuple, donate: bool = True, options: dict | None = None):
        """Ahead-of-time compile ``fn(*args)``. With ``donate``, ``fn`` maps the state
        (``args[0]``) to ``(state, metrics)`` and the new state keeps the old one's shardings
        (so its buffers are reused in place); every other output is replicated. ``options``:
        XLA compiler options for this executable."""
        out = (self.state_sharding(args[0]), self.replicated) if donate else self.replicated
        jitted = jax.jit(fn, donate_argnums=0 if donate else (), out_shardings=out)
        return jitted.lower(*args).compile(compiler_options=options)


class PmapParallel:
    """pmap over every device of every process: replicated state, per-device batch slices, pmean."""

    axis_name = "data"

    def __init__(self) -> None:
        self.devices = jax.devices()
        self.size = len(self.devices)
        self.batch_sharding = None  # each device gathers its own slice; nothing to constrain
        mesh = Mesh(np.asarray(self.devices), ("devices",))
        # A leading axis of one entry per device, laid out one entry on each device (what pmap
        # consumes without moving data; jax.device_put_replicated is gone since jax 0.8). Global
        # arrays, so the same code serves several processes (each holds its devices' entries).
        self._stacked = NamedSharding(mesh, P("devices"))
        self._replicated = NamedSharding(mesh, P())  # the one-copy form checkpoints hold

    def replicate(self, host: np.ndarray) -> jax.Array:
        host = np.asarray(host)
        return jax.make_array_from_callback((self.size, *host.shape), self._stacked, lambda index: host[None])

    def create_state(self, create: Callable, key: jax.Array) -> Any:
        """``create(key)`` as one replicated global copy (what checkpoints hold)."""
        return jax.jit(create, out_shardings=self._replicated)(key)

    def put_state(self, state: Any) -> Any:
        return jax.tree.map(self.replicate, local_copy(state))

    def single(self, state: Any) -> Any:
        """One replicated global copy, assembled from each local device's own entry (no transfer)."""
        def one(x):
            parts = [s.data[0] for s in x.addressable_shards]
            return jax.make_array_from_single_device_arrays(x.shape[1:], self._replicated, parts)
        return jax.tree.map(one, state)

    def state_bytes_per_device(self, state: Any) -> int:
        return _device_bytes(state, jax.local_devices()[0])

    def check_replicas(self, state: Any) -> int:
        """As :meth:`MeshParallel.check_replicas`: the per-device entries of every leaf must match."""
        return _check_copies(state, lambda leaf: [list(leaf.addressable_shards)], lambda leaf: True)

    def host(self, tree: Any) -> Any:
        """Per-device results (identical after pmean/psum) to host NumPy, from this process's first device."""
        return jax.tree.map(lambda a: np.asarray(a.addressable_data(0))[0] if getattr(a, "ndim", 0)
                            else np.asarray(a), tree)

    def compile(self, fn: Callable, args: tuple, donate: bool = True, options: dict | None = None):
        """pmap ``fn``; leading arguments are per-device, trailing Python/NumPy scalars broadcast."""
        in_axes = tuple(None if isinstance(a, (int, np.integer)) else 0 for a in args)
        pmapped = jax.pmap(fn, axis_name=self.axis_name, in_axes=in_axes,
                           donate_argnums=0 if donate else ())
        return pmapped.lower(*args).compile(compiler_options=options)


def make_parallel(mode: str, fsdp: bool = False) -> MeshParallel | PmapParallel:
    """The strategy ``parallel.mode`` (and ``parallel.fsdp``) names."""
    return PmapParallel() if mode == "pmap" else MeshParallel(fsdp)

"""Data parallelism: where arrays live and how step functions are compiled across devices.

The devices form a 2-D mesh ``("data", "fsdp")`` that follows the hardware (:func:`device_grid`):
``fsdp`` spans the devices joined by the fast network (a TPU slice's ICI, one GPU host's NVLink),
``data`` goes across slices or hosts (the slower data-centre network). With one slice or host,
``data`` is 1 and ``fsdp`` spans every device. ``parallel.fsdp_size`` picks another split.

Two strategies over the same pure step functions:

- :class:`MeshParallel` (``parallel.mode=jit``, the default; what pjit became): the batch is
  sharded over both mesh axes, the state replicated, and XLA inserts the gradient reductions.
  With ``parallel.fsdp=true`` the parameters and optimizer state are sharded over ``fsdp`` (fully
  sharded data parallelism: XLA all-gathers each weight where it is used, within a slice or host,
  and reduce-scatters its gradient; across ``data`` the gradient shards are all-reduced).
- :class:`PmapParallel` (``parallel.mode=pmap``; the name users type, it runs on ``jax.shard_map``):
  explicit collectives. The state replicated, each device gathers its slice of the global batch
  and the step ``lax.pmean``s gradients and metrics over ``axis_name``.

The loop calls only ``create_state``, ``replicate``, ``put_state``, ``single``, ``host``,
``compile``, ``check_replicas`` and ``state_bytes_per_device``.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxaccel.schema import ConfigError

__all__ = ["MeshParallel", "PmapParallel", "make_parallel", "local_copy", "ReplicaMismatch",
           "device_groups", "device_grid", "build_mesh", "collectives", "cross_slice_collectives", "replica_groups", "checksum",
           "zero_counts", "AXES"]

AXES = ("data", "fsdp")  # the mesh's axes: across slices/hosts, within one


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


# ----------------------------------------------------------------------------------------------
# Checks computed on the devices: only a few bytes per leaf reach the host.

def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words (one per element; two for 8-byte types)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_ or jnp.dtype(x.dtype).itemsize not in (1, 2, 4, 8) or (
            jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits < 8):
        return x.astype(jnp.uint32)  # bool and sub-byte integers: the value is the bits
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[jnp.dtype(x.dtype).itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit flips about half the output bits."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def checksum(x: jax.Array) -> jax.Array:
    """uint32[2] of ``x``'s bits and their positions: a position-weighted sum (odd weights, so any
    single changed element changes it) and a sum of hashes of (bits, position). Integer sums, so
    the same bits give the same words whatever the reduction order."""
    words = _words(x).ravel()
    position = _mix(jnp.arange(words.size, dtype=jnp.uint32) + np.uint32(0x9E3779B9))
    return jnp.stack([jnp.sum(words * (position | np.uint32(1)), dtype=jnp.uint32),
                      jnp.sum(_mix(words ^ position), dtype=jnp.uint32)])


def zero_counts(params: Any, selected: Any = None) -> list[int]:
    """Exact zeros (``x == 0``: -0.0 counts, NaN does not) of each leaf of ``params`` that
    ``selected`` marks (a tree of bools of the same structure, e.g. sparsity's prunable tree;
    default: every leaf), in leaf order. jax arrays are counted where they live (a sharded leaf
    on its shards, then one small all-reduce): one int32 per leaf comes to the host, and every
    process must call this at the same point. NumPy leaves are counted on the host. Counts are
    int32: a leaf of 2**31 elements or more would overflow."""
    leaves = jax.tree.leaves(params)
    flags = jax.tree.leaves(selected) if selected is not None else [True] * len(leaves)
    chosen = [x for x, keep in zip(leaves, flags) if keep]
    on_device = [x for x in chosen if isinstance(x, jax.Array)]
    counts = iter(())
    if on_device:
        mesh = getattr(on_device[0].sharding, "mesh", None)
        out = NamedSharding(mesh, P()) if isinstance(mesh, Mesh) else None
        if out not in _ZERO_COUNTERS:
            _ZERO_COUNTERS[out] = jax.jit(lambda xs: jnp.stack([jnp.sum(x == 0, dtype=jnp.int32) for x in xs]),
                                          out_shardings=out)
        counts = iter(local_copy(_ZERO_COUNTERS[out](on_device)).tolist())
    return [next(counts) if isinstance(x, jax.Array) else int(np.size(x) - np.count_nonzero(x)) for x in chosen]


_ZERO_COUNTERS: dict[Any, Callable] = {}


# ----------------------------------------------------------------------------------------------
# Meshes that follow the hardware.

def _host_of_process() -> dict[int, int]:
    """Process index -> host number, from each process's host name (one tiny all-gather, so
    every process must call this at the same point). Several processes on one host (one per
    GPU, as SLURM often starts them) share its fast interconnect."""
    import hashlib
    import socket
    from jax.experimental import multihost_utils
    digest = hashlib.sha256(socket.gethostname().encode()).digest()
    mine = np.frombuffer(digest[:8], np.uint32).copy()
    table = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), 2)
    hosts: dict[tuple, int] = {}
    return {p: hosts.setdefault(tuple(row.tolist()), len(hosts)) for p, row in enumerate(table)}


def device_groups(devices: list) -> tuple[str, list[list]]:
    """The devices split into groups joined by the fast network, and what a group is:
    ``("slice", ...)`` for TPU devices of several slices (``slice_index``); ``("host", ...)`` for
    other platforms' devices spread over several hosts (processes grouped by host name; on a TPU
    the ICI spans the hosts of a slice, so hosts are not groups there); else ``("all", [devices])``."""
    def grouped(key):
        groups: dict[Any, list] = {}
        for d in devices:
            groups.setdefault(key(d), []).append(d)
        return [groups[k] for k in sorted(groups)]

    if devices[0].platform == "tpu" and len({getattr(d, "slice_index", 0) for d in devices}) > 1:
        return "slice", grouped(lambda d: d.slice_index)
    if len({d.process_index for d in devices}) > 1:
        host = _host_of_process()
        if len(set(host.values())) > 1:
            return "host", grouped(lambda d: host[d.process_index])
    return "all", [list(devices)]


def _physical_mesh(shape: tuple[int, ...], devices: list) -> np.ndarray:
    """``devices`` (one group) as an array of ``shape`` in the platform's topology-aware order
    (TPU: rings of the torus; GPU: by id; CPU: as given)."""
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        # e.g. v5e, whose meshes may need a physical axis split (jax.make_mesh allows it there)
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def device_grid(devices: list, fsdp_size: int | None = None,
                groups: tuple[str, list[list]] | None = None) -> np.ndarray:
    """The devices as a ``(data, fsdp)`` array. ``fsdp`` defaults to the size of one group of
    :func:`device_groups` (a slice or a host), so ``data`` runs across groups; ``fsdp_size`` may be
    a divisor of the group size (``data`` then also runs within groups) or a multiple of it (then
    ``fsdp`` spans several groups, over the slower network). Within a group the order is the
    platform's topology-aware one (what ``jax.make_mesh`` picks); groups are stacked as
    ``mesh_utils.create_hybrid_device_mesh`` stacks slices."""
    kind, parts = groups or device_groups(list(devices))
    total, per = sum(map(len, parts)), len(parts[0])
    if any(len(p) != per for p in parts):  # uneven groups: no hybrid layout, one flat group
        kind, parts, per = "all", [[d for p in parts for d in p]], total
    fsdp = per if fsdp_size is None else int(fsdp_size)
    where = {"slice": f"{len(parts)} slices of {per} devices", "host": f"{len(parts)} hosts of {per} devices",
             "all": f"{total} devices"}[kind]
    if fsdp < 1 or total % fsdp or (per % fsdp and fsdp % per):
        sizes = sorted({d for d in range(1, total + 1) if total % d == 0 and (per % d == 0 or d % per == 0)})
        raise ConfigError(f"parallel.fsdp_size={fsdp_size} does not split {where}: use one of {sizes}")
    if fsdp <= per:
        inner, outer = (per // fsdp, fsdp), (len(parts), 1)  # fsdp within a group, data across (and within)
    else:
        inner, outer = (1, per), (len(parts) * per // fsdp, fsdp // per)  # fsdp spans several groups
    meshes = [_physical_mesh(inner, p) for p in parts]
    order = np.arange(len(parts)).reshape(outer)
    return np.block([[meshes[order[i, j]] for j in range(outer[1])] for i in range(outer[0])])


def build_mesh(devices: list | None = None, fsdp_size: int | None = None) -> tuple[Mesh, str, int]:
    """A ``("data", "fsdp")`` Mesh over ``devices`` (default: all), with what its groups are
    (``slice``, ``host`` or ``all``) and how many there are. Axes are ``AxisType.Auto`` (shardings
    are propagated by the compiler, as with ``jax.jit`` before explicit sharding)."""
    kind, parts = device_groups(list(devices or jax.devices()))
    grid = device_grid([d for p in parts for d in p], fsdp_size, (kind, parts))
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES)), kind, len(parts)


_COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|ragged-all-to-all|collective-broadcast)"
                         r"(?:-start)?\(")


def _iota(dims: str, perm: str | None) -> np.ndarray:
    """XLA's iota device list: ``arange`` reshaped to ``dims``, transposed by ``perm``, flattened."""
    shape = [int(x) for x in dims.split(",")]
    ids = np.arange(int(np.prod(shape))).reshape(shape)
    return (ids.transpose([int(x) for x in perm.split(",")]) if perm else ids).ravel()


def replica_groups(line: str) -> list[list[int]] | None:
    """The device groups of one HLO collective instruction, as positions in the program's device
    assignment (for a jit over a Mesh: ``mesh.devices.flat``). Reads the three forms XLA prints:
    ``{{0,1},{2,3}}``, iota ``[2,2]<=[4]T(1,0)`` and ``mesh['axis_0'=2,...], device_ids=([2,2]T(1,0))
    {'axis_0'}`` (groups vary along the named axes). None when the line has no replica groups;
    ``[]`` means one group of every device."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}", line)
    if m:
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names, shape = [a for a, _ in axes], [int(n) for _, n in axes]
        ids = (_iota(m.group(2), m.group(3)) if m.group(2) else np.arange(int(np.prod(shape)))).reshape(shape)
        varying = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(4))]
        fixed = [i for i in range(len(shape)) if i not in varying]
        return ids.transpose(fixed + varying).reshape(-1, int(np.prod([shape[i] for i in varying]))).tolist()
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        return _iota(m.group(3), m.group(4)).reshape(int(m.group(1)), int(m.group(2))).tolist()
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return None


def collectives(hlo_text: str) -> list[tuple[str, list[list[int]]]]:
    """``(opcode, groups)`` of every collective in compiled HLO text (see :func:`replica_groups`);
    lets tests and the AOT report check which devices each all-gather or reduction spans."""
    found = []
    for line in hlo_text.splitlines():
        op = _COLLECTIVE.search(line)
        groups = replica_groups(line) if op else None
        if groups is not None:
            found.append((op.group(1), groups))
    return found


def cross_slice_collectives(hlo_text: str) -> list[str]:
    """The collectives a multi-slice TPU program runs over the data-centre network: XLA:TPU keeps
    each slice's part as ICI collectives with groups inside the slice (:func:`collectives`) and
    sends the cross-slice part through the MegaScale runtime (``send`` ops whose rendezvous is
    named after the collective). One entry per such send: ``all-reduce``, ``all-gather``, ..."""
    kinds = []
    for line in hlo_text.splitlines():
        if " send(" in line and "xla_megascale_runtime" in line:
            m = re.search(r'_xla_host_transfer_rendezvous="([a-z\-]+?)(?:\.\d+)?_\d+"', line)
            kinds.append(m.group(1) if m else "unknown")
    return kinds


def _device_bytes(tree: Any, device: jax.Device) -> int:
    """Bytes of ``tree``'s shards that live on ``device``; for abstract leaves
    (``jax.ShapeDtypeStruct`` with a sharding, as ahead-of-time compiles take) the bytes their
    sharding would put there."""
    total = 0
    for a in jax.tree.leaves(tree):
        if isinstance(a, jax.Array):
            total += sum(s.data.nbytes for s in a.addressable_shards if s.device == device)
        elif isinstance(a, jax.ShapeDtypeStruct) and a.sharding is not None and device in a.sharding.device_set:
            total += int(np.prod(a.sharding.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
    return total


class MeshParallel:
    """jit over a ``("data", "fsdp")`` Mesh with NamedSharding: the batch split over both axes;
    the state replicated, or with ``fsdp`` sharded over the ``fsdp`` axis."""

    axis_name = None  # reductions are inserted by the compiler, not written in the step

    def __init__(self, fsdp: bool = False, fsdp_size: int | None = None, devices: list | None = None) -> None:
        self.mesh, self.groups, self.group_count = build_mesh(devices, fsdp_size)
        self.size = self.mesh.size
        self.fsdp = fsdp
        self.fsdp_size = self.mesh.shape["fsdp"]
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(AXES))
        self._checksum_fns: dict[tuple, Callable] = {}

    def leaf_sharding(self, leaf: Any) -> NamedSharding:
        """Where one state leaf lives. FSDP splits its largest axis that the ``fsdp`` axis size
        divides (masks and optimizer moments have their parameter's shape, so they split alike);
        leaves with no such axis (scalars, counters, a 10-wide bias on 4 devices) stay replicated."""
        shape = tuple(getattr(leaf, "shape", ()))
        n = self.fsdp_size
        axes = [i for i, size in enumerate(shape) if size >= n and size % n == 0]
        if not self.fsdp or n == 1 or not axes:
            return self.replicated
        axis = max(axes, key=lambda i: shape[i])
        return NamedSharding(self.mesh, P(*[("fsdp" if i == axis else None) for i in range(len(shape))]))

    def unsharded_leaves(self, state: Any) -> list[dict]:
        """With FSDP, the state leaves it leaves whole on every device (no axis the ``fsdp`` size
        divides), scalars aside: ``[{"path", "shape", "bytes"}]``. Works on abstract shapes
        (``jax.eval_shape``) too. Empty without FSDP (then everything is replicated by choice)."""
        if not self.fsdp or self.fsdp_size == 1:
            return []
        return [{"path": jax.tree_util.keystr(path), "shape": list(leaf.shape),
                 "bytes": int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize}
                for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
                if getattr(leaf, "ndim", 0) and self.leaf_sharding(leaf) == self.replicated
                and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)]

    def describe(self, state: Any = None) -> dict:
        """The mesh for ``config.json`` (axis names and sizes, what the groups are, which axes the
        batch and the state are split over) and, given ``state``, the leaves FSDP leaves whole."""
        out = {"mesh": {"axes": dict(self.mesh.shape), "groups": self.groups, "group_count": self.group_count,
                        "batch_axes": list(AXES), "state_axis": "fsdp" if self.fsdp and self.fsdp_size > 1 else None}}
        if state is not None and self.fsdp:
            out["unsharded_leaves"] = self.unsharded_leaves(state)
        return out

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
        """Bytes of the train state held by this process's first device of the mesh (the mesh's
        first device when none is local: an ahead-of-time compile's abstract state)."""
        local = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        return _device_bytes(state, (local or list(self.mesh.devices.flat))[0])

    def check_replicas(self, state: Any) -> int:
        """Raise :class:`ReplicaMismatch` unless every copy of every state leaf is bit-identical:
        all devices (of every process) that hold the same part of a leaf. Each device reduces its
        own copy to a :func:`checksum` (uint32[2] per leaf), so only those 8 bytes per leaf and
        device reach the host (across processes: one small all-gather); every process must call
        this at the same point. Returns the number of leaves checked."""
        flat = [(jax.tree_util.keystr(p), a) for p, a in jax.tree_util.tree_flatten_with_path(state)[0]
                if isinstance(a, jax.Array)]
        if not flat:
            return 0
        shardings = [a.sharding if isinstance(a.sharding, NamedSharding) and a.sharding.mesh == self.mesh
                     else self.leaf_sharding(a) for _, a in flat]
        table = self._checksums([a for _, a in flat], tuple(s.spec for s in shardings))
        position = {d: k for k, d in enumerate(self.mesh.devices.flat)}
        bad, processes = [], set()
        for j, ((name, leaf), sharding) in enumerate(zip(flat, shardings)):
            copies: dict[str, list] = {}
            for device, index in sharding.devices_indices_map(leaf.shape).items():
                copies.setdefault(repr(index), []).append(device)
            for devices in copies.values():
                sums = [tuple(table[position[d], j].tolist()) for d in devices]
                if len(set(sums)) > 1:
                    common = max(sums, key=sums.count)  # ties: the first device's copy
                    odd = [d for d, c in zip(devices, sums) if c != common]
                    agree = [d for d, c in zip(devices, sums) if c == common]
                    processes |= {d.process_index for d in odd + agree[:1]}
                    bad.append(f"{name} (devices {', '.join(map(str, odd))} differ from {', '.join(map(str, agree))})")
        if bad:
            where = "processes" if len(processes) > 1 else f"devices of process {processes.pop()}"
            raise ReplicaMismatch(f"replicated state differs between {where}: " + "; ".join(bad[:5])
                                  + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
        return len(flat)

    def _checksums(self, leaves: list, specs: tuple) -> np.ndarray:
        """uint32 [devices, leaves, 2]: row ``k`` is :func:`checksum` of each leaf's part on
        ``mesh.devices.flat[k]``, computed there (one compiled call for the whole state)."""
        if specs not in self._checksum_fns:
            def local(*parts):
                return jnp.stack([checksum(x) for x in parts])[None]
            self._checksum_fns[specs] = jax.jit(jax.shard_map(
                local, mesh=self.mesh, in_specs=specs, out_specs=P(self.mesh.axis_names), check_vma=False))
        table = self._checksum_fns[specs](*leaves)
        if not table.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(table, tiled=True))
        return np.asarray(table)

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


class PmapParallel(MeshParallel):
    """``parallel.mode=pmap``: explicit collectives, run with ``jax.jit`` + ``jax.shard_map``
    (``jax.pmap`` is in maintenance mode; since jax 0.8 it is itself built on them). A 1-D mesh
    ``data`` over every device of every process, in the hardware's order; the state is one
    replicated global array per leaf, each device holding and updating its own copy (no leading
    device axis, nothing through the host); each device gathers its slice of the global batch
    (``lax.axis_index``) and the step ``lax.pmean``s gradients and metrics over ``axis_name``.

    ``check_vma=False``: as under pmap, the gradient of the replicated parameters stays per device
    until the step's own ``pmean`` (with JAX's varying-axis checks on, differentiating through the
    replicated input would already sum it over devices), and outputs declared replicated are each
    device's own result, so diverging replicas stay visible to :meth:`check_replicas`."""

    axis_name = "data"

    def __init__(self, devices: list | None = None) -> None:
        kind, parts = device_groups(list(devices or jax.devices()))
        grid = device_grid([d for p in parts for d in p], None, (kind, parts))
        self.mesh = Mesh(grid.reshape(-1), (self.axis_name,), axis_types=(AxisType.Auto,))
        self.groups, self.group_count = kind, len(parts)
        self.size, self.fsdp, self.fsdp_size = self.mesh.size, False, 1
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = None  # each device gathers its own slice; nothing to constrain
        self._checksum_fns: dict[tuple, Callable] = {}

    def describe(self, state: Any = None) -> dict:
        """The device axis for ``config.json`` (as :meth:`MeshParallel.describe`)."""
        return {"mesh": {"axes": dict(self.mesh.shape), "groups": self.groups, "group_count": self.group_count,
                         "batch_axes": [self.axis_name], "state_axis": None, "collectives": "shard_map"}}

    def compile(self, fn: Callable, args: tuple, donate: bool = True, options: dict | None = None):
        """``fn`` run once per device on its own copy of every argument (all replicated; NumPy
        scalars too), its collectives over ``axis_name``; every output replicated (one copy per
        device, as each device computed it). With ``donate`` the state (``args[0]``) is updated in place."""
        mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=P(), out_specs=P(), check_vma=False)
        jitted = jax.jit(mapped, donate_argnums=0 if donate else ())
        return jitted.lower(*args).compile(compiler_options=options)


def make_parallel(mode: str, fsdp: bool = False, fsdp_size: int | None = None) -> MeshParallel | PmapParallel:
    """The strategy ``parallel.mode`` (with ``parallel.fsdp`` and ``parallel.fsdp_size``) names."""
    return PmapParallel() if mode == "pmap" else MeshParallel(fsdp, fsdp_size)

"""Where a run's files live: local paths and URLs (``gs://bucket/run``) behind one small layer.

A URL is handed on as it is: it becomes an ``etils.epath.Path``, the path type orbax itself takes,
so ``config.json``, ``metrics.jsonl``, ``summary.json``, the export and orbax's checkpoints all
reach one store through one file layer (epath reads ``gs://``, ``s3://``, ``az://`` and ``hf://``
through fsspec's ``gcsfs``, ``s3fs``, ``adlfs``, ``huggingface_hub``, or through ``tf.io.gfile``
when TensorFlow is installed). A local path stays a ``pathlib.Path``: every local behaviour
(absolute paths for orbax, renames over files, OS locks) is exactly what it was.

Object stores have no append and no rename; an object is replaced whole, all or nothing. So:

- :func:`open_append` and :func:`open_write` on a URL keep the content in memory and rewrite the
  object at each ``flush()``: the stored file is always a whole prefix of what was written, and
  what was flushed before a checkpoint is in the store when the checkpoint is (``metrics.jsonl``
  stays in step with the checkpoints a resumed run truncates it to). Each flush costs one upload
  of the whole file.
- :func:`write_npz` renames a temporary file over the target locally; on a URL one upload already
  replaces the object atomically.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import pathlib
import tempfile
from typing import IO, Iterator, Union

import numpy as np
from etils import epath

from jaxaccel.data import DataError
from jaxaccel.schema import ConfigError

__all__ = ["StoragePath", "UnsupportedURL", "StorageUnavailable", "is_url", "path", "check_reachable",
           "ORBAX_PACKAGES", "open_append", "open_write", "write_npz", "read_npz", "staged", "walk_dirs"]

StoragePath = Union[pathlib.Path, epath.Path]
"""A local ``pathlib.Path`` or, for a URL, an ``etils.epath.Path``: both have the pathlib methods
used here (``/``, ``exists``, ``is_dir``, ``iterdir``, ``mkdir``, ``read_text``, ``write_text``,
``read_bytes``, ``write_bytes``, ``open``, ``name``)."""


class UnsupportedURL(ConfigError):
    """A URL whose scheme etils.epath (orbax's file layer) does not know; the CLI exits 2."""


class StorageUnavailable(DataError):
    """A URL whose scheme needs a package that is not installed (gcsfs for ``gs://``, ...): a
    :class:`~jaxaccel.data.DataError`, so the CLI exits 3 as for any missing input."""


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URL (``scheme://...``). A ``pathlib.Path`` never is: it has
    already folded ``//`` into ``/``, which is why URLs must reach :func:`path` as strings."""
    return "://" in os.fspath(location)


def path(location: str | os.PathLike) -> StoragePath:
    """``location`` as a path: an ``epath.Path`` for a URL (its text unchanged), else a ``pathlib.Path``.
    Raises :class:`UnsupportedURL` (one line) for a URL scheme epath does not know."""
    if isinstance(location, epath.Path) and is_url(location):
        return location
    if not is_url(location):
        return pathlib.Path(location)
    try:
        return epath.Path(os.fspath(location))
    except (KeyError, NotImplementedError):
        scheme = os.fspath(location).split("://", 1)[0]
        raise UnsupportedURL(f"{location}: {scheme}:// is not a URL scheme etils.epath (the file layer orbax "
                             "uses) reads; use gs://, s3://, az://, hf:// or a local path") from None


# Packages orbax needs besides epath's backend, by scheme: before listing the steps of a gs://
# checkpoint directory it asks the bucket whether it has a hierarchical namespace, through
# google-cloud-storage (orbax/_src/path/gcs_utils.py: get_bucket, which also needs the
# storage.buckets.get permission).
ORBAX_PACKAGES = {"gs": ("google.cloud.storage", "google-cloud-storage")}


def check_reachable(location: StoragePath) -> None:
    """Raise :class:`StorageUnavailable` (one line naming the package) if a package that reaches
    ``location``'s store, or that orbax needs there, is not installed. Asks the store whether
    ``location`` exists, so network and permission errors surface here too, as the store's own
    exceptions."""
    scheme = os.fspath(location).split("://", 1)[0]
    try:
        location.exists()
    except ImportError as e:
        raise StorageUnavailable(f"{location}: {e} (etils.epath reaches {scheme}:// through it; with TensorFlow "
                                 "installed it uses tf.io.gfile instead)") from None
    module, package = ORBAX_PACKAGES.get(scheme, (None, None))
    if module and not _installed(module):
        raise StorageUnavailable(f"{location}: orbax needs {package} to list checkpoints under {scheme}:// "
                                 f"(it asks the bucket for its layout): pip install {package}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (google.cloud) is missing
        return False


class _RewrittenObject:
    """An object opened for writing: its content kept in memory (starting from what the object
    holds when appending), the object rewritten whole at each :meth:`flush` that follows a write,
    and at :meth:`close`. No ``fileno``: there is no OS file to fsync (tensorboardX fsyncs whatever
    has one)."""

    def __init__(self, location: epath.Path, binary: bool, append: bool):
        self._location, self._binary = location, binary
        self._content = bytearray(location.read_bytes() if append and location.exists() else b"")
        self._dirty, self.closed = not append, False  # a file opened for writing exists at once

    def write(self, data: str | bytes) -> int:
        if self.closed:
            raise ValueError(f"write to closed file {self._location}")
        self._content += data if self._binary else data.encode("utf-8")
        self._dirty = True
        return len(data)

    def flush(self) -> None:
        if self._dirty:
            self._location.write_bytes(bytes(self._content))
            self._dirty = False

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True

    def __enter__(self) -> "_RewrittenObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_append(location: StoragePath, binary: bool = False) -> IO:
    """``location`` opened for appending (``"a"``/``"ab"``). Locally the OS's append mode; on an
    object store (which cannot append) a file whose every ``flush()`` rewrites the object whole."""
    if not is_url(location):
        return location.open("ab" if binary else "a")
    return _RewrittenObject(location, binary, append=True)


def open_write(location: StoragePath, binary: bool = False) -> IO:
    """``location`` opened for writing (``"w"``/``"wb"``), for a file written bit by bit and
    flushed on the way. Locally an OS file; on an object store a file whose every ``flush()``
    rewrites the object whole (one upload of everything written so far)."""
    if not is_url(location):
        return location.open("wb" if binary else "w")
    return _RewrittenObject(location, binary, append=False)


def write_npz(location: StoragePath, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to ``location``, all or nothing: locally a temporary file renamed over it (a
    reader never sees half a file); on an object store one upload, which replaces it atomically."""
    if not is_url(location):
        tmp = location.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, location)
        return
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    location.write_bytes(buffer.getvalue())


def read_npz(location: StoragePath) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file at ``location`` (read whole from an object store)."""
    source = io.BytesIO(location.read_bytes()) if is_url(location) else location
    with np.load(source) as npz:
        return {k: npz[k] for k in npz.files}


@contextlib.contextmanager
def staged(location: StoragePath) -> Iterator[pathlib.Path]:
    """A local path to write ``location`` through, for writers that need a real file (a
    subprocess's output): ``location`` itself when local; for a URL a temporary file, uploaded to
    ``location`` when the block ends (also when it raises)."""
    if not is_url(location):
        yield location
        return
    with tempfile.TemporaryDirectory(prefix="jaxaccel-") as tmp:
        local = pathlib.Path(tmp) / location.name
        try:
            yield local
        finally:
            if local.exists():
                location.write_bytes(local.read_bytes())


def walk_dirs(top: StoragePath) -> Iterator[tuple[StoragePath, list[str]]]:
    """``(directory, subdirectory names)`` for ``top`` and every directory under it, top down, in
    name order; clearing the list (as with ``os.walk``) skips that directory's subtree."""
    if not is_url(top):
        for root, dirs, _ in os.walk(top):
            dirs.sort()
            yield pathlib.Path(root), dirs
        return
    # Not epath's walk(): on fsspec stores it yields the roots without their scheme.
    dirs = sorted(child.name for child in top.iterdir() if child.is_dir())
    yield top, dirs
    for name in dirs:
        yield from walk_dirs(top / name)

"""Datasets: TFDS by name, decoded once into uint8 arrays and cached on disk.

Reading goes through ``tfds.data_source`` (array_record random access), which needs no TensorFlow.
Decoding 60k PNGs takes several seconds, so the decoded arrays are cached as ``.npy`` files keyed
by the prepared files they came from; a later start memory-maps them in well under a second.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "DataError", "load", "resolve_data_dir"]


class DataError(RuntimeError):
    """The dataset is not available; the CLI prints this and exits 3."""


@dataclass(frozen=True)
class Dataset:
    """A labelled image dataset held as host uint8 arrays (NHWC) and int32 labels."""
    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_images.shape[1:])


def resolve_data_dir(data_dir: str | None) -> Path:
    """The TFDS data dir: the config's, else $TFDS_DATA_DIR, else TFDS's default."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("TFDS_DATA_DIR"):
        return Path(os.environ["TFDS_DATA_DIR"]).expanduser()
    return Path("~/tensorflow_datasets").expanduser()


def _cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("JAXACCEL_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "jaxaccel"
    return Path(root).expanduser()


def _prepared_version_dir(name: str, data_dir: Path) -> Path:
    """The newest prepared version of ``name`` (``<dir>/<name>/<version>/dataset_info.json``).

    Checked here rather than left to TFDS: for absent data TFDS either retries downloads for
    minutes or raises a misleading NotImplementedError about the TFRECORD format.
    """
    candidates = sorted(data_dir.glob(f"{name}/*/dataset_info.json"),
                        key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")))
    prepared = [p.parent for p in candidates if any(p.parent.glob("*.array_record*"))]
    if prepared:
        return prepared[-1]
    present = sorted(p.parent.parent.name for p in data_dir.glob("*/*/dataset_info.json"))
    have = f" That dir holds: {', '.join(present)}." if present else ""
    raise DataError(
        f"dataset {name!r} is not prepared (array_record format) in {data_dir}.{have} "
        f"Point data.dir (or TFDS_DATA_DIR) at a TFDS data dir that has it, or prepare it there with "
        f"`pip install 'jaxaccel[prepare]' && tfds build {name} --data_dir {data_dir} "
        f"--file_format array_record` (downloading and preparing needs TensorFlow and internet).")


def _fingerprint(version_dir: Path) -> str:
    stats = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in version_dir.iterdir())
    return hashlib.sha256(json.dumps([str(version_dir.resolve()), stats]).encode()).hexdigest()[:16]


def _decode_split(name: str, split: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray, int]:
    import tensorflow_datasets as tfds  # imported late: it is slow and only needed on a cache miss

    source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
    n = len(source)
    chunks = [range(i, min(i + 5000, n)) for i in range(0, n, 5000)]
    # PIL releases the GIL while decoding, so threads give a real speed-up.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        records = [r for chunk in pool.map(lambda c: source.__getitems__(list(c)), chunks) for r in chunk]
    images = np.stack([r["image"] for r in records]).astype(np.uint8)
    labels = np.asarray([r["label"] for r in records], np.int32)
    num_classes = source.dataset_info.features["label"].num_classes
    return images, labels, num_classes


def _atomic_save(path: Path, array: np.ndarray) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        np.save(f, array)
    os.replace(f.name, path)


def load(name: str, data_dir: str | None = None, cache_dir: str | None = None) -> Dataset:
    """Load TFDS dataset ``name`` (train and test splits) as uint8 arrays, via the on-disk cache."""
    root = resolve_data_dir(data_dir)
    version_dir = _prepared_version_dir(name, root)
    cache = _cache_root(cache_dir) / "data" / f"{name}-{version_dir.name}-{_fingerprint(version_dir)}"
    meta = cache / "meta.json"
    if not meta.exists():
        cache.mkdir(parents=True, exist_ok=True)
        num_classes = 0
        for split in ("train", "test"):
            images, labels, num_classes = _decode_split(name, split, root)
            _atomic_save(cache / f"{split}_images.npy", images)
            _atomic_save(cache / f"{split}_labels.npy", labels)
        meta.write_text(json.dumps({"name": name, "num_classes": num_classes, "source": str(version_dir)}))
    arrays = {f"{s}_{k}": np.load(cache / f"{s}_{k}.npy") for s in ("train", "test") for k in ("images", "labels")}
    return Dataset(name=name, num_classes=json.loads(meta.read_text())["num_classes"], **arrays)

"""Datasets: TFDS by name, decoded once into fixed-shape integer arrays and cached on disk.

Reading goes through ``tfds.data_source`` (array_record random access), which needs no TensorFlow.
Decoding 60k PNGs takes several seconds, so the decoded arrays are cached as ``.npy`` files keyed
by the contents of the prepared files they came from; a later start memory-maps them in well under
a second.

The kind of input follows the dataset's features: images (MNIST, CIFAR) stay uint8 NHWC; text
(``ag_news_subset``, ``imdb_reviews``) is tokenized at cache time into int32 ``[N, max_length]``
(:mod:`jaxaccel.text`; several Text features are joined in key order); audio
(``speech_commands``) becomes int16 ``[N, max_length]`` clips (:mod:`jaxaccel.audio`). The
tokenizer settings are part of the cached files' names, so other settings never read stale arrays.

Inside ``tfds.testing.mock_data`` (the tests of datasets this machine does not hold) the same code
reads TFDS's generated examples; nothing is cached then.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Dataset", "Decoding", "DataError", "load", "resolve_data_dir"]


class DataError(RuntimeError):
    """The dataset is not available; the CLI prints this and exits 3."""


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset held as host arrays and int32 labels. Inputs are uint8 images
    [N, H, W, C], int32 tokens [N, L] or int16 audio [N, T]."""
    name: str
    train_inputs: np.ndarray
    train_labels: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input (without the batch axis)."""
        return tuple(self.train_inputs.shape[1:])

    @property
    def input_dtype(self) -> np.dtype:
        return self.train_inputs.dtype


@dataclass(frozen=True)
class Decoding:
    """How text and audio examples become fixed-shape arrays (images need no settings)."""
    vocab_size: int = 32768           # text: hashed word vocabulary
    max_length: int | None = None     # tokens (default 128) or samples (default 16000: 1 s at 16 kHz)

    def length(self, kind: str) -> int:
        return self.max_length or {"text": 128, "audio": 16000}[kind]

    def suffix(self, kind: str) -> str:
        """Part of the cached file names: arrays decoded with other settings are other files."""
        if kind == "text":
            return f"-words{self.vocab_size}x{self.length(kind)}"
        return f"-int16x{self.length(kind)}" if kind == "audio" else ""


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


def _tfds_mocked() -> bool:
    """Whether ``tfds.testing.mock_data`` is active: TFDS then generates examples from the
    dataset's code and nothing needs to be on disk (it is imported by then if it is active)."""
    tfds = sys.modules.get("tensorflow_datasets")
    source = getattr(getattr(getattr(tfds, "core", None), "DatasetBuilder", None), "as_data_source", None)
    return getattr(source, "__module__", "").startswith("tensorflow_datasets.testing")


def _prepared_version_dir(name: str, data_dir: Path) -> Path | None:
    """The newest prepared version of ``name`` (``<dir>/<name>/<version>/dataset_info.json``);
    None under ``tfds.testing.mock_data``, which needs none.

    Checked here rather than left to TFDS: for absent data TFDS either retries downloads for
    minutes or raises a misleading NotImplementedError about the TFRECORD format.
    """
    candidates = sorted(data_dir.glob(f"{name}/*/dataset_info.json"),
                        key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")))
    prepared = [p.parent for p in candidates if any(p.parent.glob("*.array_record*"))]
    if prepared:
        return prepared[-1]
    if _tfds_mocked():
        return None
    present = sorted(p.parent.parent.name for p in data_dir.glob("*/*/dataset_info.json"))
    have = f" That dir holds: {', '.join(present)}." if present else ""
    raise DataError(
        f"dataset {name!r} is not prepared (array_record format) in {data_dir}.{have} "
        f"Point data.dir (or TFDS_DATA_DIR) at a TFDS data dir that has it, or prepare it there with "
        f"`pip install 'jaxaccel[prepare]' && tfds build {name} --data_dir {data_dir} "
        f"--file_format array_record` (downloading and preparing needs TensorFlow and internet).")


def _fingerprint(version_dir: Path, cache_root: Path) -> str:
    """What the prepared files hold: a hash of their names, sizes and contents. A copy of the same
    files elsewhere or with new mtimes (a re-provisioned machine's copy) keeps it, so the decoded
    arrays are reused; other contents change it. Reading the files costs ~60 ms for MNIST, so the
    result is memoized under their path, sizes and mtimes."""
    files = sorted(p for p in version_dir.iterdir() if p.is_file())
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    memo = cache_root / "fingerprints" / hashlib.sha256(
        json.dumps([str(version_dir.resolve()), stats]).encode()).hexdigest()[:16]
    if memo.exists():
        return memo.read_text()
    digest = hashlib.sha256()
    for path, (name, size, _) in zip(files, stats):
        digest.update(f"{name}\0{size}\0".encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    fingerprint = digest.hexdigest()[:16]
    memo.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=memo.parent, delete=False) as f:
        f.write(fingerprint)
    os.replace(f.name, memo)
    return fingerprint


@contextlib.contextmanager
def _audio_without_tensorflow():
    """TFDS's Audio feature asks TensorFlow for a dtype when it is built, which fails without
    TensorFlow although reading NumPy records never uses it (tensorflow/datasets#11233). Without
    TensorFlow, build it with the NumPy dtype instead, for the duration of the read only."""
    if importlib.util.find_spec("tensorflow") is not None:
        yield
        return
    from unittest import mock

    from tensorflow_datasets.core.features import audio_feature

    def init(self, file_format, np_dtype, shape):
        self._file_format, self._np_dtype, self._dtype, self._shape = file_format, np_dtype, np_dtype, shape
        self._channels = shape[1] if len(shape) > 1 else 1

    with mock.patch.object(audio_feature._AudioDecoder, "__init__", init):
        yield


def _read_records(source: Any) -> list[dict[str, Any]]:
    n = len(source)
    if _tfds_mocked():  # the mock's __getitems__ lacks its `self` (tfds 4.9); single reads work
        return [source[i] for i in range(n)]
    chunks = [range(i, min(i + 5000, n)) for i in range(0, n, 5000)]
    # PIL releases the GIL while decoding, so threads give a real speed-up.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return [r for chunk in pool.map(lambda c: source.__getitems__(list(c)), chunks) for r in chunk]


def _kind(features: Any) -> tuple[str, list[str]]:
    """("image" | "text" | "audio", the input feature keys) from a TFDS FeaturesDict."""
    types = {key: type(f).__name__ for key, f in features.items() if key != "label"}
    for kind, type_name in (("image", "Image"), ("audio", "Audio")):
        keys = [k for k, t in types.items() if t == type_name]
        if keys:
            return kind, keys[:1]
    texts = sorted(k for k, t in types.items() if t == "Text")
    if texts:
        return "text", texts
    raise DataError(f"no image, audio or text feature among {sorted(types)}: jaxaccel cannot train on it")


def _decode_split(name: str, split: str, data_dir: Path,
                  decoding: Decoding = Decoding()) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(inputs, int32 labels, number of classes, kind) of one split."""
    import tensorflow_datasets as tfds  # imported late: it is slow and only needed on a cache miss

    from jaxaccel import audio, text

    with _audio_without_tensorflow():
        source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
        records = _read_records(source)
        features = source.dataset_info.features
    kind, keys = _kind(features)
    if kind == "image":
        inputs = np.stack([r[keys[0]] for r in records]).astype(np.uint8)
    elif kind == "audio":
        inputs = audio.fix_length([r[keys[0]] for r in records], decoding.length(kind))
    else:
        joined = (" ".join(_as_str(r[k]) for k in keys) for r in records)
        inputs = text.tokenize(joined, decoding.vocab_size, decoding.length(kind))
    labels = np.asarray([r["label"] for r in records], np.int32)
    return inputs, labels, features["label"].num_classes, kind


def _as_str(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        np.save(f, array)
    os.replace(f.name, path)


def load(name: str, data_dir: str | None = None, cache_dir: str | None = None,
         decoding: Decoding = Decoding()) -> Dataset:
    """Load TFDS dataset ``name`` (train and test splits) as integer arrays, via the on-disk cache."""
    root = resolve_data_dir(data_dir)
    version_dir = _prepared_version_dir(name, root)
    if version_dir is None:  # mock data: decode every time, never cache generated examples
        (x, y, num_classes, _), (tx, ty, _, _) = (_decode_split(name, s, root, decoding) for s in ("train", "test"))
        return Dataset(name, x, y, tx, ty, num_classes)
    root_dir = _cache_root(cache_dir)
    cache = root_dir / "data" / f"{name}-{version_dir.name}-{_fingerprint(version_dir, root_dir)}"
    meta_path = cache / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    # Caches written before text and audio existed hold images and have no "kind".
    suffix = decoding.suffix(meta.get("kind", "image")) if meta else None
    if meta is None or not (cache / f"test_images{suffix}.npy").exists():
        cache.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            inputs, labels, num_classes, kind = _decode_split(name, split, root, decoding)
            suffix = decoding.suffix(kind)
            _atomic_save(cache / f"{split}_images{suffix}.npy", inputs)
            _atomic_save(cache / f"{split}_labels.npy", labels)
        meta = {"name": name, "num_classes": num_classes, "source": str(version_dir), "kind": kind}
        meta_path.write_text(json.dumps(meta))
    # The cache's file names predate text and audio: "images" holds any kind of input.
    arrays = {f"{s}_{k}": np.load(cache / f"{s}_{file}{suffix if k == 'inputs' else ''}.npy")
              for s in ("train", "test") for k, file in (("inputs", "images"), ("labels", "labels"))}
    return Dataset(name=name, num_classes=meta["num_classes"], **arrays)

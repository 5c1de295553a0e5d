"""Datasets: TFDS by name, decoded once into fixed-shape integer arrays and cached on disk.

Reading goes through ``tfds.data_source`` (array_record random access), which needs no TensorFlow.
Decoding 60k PNGs takes several seconds, so the decoded arrays are cached as ``.npy`` files keyed
by the contents of the prepared files they came from; a later start reads them in well under a
second. The cache's ``meta.json`` records each file's size and CRC-32 (checked at every load,
~15 ms for MNIST): a truncated or garbled cached file is decoded again, with a note on stdout,
instead of failing every later run. Damaged prepared files (``array_record`` or the TFDS JSON
metadata) are a :class:`DataError` naming the file.

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
import io
import json
import os
import sys
import tempfile
import zlib
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


def _damaged(what: str, version_dir: Path, error: BaseException) -> DataError:
    detail = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    name = version_dir.parent.name
    return DataError(
        f"{what} cannot be read ({detail}): the prepared dataset is damaged. Copy {version_dir} again from "
        f"a good source, or delete it and prepare it again with `tfds build {name} --data_dir "
        f"{version_dir.parent.parent} --file_format array_record`.")


def _check_metadata(version_dir: Path) -> None:
    """Raise a DataError naming a TFDS metadata file that is not JSON (TFDS would raise a
    protobuf parse error about the builder instead)."""
    for path in (version_dir / "dataset_info.json", version_dir / "features.json"):
        if path.exists():
            try:
                json.loads(path.read_bytes())
            except (ValueError, OSError) as e:
                raise _damaged(str(path), version_dir, e) from None


def _decode_split(name: str, split: str, data_dir: Path,
                  decoding: Decoding = Decoding()) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(inputs, int32 labels, number of classes, kind) of one split."""
    import tensorflow_datasets as tfds  # imported late: it is slow and only needed on a cache miss

    from jaxaccel import audio, text

    version_dir = _prepared_version_dir(name, data_dir)
    with _audio_without_tensorflow():
        try:
            source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
            features = source.dataset_info.features
        except Exception as e:  # noqa: BLE001 - TFDS raises many types for bad metadata
            if version_dir is None:
                raise
            raise _damaged(f"the TFDS metadata of {name} in {version_dir}", version_dir, e) from None
        try:
            records = _read_records(source)
        except Exception as e:  # noqa: BLE001 - array_record/riegeli raise RuntimeError, PIL others
            if version_dir is None:
                raise
            files = ", ".join(str(p) for p in sorted(version_dir.glob(f"{name}-{split}.array_record*")))
            raise _damaged(files or f"the {split} split in {version_dir}", version_dir, e) from None
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


def _atomic_write(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(data)
    os.replace(f.name, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _cache_files(suffix: str, split: str) -> dict[str, str]:
    """Dataset field -> cached file name of one split's arrays decoded with ``suffix`` settings
    (the file names predate text and audio: "images" holds any kind of input)."""
    return {f"{split}_inputs": f"{split}_images{suffix}.npy", f"{split}_labels": f"{split}_labels.npy"}


def _read_meta(cache: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(meta.json's record, why it is unusable). Both None when there is no cache yet."""
    path = cache / "meta.json"
    if not path.exists():
        return None, None
    try:
        meta = json.loads(path.read_bytes())
        int(meta["num_classes"])
        if not isinstance(meta.get("files", {}), dict):
            raise ValueError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{path} is damaged ({type(e).__name__}: {str(e)[:100]})"
    if "files" not in meta:
        return None, f"{cache} has no checksums (written by an older jaxaccel)"
    return meta, None


def _read_split(cache: Path, meta: dict[str, Any], split: str,
                decoding: Decoding) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(one split's cached arrays, why they are unusable), each file checked against its
    recorded size and CRC-32. (None, None): this split was never cached with these settings."""
    files = _cache_files(decoding.suffix(meta.get("kind", "image")), split)
    recorded = meta["files"]
    if not all(f in recorded for f in files.values()):
        return None, None
    arrays = {}
    for key, name in files.items():
        path, want = cache / name, recorded[name] if isinstance(recorded[name], dict) else {}
        try:
            raw = path.read_bytes()
        except OSError as e:
            return None, f"{path} cannot be read ({e.strerror or e})"
        if len(raw) != want.get("bytes"):
            return None, f"{path} is damaged ({len(raw):,} bytes, {want.get('bytes')} written)"
        if zlib.crc32(raw) != want.get("crc32"):
            return None, f"{path} is damaged (its CRC-32 differs from the one written)"
        try:
            arrays[key] = np.load(io.BytesIO(raw))
        except ValueError as e:
            return None, f"{path} is damaged ({e})"
    return arrays, None


def _decode_into_cache(cache: Path, name: str, root: Path, version_dir: Path, decoding: Decoding,
                       meta: dict[str, Any] | None, splits: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """Decode ``splits`` and write them, with their sizes and checksums, into ``cache``; returns
    (their arrays, number of classes). meta.json is written last, so a killed write is a miss."""
    cache.mkdir(parents=True, exist_ok=True)
    arrays, recorded = {}, dict((meta or {}).get("files") or {})
    for split in splits:
        inputs, labels, num_classes, kind = _decode_split(name, split, root, decoding)
        files = _cache_files(decoding.suffix(kind), split)
        for key, array in ((f"{split}_inputs", inputs), (f"{split}_labels", labels)):
            raw = _npy_bytes(array)
            _atomic_write(cache / files[key], raw)
            recorded[files[key]] = {"bytes": len(raw), "crc32": zlib.crc32(raw)}
            arrays[key] = array
    meta = {"name": name, "num_classes": num_classes, "source": str(version_dir), "kind": kind, "files": recorded}
    _atomic_write(cache / "meta.json", json.dumps(meta).encode())
    return arrays, num_classes


def load(name: str, data_dir: str | None = None, cache_dir: str | None = None,
         decoding: Decoding = Decoding()) -> Dataset:
    """Load TFDS dataset ``name`` (train and test splits) as integer arrays, via the on-disk cache.

    A damaged cache entry is decoded again (and says so on stdout); damaged prepared files raise
    :class:`DataError` naming them."""
    root = resolve_data_dir(data_dir)
    version_dir = _prepared_version_dir(name, root)
    if version_dir is None:  # mock data: decode every time, never cache generated examples
        (x, y, num_classes, _), (tx, ty, _, _) = (_decode_split(name, s, root, decoding) for s in ("train", "test"))
        return Dataset(name, x, y, tx, ty, num_classes)
    _check_metadata(version_dir)
    root_dir = _cache_root(cache_dir)
    cache = root_dir / "data" / f"{name}-{version_dir.name}-{_fingerprint(version_dir, root_dir)}"
    meta, problem = _read_meta(cache)
    arrays, missing, problems = {}, [], [problem] if problem else []
    for split in ("train", "test"):
        found, problem = _read_split(cache, meta, split, decoding) if meta else (None, None)
        if found is None:
            missing.append(split)
            problems += [problem] if problem else []
        arrays.update(found or {})
    num_classes = int(meta["num_classes"]) if meta else 0
    if missing:  # only what is absent or damaged is decoded again
        if problems:
            print(f"data cache: {'; '.join(problems)}; decoding {name} ({', '.join(missing)}) again "
                  f"from {version_dir}", flush=True)
        decoded, num_classes = _decode_into_cache(cache, name, root, version_dir, decoding, meta, missing)
        arrays.update(decoded)
    return Dataset(name=name, num_classes=num_classes, **arrays)

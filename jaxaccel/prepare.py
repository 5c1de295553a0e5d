"""Writing datasets in TFDS's prepared form (``array_record`` files, ``dataset_info.json``,
``features.json``) without TensorFlow.

TFDS's own writer encodes images with TensorFlow; here PNGs are encoded with Pillow and the
``tf.train.Example`` records built with TFDS's bundled protobuf classes, which is the same bytes
layout TFDS reads back (``tfds.data_source`` also opens datasets it has no builder for, from their
files). Every dataset is written into a temporary directory beside its destination and renamed
into place at the end, so an interrupted write leaves nothing half-prepared.

Used by :func:`prepare_published`, which prepares MNIST and Fashion-MNIST on a machine that does
not have them, from their published IDX files (``python -m jaxaccel.run exp=mnist_sparse`` then
needs no ``tfds build`` and no TensorFlow), and by :func:`synthetic_images` (the benchmark's and
the tests' large-image dataset).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import io
import json
import os
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from jaxaccel.data import DataError

__all__ = ["encode_png", "example_record", "write_dataset", "synthetic_images", "PUBLISHED", "can_prepare",
           "prepare_published", "unreachable", "MIRROR_ENV", "OFFLINE_ENV"]

# A base URL serving <name>/<file> for every dataset of PUBLISHED (a local mirror, or the tests'
# 127.0.0.1 server), used instead of the published URLs.
MIRROR_ENV = "JAXACCEL_DATASET_MIRROR"
# Set (to anything): never download; an absent dataset is exit 3 at once, as before jaxaccel prepared any.
OFFLINE_ENV = "JAXACCEL_OFFLINE"


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, C] image (C = 1 is stored as greyscale)."""
    import PIL.Image
    buffer = io.BytesIO()
    PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def example_record(image_png: bytes, label: int, image_key: str = "image") -> bytes:
    """One serialized ``tf.train.Example`` as TFDS stores an (Image, ClassLabel) example."""
    from tensorflow_datasets.proto import tf_example_pb2
    example = tf_example_pb2.Example()
    example.features.feature[image_key].bytes_list.value.append(image_png)
    example.features.feature["label"].int64_list.value.append(int(label))
    return example.SerializeToString()


def _image_features(shape: tuple[int, int, int], num_classes: int):
    import tensorflow_datasets as tfds
    return tfds.features.FeaturesDict({"image": tfds.features.Image(shape=shape, encoding_format="png"),
                                       "label": tfds.features.ClassLabel(num_classes=num_classes)})


def write_dataset(data_dir: str | Path, name: str, version: str, features, splits: dict[str, Iterable[bytes]],
                  description: str = "", shards: int = 1, progress: Callable[[int], None] | None = None) -> Path:
    """Write ``<data_dir>/<name>/<version>/`` from serialized records per split, atomically;
    returns the version dir. ``features`` is a TFDS FeaturesDict (only its JSON form is written).
    ``shards`` files per split; ``progress(n)`` is called after each record."""
    from array_record.python import array_record_module
    from google.protobuf import json_format
    from tensorflow_datasets.core.proto import dataset_info_pb2

    final = Path(data_dir) / name / version
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.incomplete-{os.getpid()}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would stay on the prepared dir
    try:
        info = dataset_info_pb2.DatasetInfo(name=name, version=version, file_format="array_record",
                                            description=description)
        for split, records in splits.items():
            records = list(records) if shards > 1 else records
            lengths, sizes = [], 0
            chunks = np.array_split(np.arange(len(records)), shards) if shards > 1 else [None]
            for shard, chunk in enumerate(chunks):
                path = tmp / f"{name}-{split}.array_record-{shard:05d}-of-{shards:05d}"
                writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
                count = 0
                for record in (records if chunk is None else (records[i] for i in chunk)):
                    writer.write(record)
                    count, sizes = count + 1, sizes + len(record)
                    if progress:
                        progress(1)
                writer.close()
                lengths.append(count)
            info.splits.add(name=split, shard_lengths=lengths, num_bytes=sizes,
                            filepath_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
        (tmp / "features.json").write_text(json_format.MessageToJson(features.to_proto()))
        features.save_metadata(tmp)  # class names, where the labels have them (label.labels.txt)
        (tmp / "dataset_info.json").write_text(json_format.MessageToJson(info))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "dataset_info.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process prepared it meanwhile: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove_abandoned(parent: Path) -> None:
    """Delete what killed preparations left (``.<version>.incomplete-<pid>-*`` of dead processes)."""
    for path in parent.glob(".*.incomplete-*"):
        try:
            pid = int(path.name.split(".incomplete-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            continue


def _synthetic_chunk(start: int, count: int, size: int, channels: int, num_classes: int, seed: int) -> list[bytes]:
    """Examples ``start..start+count-1``: each image's class sets a colour band over uniform noise
    (learnable, and incompressible enough that the PNGs take about their decoded size on disk)."""
    records = []
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        label = int(rng.integers(num_classes))
        image = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        band = slice(label * size // num_classes, (label + 1) * size // num_classes)
        image[band, :, :] = 255 - image[band, :, :] // 4
        records.append(example_record(encode_png(image), label))
    return records


def _synthetic_split(count: int, size: int, channels: int, num_classes: int, seed: int) -> Iterator[bytes]:
    """The split's records in order, encoded a chunk at a time in threads (zlib releases the GIL)."""
    import concurrent.futures
    workers = os.cpu_count() or 1
    starts = range(0, count, 256)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for first in range(0, len(starts), 4 * workers):  # a bounded window of chunks in flight
            window = [pool.submit(_synthetic_chunk, s, min(256, count - s), size, channels, num_classes, seed)
                      for s in starts[first:first + 4 * workers]]
            for future in window:
                yield from future.result()


def synthetic_images(data_dir: str | Path, name: str = "synthetic_images", num_train: int = 1024,
                     num_test: int = 256, size: int = 64, channels: int = 3, num_classes: int = 10,
                     seed: int = 0, progress: Callable[[int], None] | None = None) -> Path:
    """A labelled image dataset of ``size x size x channels`` PNGs in TFDS's prepared form."""
    features = _image_features((size, size, channels), num_classes)
    splits = {"train": _synthetic_split(num_train, size, channels, num_classes, seed),
              "test": _synthetic_split(num_test, size, channels, num_classes, seed + 1)}
    description = json.dumps({"synthetic": True, "size": size, "channels": channels, "seed": seed})
    return write_dataset(data_dir, name, "1.0.0", features, splits, description, progress=progress)


# ---------------------------------------------------------------------------------------------
# Published datasets prepared from their own files.

@dataclasses.dataclass(frozen=True)
class Published:
    """A dataset jaxaccel prepares itself: TFDS's version, where its files are published, their
    MD5 sums, and the class names TFDS gives its labels (None: numbers only)."""
    version: str
    url: str
    md5: dict[str, str]
    names: tuple[str, ...] | None = None

    def files(self, split: str) -> tuple[str, str]:
        prefix = "train" if split == "train" else "t10k"
        return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


PUBLISHED = {
    "mnist": Published("3.0.1", "https://storage.googleapis.com/cvdf-datasets/mnist/", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion_mnist": Published("3.0.1", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")),
}


def can_prepare(name: str, data_dir: Path) -> bool:
    """Whether jaxaccel can prepare ``name`` in ``data_dir`` itself: a dataset of PUBLISHED whose
    version dir is not there at all (a dir prepared in another format is the user's to convert)."""
    return name in PUBLISHED and not (Path(data_dir) / name / PUBLISHED[name].version).exists()


def _base_url(name: str) -> str:
    mirror = os.environ.get(MIRROR_ENV)
    return f"{mirror.rstrip('/')}/{name}/" if mirror else PUBLISHED[name].url


def _reachable(url: str, timeout: float = 3.0) -> str | None:
    """None if a connection to ``url``'s host opens within ``timeout`` s, else why not. Bounded
    as a whole: a machine without network but with a resolver configured can spend 10 s or more
    in name resolution, and an absent dataset must stay a fast exit 3 there."""
    import socket
    import threading
    if os.environ.get(OFFLINE_ENV):
        return f"{OFFLINE_ENV} is set"
    parts = urllib.parse.urlsplit(url)
    outcome: list[str | None] = []

    def connect():
        try:
            with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                          timeout=timeout):
                outcome.append(None)
        except OSError as e:
            outcome.append(f"{parts.hostname} cannot be reached ({e.strerror or e})")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"{parts.hostname} cannot be reached (no answer within {timeout:.0f} s)"


def _bar(total: int, unit: str, description: str):
    """A progress bar on a terminal (stderr), else nothing: logs get one line per stage."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, unit_scale=True, desc=description, file=sys.stderr, leave=False)


def _download(url: str, path: Path, md5: str) -> None:
    with urllib.request.urlopen(url, timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0)
        bar, digest = _bar(total, "B", path.name), hashlib.md5()
        with path.open("wb") as f:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                f.write(chunk)
                digest.update(chunk)
                if bar:
                    bar.update(len(chunk))
        if bar:
            bar.close()
    if digest.hexdigest() != md5:
        raise DataError(f"{url}: the downloaded file's MD5 is {digest.hexdigest()}, not the published {md5} "
                        "(a truncated or altered download); nothing was prepared: run the same command again")


def _idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format: magic, dims, then the data as big-endian uint8)."""
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _records_in_tfds_order(images: np.ndarray, labels: np.ndarray, split: str,
                           progress: Callable[[int], None] | None) -> list[bytes]:
    """The split's records in the order TFDS writes them (sorted by the salted MD5 of each
    example's key, the index in the IDX file), so the prepared files hold what ``tfds build``
    writes, record for record (PNG bytes aside; they decode to the same pixels)."""
    import concurrent.futures

    from tensorflow_datasets.core import hashing
    hasher = hashing.Hasher(split)
    order = sorted(range(len(labels)), key=hasher.hash_key)

    def encode(chunk):
        out = [example_record(encode_png(images[i][..., None]), int(labels[i])) for i in chunk]
        if progress:
            progress(len(chunk))
        return out

    chunks = [order[i:i + 1000] for i in range(0, len(order), 1000)]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # zlib releases the GIL
        return [record for part in pool.map(encode, chunks) for record in part]


def unreachable(name: str) -> str | None:
    """None if ``name``'s published files (or the mirror) can be reached now, else why not."""
    return _reachable(_base_url(name))


def prepare_published(name: str, data_dir: Path, message: Callable[[str], None] = print) -> Path:
    """Download ``name``'s published files and prepare it in ``data_dir`` (array_record, TFDS's
    layout and record order); returns the version dir. A download that fails or does not match its
    published MD5 is a DataError (exit 3); nothing is left half-prepared in any case."""
    import tensorflow_datasets as tfds
    spec, base = PUBLISHED[name], _base_url(name)
    data_dir.mkdir(parents=True, exist_ok=True)
    message(f"preparing {name} {spec.version} in {data_dir} from {base} (array_record, no TensorFlow needed)")
    with tempfile.TemporaryDirectory(prefix=f".{name}-downloads-", dir=data_dir) as downloads:
        for file, md5 in spec.md5.items():
            url = urllib.parse.urljoin(base, file)
            try:
                _download(url, Path(downloads) / file, md5)
            except (OSError, http.client.HTTPException) as e:  # urllib's errors are OSErrors
                raise DataError(f"downloading {url} failed ({e}); nothing was prepared in {data_dir}: run the "
                                "same command again, or point data.dir at a TFDS data dir that has it") from None
        arrays = {split: tuple(_idx(Path(downloads) / f) for f in spec.files(split)) for split in ("train", "test")}
    label = tfds.features.ClassLabel(names=list(spec.names)) if spec.names else tfds.features.ClassLabel(num_classes=10)
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(28, 28, 1)), "label": label})
    total = sum(len(labels) for _, labels in arrays.values())
    bar = _bar(total, "ex", f"encoding {name}")
    progress = bar.update if bar else None
    splits = {split: _records_in_tfds_order(images, labels, split, progress) for split, (images, labels) in arrays.items()}
    final = write_dataset(data_dir, name, spec.version, features, splits,
                          description=f"{name}, prepared by jaxaccel from {base}")
    if bar:
        bar.close()
    message(f"prepared {name}: {total:,} examples in {final}")
    return final

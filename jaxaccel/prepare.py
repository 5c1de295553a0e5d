"""Writing datasets in TFDS's prepared form (``array_record`` files, ``dataset_info.json``,
``features.json``) without TensorFlow.

TFDS's own writer encodes images with TensorFlow; here PNGs are encoded with Pillow and the
``tf.train.Example`` records built with TFDS's bundled protobuf classes, which is the same bytes
layout TFDS reads back (``tfds.data_source`` also opens datasets it has no builder for, from their
files). Every dataset is written into a temporary directory beside its destination and renamed
into place at the end, so an interrupted write leaves nothing half-prepared.

Used by :func:`synthetic_images` (the benchmark's and the tests' large-image dataset).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

__all__ = ["encode_png", "example_record", "write_dataset", "synthetic_images"]


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.incomplete-", dir=final.parent))
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
        (tmp / "dataset_info.json").write_text(json_format.MessageToJson(info))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _synthetic_split(count: int, size: int, channels: int, num_classes: int, seed: int) -> Iterator[bytes]:
    """Images whose class sets a colour band over uniform noise (learnable, and incompressible
    enough that the PNGs take about their decoded size on disk)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = int(rng.integers(num_classes))
        image = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        band = slice(label * size // num_classes, (label + 1) * size // num_classes)
        image[band, :, :] = 255 - image[band, :, :] // 4
        yield example_record(encode_png(image), label)


def synthetic_images(data_dir: str | Path, name: str = "synthetic_images", num_train: int = 1024,
                     num_test: int = 256, size: int = 64, channels: int = 3, num_classes: int = 10,
                     seed: int = 0, progress: Callable[[int], None] | None = None) -> Path:
    """A labelled image dataset of ``size x size x channels`` PNGs in TFDS's prepared form."""
    features = _image_features((size, size, channels), num_classes)
    splits = {"train": _synthetic_split(num_train, size, channels, num_classes, seed),
              "test": _synthetic_split(num_test, size, channels, num_classes, seed + 1)}
    description = json.dumps({"synthetic": True, "size": size, "channels": channels, "seed": seed})
    return write_dataset(data_dir, name, "1.0.0", features, splits, description, progress=progress)

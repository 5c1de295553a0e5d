"""Data loading, checked pixel for pixel against an independent reader of the original IDX files."""
from __future__ import annotations

import collections
import gzip
import os
import shutil
import struct

import numpy as np
import pytest

from jaxaccel import data
from tests.conftest import SHARED


def read_idx(path) -> np.ndarray:
    """Minimal IDX reader (LeCun's format): magic, dims, then big-endian uint8 data."""
    with gzip.open(path, "rb") as f:
        _, _, dtype, ndim = struct.unpack(">BBBB", f.read(4))
        assert dtype == 0x08, "unsigned byte data"
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), np.uint8).reshape(shape)


@pytest.mark.parametrize("split, prefix", [("train", "train"), ("test", "t10k")])
def test_mnist_matches_the_original_idx_files(mnist, split, prefix):
    raw = SHARED / "data" / "mnist"
    images = read_idx(raw / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz")
    got_images, got_labels = getattr(mnist, f"{split}_inputs"), getattr(mnist, f"{split}_labels")
    assert got_images.dtype == np.uint8 and got_images.shape == (*images.shape, 1)
    assert got_labels.dtype == np.int32
    # TFDS shuffles examples when it prepares a dataset, so compare the multisets of
    # (every pixel, label) pairs: each IDX example must appear exactly as often in ours.
    def pairs(imgs, labs):
        return collections.Counter(zip(map(bytes, imgs.reshape(len(imgs), -1)), labs.tolist()))
    assert pairs(got_images[..., 0], got_labels) == pairs(images, labels)
    assert mnist.num_classes == 10


def test_fashion_mnist_loads_by_name():
    ds = data.load("fashion_mnist")
    labels = read_idx(SHARED / "data" / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(np.bincount(ds.test_labels), np.bincount(labels))
    assert ds.train_inputs.shape == (60000, 28, 28, 1)


def test_second_load_reads_the_cache_without_decoding(mnist, monkeypatch):
    def no_decoding(*args):
        raise AssertionError("decoded again instead of reading the cache")
    monkeypatch.setattr(data, "_decode_split", no_decoding)
    again = data.load("mnist")
    np.testing.assert_array_equal(again.test_inputs, mnist.test_inputs)


def test_cache_is_keyed_by_cache_dir(tmp_path, monkeypatch):
    calls = []
    real = data._decode_split
    monkeypatch.setattr(data, "_decode_split", lambda *a: calls.append(a[1]) or real(*a))
    data.load("mnist", cache_dir=str(tmp_path))
    assert calls == ["train", "test"]
    assert sorted(p.name for p in next((tmp_path / "data").iterdir()).iterdir()) == [
        "meta.json", "test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy"]


def test_a_copy_with_new_mtimes_reads_the_same_cache(mnist, tmp_path, monkeypatch):
    """The cache is keyed by what the prepared files hold, not where they are or when they were
    copied: a re-provisioned copy does not decode 70k PNGs again. Other contents are another cache."""
    source = SHARED / "tfds" / "mnist" / "3.0.1"
    copy = tmp_path / "tfds" / "mnist" / "3.0.1"
    shutil.copytree(source, copy)
    for f in copy.iterdir():
        os.utime(f, (1e9, 1e9))  # 2001: not the source's mtimes
    def no_decoding(*args):
        raise AssertionError("decoded again instead of reading the cache")
    monkeypatch.setattr(data, "_decode_split", no_decoding)
    again = data.load("mnist", data_dir=str(tmp_path / "tfds"))
    np.testing.assert_array_equal(again.train_inputs, mnist.train_inputs)

    root = data._cache_root(None)
    info = copy / "dataset_info.json"
    text = info.read_text()
    info.chmod(0o644)
    info.write_text(text.replace('"', "'", 1))  # same size, other contents
    assert data._fingerprint(copy, root) != data._fingerprint(source, root)


def test_absent_dataset_names_dataset_dir_and_fix(tmp_path):
    with pytest.raises(data.DataError) as info:
        data.load("mnist", data_dir=str(tmp_path))
    message = str(info.value)
    assert "'mnist'" in message and str(tmp_path) in message and "tfds build mnist" in message
    assert "TensorFlow" in message


def test_unknown_dataset_lists_what_the_dir_holds():
    with pytest.raises(data.DataError, match="That dir holds: fashion_mnist, mnist"):
        data.load("cifar10")


def test_text_caches_are_named_by_their_tokenizer_settings(tmp_path, monkeypatch):
    """Arrays decoded with other tokenizer settings are other files: a changed setting decodes
    again instead of reading stale tokens, an unchanged one reads the cache."""
    calls = []

    def fake_text(name, split, root, decoding):
        calls.append((split, decoding.vocab_size, decoding.length("text")))
        tokens = np.full((4, decoding.length("text")), decoding.vocab_size - 1, np.int32)
        return tokens, np.zeros(4, np.int32), 4, "text"

    monkeypatch.setattr(data, "_decode_split", fake_text)
    first = data.load("mnist", cache_dir=str(tmp_path), decoding=data.Decoding(100, 8))
    again = data.load("mnist", cache_dir=str(tmp_path), decoding=data.Decoding(100, 8))
    other = data.load("mnist", cache_dir=str(tmp_path), decoding=data.Decoding(200, 16))
    assert calls == [("train", 100, 8), ("test", 100, 8), ("train", 200, 16), ("test", 200, 16)]
    assert first.train_inputs.shape == again.train_inputs.shape == (4, 8) and again.train_inputs.max() == 99
    assert other.train_inputs.shape == (4, 16) and other.train_inputs.max() == 199
    names = sorted(p.name for p in next((tmp_path / "data").iterdir()).iterdir())
    assert "train_images-words100x8.npy" in names and "test_images-words200x16.npy" in names


# ----------------------------------------------------------------------------------------------
# Damaged data: prepared files are exit 3 naming the file; a damaged cache is decoded again.

MNIST = SHARED / "tfds" / "mnist" / "3.0.1"
TRAIN_FILE = "mnist-train.array_record-00000-of-00001"
RUN = ["exp=mnist_mlp", "model.features=[16]", "train.steps=10"]


def _damaged_copy(tmp_path, case: str):
    """A TFDS data dir holding MNIST's metadata and one damaged or partial train file (enough:
    the loader reads the metadata, then the train split first)."""
    copy = tmp_path / "tfds" / "mnist" / "3.0.1"
    copy.mkdir(parents=True)
    for name in ("dataset_info.json", "features.json"):
        (copy / name).write_bytes((MNIST / name).read_bytes())
    with (MNIST / TRAIN_FILE).open("rb") as f:
        head = f.read(1 << 20)
    (copy / TRAIN_FILE).write_bytes({"truncated": head, "random": np.random.default_rng(0).bytes(1 << 20),
                                     "dataset_info": head}[case])
    if case == "dataset_info":
        info = copy / "dataset_info.json"
        info.write_bytes(info.read_bytes()[:100])
    return copy, {"truncated": copy / TRAIN_FILE, "random": copy / TRAIN_FILE,
                  "dataset_info": copy / "dataset_info.json"}[case]


@pytest.mark.parametrize("case", ["truncated", "random", "dataset_info"])
def test_damaged_prepared_files_exit_3_naming_the_file(case, tmp_path):
    from tests.conftest import run_cli
    copy, bad = _damaged_copy(tmp_path, case)
    result = run_cli(*RUN, f"workdir={tmp_path / 'run'}", f"data.dir={tmp_path / 'tfds'}",
                     f"data.cache_dir={tmp_path / 'cache'}")
    err = result.stderr.strip()
    assert result.returncode == 3, result.stdout[-2000:] + err[-3000:]
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {bad} cannot be read") and "the prepared dataset is damaged" in err
    assert f"Copy {copy} again" in err and "tfds build mnist" in err


def _cache_entry(root):
    """The cache dir data.load uses for the shared MNIST under cache root ``root``."""
    return root / "data" / f"mnist-3.0.1-{data._fingerprint(MNIST, root)}"


@pytest.mark.parametrize("case", ["truncated-array", "garbled-array", "garbled-meta"])
def test_damaged_cache_is_decoded_again_and_says_so(case, mnist, tmp_path, monkeypatch):
    from tests.conftest import run_cli
    shutil.copytree(_cache_entry(data._cache_root(None)), _cache_entry(tmp_path))
    entry = _cache_entry(tmp_path)
    # The test split's files: only the damaged split is decoded again (10k images, not 70k).
    bad = entry / {"truncated-array": "test_images.npy", "garbled-array": "test_labels.npy",
                   "garbled-meta": "meta.json"}[case]
    raw = bytearray(bad.read_bytes())
    if case == "truncated-array":
        raw = raw[:len(raw) // 2]
    else:  # same size, a few bytes changed
        raw[len(raw) // 2:len(raw) // 2 + 4] = b"\xff\x00\xff\x00"
    bad.write_bytes(bytes(raw))
    result = run_cli(*RUN, f"workdir={tmp_path / 'run'}", f"data.cache_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    again = "(train, test)" if case == "garbled-meta" else "(test)"
    assert f"data cache: {bad} is damaged" in result.stdout, result.stdout[-2000:]
    assert f"decoding mnist {again} again from {MNIST}" in result.stdout

    def no_decoding(*args):
        raise AssertionError("decoded again instead of reading the rebuilt cache")
    monkeypatch.setattr(data, "_decode_split", no_decoding)
    healed = data.load("mnist", cache_dir=str(tmp_path))
    np.testing.assert_array_equal(healed.train_inputs, mnist.train_inputs)
    np.testing.assert_array_equal(healed.test_labels, mnist.test_labels)

"""The streaming input pipeline's host side: which pipeline a run takes, and records read and
decoded on the fly by Grain, each process only its own rows of every global batch.

``data.pipeline=auto`` takes the resident path (:mod:`jaxaccel.data`: decode once, cache, hold the
splits on every device) when the decoded splits fit ``data.device_budget_bytes``, else this one.
The sizes come from the prepared dir's ``dataset_info.json`` and ``features.json`` alone, so the
choice (and a resident run that cannot fit: exit 2) costs no decoding.

On this path nothing is decoded ahead: Grain maps each training step to this process's rows of
that step's global batch, reads them from the ``array_record`` files (``tfds.data_source``, no
TensorFlow) and decodes them in worker threads (or processes). The rows are those of the resident
path's order (``trainer.epoch_order(seed, epoch, n)``), so both paths train on the same batches bit
for bit, and the input position is a pure function of the step: a resumed run restarts the
stream at its checkpoint's step with nothing else saved, with any worker count.

No JAX here (Grain worker processes import this module; the order function's module, pickled by
reference, is imported there too). :mod:`jaxaccel.feed` turns the rows into global device arrays.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from jaxaccel import data as data_lib
from jaxaccel import text
from jaxaccel.config import Config, ConfigError
from jaxaccel.data import DataError

__all__ = ["DatasetSizes", "StreamDataset", "Records", "StepRows", "EvalRows", "read_sizes", "choose_pipeline",
           "open_dataset", "step_batches", "eval_batches"]

# Feature types TFDS names in features.json, and the bytes one decoded input takes per element.
_ITEMSIZE = {"uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "int32": 4, "float32": 4, "int64": 8, "float64": 8}


@dataclasses.dataclass(frozen=True)
class DatasetSizes:
    """What choosing a pipeline needs to know about a prepared dataset, read without decoding."""
    name: str
    version_dir: Path
    kind: str                    # "image", "text" or "audio"
    input_keys: tuple[str, ...]  # the feature(s) the inputs come from
    input_shape: tuple[int, ...]
    input_dtype: str
    num_classes: int
    num_train: int
    num_test: int

    @property
    def example_bytes(self) -> int:
        """One decoded example: its input plus an int32 label."""
        return int(np.prod(self.input_shape)) * _ITEMSIZE[self.input_dtype] + 4

    @property
    def resident_bytes(self) -> int:
        """What the resident path holds on every device: both decoded splits."""
        return (self.num_train + self.num_test) * self.example_bytes


def read_sizes(name: str, data_dir: str | None, decoding: data_lib.Decoding) -> DatasetSizes | None:
    """The sizes of prepared dataset ``name`` from its JSON files (exit 3 if it is not prepared);
    None under ``tfds.testing.mock_data``, which has no files."""
    root = data_lib.resolve_data_dir(data_dir)
    version_dir = data_lib._prepared_version_dir(name, root)
    if version_dir is None:
        return None
    data_lib._check_metadata(version_dir)  # a damaged file is named the same way on both pipelines
    try:
        info = json.loads((version_dir / "dataset_info.json").read_text())
        features = json.loads((version_dir / "features.json").read_text())["featuresDict"]["features"]
        splits = {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info["splits"]}
        num_classes = int(features["label"]["classLabel"]["numClasses"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{version_dir}: dataset_info.json or features.json cannot be read ({type(e).__name__}: {e}); "
                        f"prepare {name} again (tfds build {name} --data_dir {root} --file_format array_record)") from None
    types = {k: f.get("pythonClassName", "").rsplit(".", 1)[-1] for k, f in features.items() if k != "label"}
    kind, keys = _kind(types, name)
    if kind == "image":
        spec = features[keys[0]]["image"]
        shape = tuple(int(d) for d in spec["shape"]["dimensions"])
        if min(shape) < 1:
            raise ConfigError(f"{name}'s images have no fixed shape ({list(shape)}): jaxaccel trains on fixed-shape "
                              "images only (resize them when preparing the dataset)")
        dtype = spec.get("dtype", "uint8")
    else:
        shape, dtype = (decoding.length(kind),), ("int32" if kind == "text" else "int16")
    return DatasetSizes(name, version_dir, kind, tuple(keys), shape, dtype, num_classes,
                        splits.get("train", 0), splits.get("test", 0))


def _kind(types: dict[str, str], name: str) -> tuple[str, list[str]]:
    """As :func:`jaxaccel.data._kind`, from the type names in features.json."""
    for kind, type_name in (("image", "Image"), ("audio", "Audio")):
        keys = [k for k, t in types.items() if t == type_name]
        if keys:
            return kind, keys[:1]
    texts = sorted(k for k, t in types.items() if t == "Text")
    if texts:
        return "text", texts
    raise DataError(f"{name}: no image, audio or text feature among {sorted(types)}: jaxaccel cannot train on it")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def _refuse_unsupported(cfg: Any) -> None:
    """Combinations the stream path does not run yet, refused before anything is read."""
    if cfg.parallel.mode == "pmap":
        raise ConfigError("data.pipeline=stream with parallel.mode=pmap is not supported yet (its shard_map "
                          "step takes every batch whole on each device): use parallel.mode=jit, or "
                          "data.pipeline=resident")


def choose_pipeline(cfg: Config, sizes: DatasetSizes | None, budget: int, budget_from: str) -> dict[str, Any]:
    """The pipeline ``cfg`` runs with, and the sizes that decided it (recorded in config.json).

    ``budget`` (bytes per device) is ``data.device_budget_bytes`` or the backend's default, which
    ``budget_from`` describes. A resident dataset that cannot fit is refused here (exit 2),
    before anything is decoded."""
    requested = cfg.data.pipeline
    if sizes is None:  # tfds mock data: generated in memory, nothing to stream from
        if requested == "stream":
            raise ConfigError("data.pipeline=stream reads prepared array_record files; under tfds.testing.mock_data "
                              "use data.pipeline=resident")
        return {"pipeline": "resident", "requested": requested}
    need = sizes.resident_bytes
    record = {"requested": requested, "resident_bytes_per_device": need,
              "train_bytes": sizes.num_train * sizes.example_bytes, "test_bytes": sizes.num_test * sizes.example_bytes,
              "device_budget_bytes": budget, "budget_from": budget_from}
    if requested == "resident" and need > budget:
        raise ConfigError(
            f"data.pipeline=resident: {sizes.name} decoded takes {_gb(need)} on every device (train "
            f"{_gb(record['train_bytes'])} + test {_gb(record['test_bytes'])}), more than the device budget of "
            f"{_gb(budget)} ({budget_from}): use data.pipeline=stream (or auto), or raise data.device_budget_bytes")
    choice = requested if requested != "auto" else ("resident" if need <= budget else "stream")
    if choice == "stream":
        _refuse_unsupported(cfg)
    return {"pipeline": choice, **record}


# ---------------------------------------------------------------------------------------------
# Reading and decoding records.

class Records:
    """Random access to one split's examples, decoded exactly as the resident path decodes them
    (TFDS's own image decoder; text and audio through :mod:`jaxaccel.text` and :mod:`jaxaccel.audio`).

    Picklable (Grain worker processes get a copy): the TFDS source is opened on first use in each
    process. A record that cannot be read or decoded raises :class:`DataError` naming its file and
    its index in that file."""

    def __init__(self, sizes: DatasetSizes, split: str, data_dir: str | None, decoding: data_lib.Decoding):
        self.sizes, self.split, self.decoding = sizes, split, decoding
        self.data_dir = str(data_lib.resolve_data_dir(data_dir))
        self._source = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {**self.__dict__, "_source": None, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.sizes.num_train if self.split == "train" else self.sizes.num_test

    def open(self):
        with self._lock:
            if self._source is None:
                import tensorflow_datasets as tfds  # slow to import: only where records are read
                with data_lib._audio_without_tensorflow():
                    self._source = tfds.data_source(self.sizes.name, split=self.split, data_dir=self.data_dir,
                                                    download=False)
                    self._features = self._source.dataset_info.features
        return self._source

    def where(self, index: int) -> tuple[str, int]:
        """(file, record index in that file) of example ``index`` of the split."""
        records = self.open().data_source
        try:
            reader, position = records._reader_idx_and_position(int(index))
            return records._read_instructions[reader].filename, position
        except (AttributeError, IndexError, ValueError):  # array_record's internals moved: say less
            return f"{self.sizes.name}'s {self.split} split", int(index)

    def _damaged(self, index: int, error: BaseException) -> DataError:
        file, position = self.where(index)
        root = Path(self.data_dir)
        return DataError(
            f"{file}: record {position} (example {int(index)} of {self.sizes.name}'s {self.split} split) cannot be "
            f"read: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}. The prepared "
            f"files are damaged: prepare {self.sizes.name} again (tfds build {self.sizes.name} --data_dir {root} "
            f"--file_format array_record) or copy them again from a good source")

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, int32 labels) of the examples at ``indices``, in that order."""
        source = self.open()
        indices = [int(i) for i in indices]
        try:
            raw = source.data_source.__getitems__(indices)
        except Exception:  # noqa: BLE001 - find and name the record that fails
            raw = []
            for i in indices:
                try:
                    raw.append(source.data_source[i])
                except Exception as e:  # noqa: BLE001
                    raise self._damaged(i, e) from None
        examples = []
        for i, record in zip(indices, raw):
            try:
                examples.append(self._decode(record))
            except Exception as e:  # noqa: BLE001 - a record that parses but does not decode is damaged too
                raise self._damaged(i, e) from None
        return self._stack(examples)

    def _decode(self, record: bytes) -> dict[str, Any]:
        """One serialized tf.train.Example -> {key: value} for the input keys and the label. Images
        and text parse the proto directly (TFDS's generic NumPy parser costs ~10x more); anything
        else goes through TFDS's own deserialization."""
        from tensorflow_datasets.proto import tf_example_pb2
        features = self._features
        if self.sizes.kind == "audio":
            with data_lib._audio_without_tensorflow():
                return features.deserialize_example_np(record)
        proto = tf_example_pb2.Example.FromString(record).features.feature
        out = {"label": int(proto["label"].int64_list.value[0])}
        for key in self.sizes.input_keys:
            value = proto[key].bytes_list.value[0]
            out[key] = features[key].decode_example_np(value) if self.sizes.kind == "image" else value
        return out

    def _stack(self, examples: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        kind, keys = self.sizes.kind, self.sizes.input_keys
        if kind == "audio":
            from jaxaccel import audio  # imports JAX (its log-mel runs on device): only for audio
            inputs = audio.fix_length([e[keys[0]] for e in examples], self.decoding.length(kind))
        elif kind == "image":
            inputs = np.stack([e[keys[0]] for e in examples]).astype(np.uint8)
        else:
            joined = (" ".join(data_lib._as_str(e[k]) for k in keys) for e in examples)
            inputs = text.tokenize(joined, self.decoding.vocab_size, self.decoding.length(kind))
        return inputs, np.asarray([e["label"] for e in examples], np.int32)


@dataclasses.dataclass
class StepRows:
    """Grain's map function of training steps: step -> this process's rows of that step's global
    batch, read and decoded. The global batch of step s is examples ``order(seed, epoch)[pos*B:
    (pos+1)*B]`` (epoch, pos = divmod(s, steps_per_epoch)): the resident path's order."""
    records: Records
    order: Callable[[int, int, int], np.ndarray]   # trainer.epoch_order (picklable by reference)
    seed: int
    batch_size: int
    steps_per_epoch: int
    rows: np.ndarray                               # this process's rows of a global batch
    _perms: dict = dataclasses.field(default_factory=dict, repr=False)

    def indices(self, step: int) -> np.ndarray:
        """The examples this process reads for ``step``."""
        epoch, position = divmod(int(step), self.steps_per_epoch)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = self.order(self.seed, epoch, len(self.records))
            self._perms = {**{e: p for e, p in self._perms.items() if e == epoch - 1}, epoch: perm}
        return perm[position * self.batch_size + self.rows]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        _worker_fault(step)
        index = self.indices(step)
        inputs, labels = self.records.read(index)
        return {"inputs": inputs, "labels": labels, "index": index.astype(np.int64)}


@dataclasses.dataclass
class EvalRows:
    """Grain's map function of evaluation batches: batch i -> this process's rows of rows
    [i*B, (i+1)*B) of the split padded with weight-0 examples to whole batches."""
    records: Records
    batch_size: int
    rows: np.ndarray

    def __call__(self, batch: int) -> dict[str, np.ndarray]:
        index = batch * self.batch_size + self.rows
        real = index < len(self.records)
        inputs, labels = self.records.read(index[real])
        if not real.all():
            pad = int((~real).sum())
            inputs = np.concatenate([inputs, np.zeros((pad, *inputs.shape[1:]), inputs.dtype)]) if len(inputs) else \
                np.zeros((pad, *self.records.sizes.input_shape), self.records.sizes.input_dtype)
            labels = np.concatenate([labels, np.zeros(pad, np.int32)])
        return {"inputs": inputs, "labels": labels, "weights": real.astype(np.float32)}


def _worker_fault(step: int) -> None:
    """Test hook: ``JAXACCEL_FAULT=worker@N`` SIGKILLs the Grain worker process that reads step N
    (never the training process itself), as the OOM killer would."""
    if os.environ.get("JAXACCEL_FAULT") == f"worker@{step}":
        import multiprocessing
        if multiprocessing.parent_process() is not None:
            import signal
            os.kill(os.getpid(), signal.SIGKILL)


def _die_with_parent(worker_index: int, worker_count: int) -> None:
    """In each Grain worker process: be killed when the training process dies (Linux), so a
    SIGKILLed run leaves no workers behind (they outlived it, blocked on their queues)."""
    import ctypes
    import signal
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before the line above ran
        os._exit(1)


def _grain():
    import grain
    from absl import flags
    # Grain reads absl flags (its worker-profiling switch) and raises if they were never parsed; a
    # library cannot parse the command line, so their defaults stand.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain


def default_workers(workers: int | None) -> int:
    return workers or min(os.cpu_count() or 1, 16)


def step_batches(rows: StepRows, first_step: int, total_steps: int, workers: int | None, processes: int,
                 buffer: int) -> Iterator[dict[str, np.ndarray]]:
    """Grain's iterator over steps ``first_step..total_steps-1`` of ``rows``, in order: ``workers``
    decoding threads (in each of ``processes`` worker processes when > 0), ``buffer`` steps read
    ahead. Each element is a pure function of its step, so neither count changes what comes out."""
    grain = _grain()
    dataset = grain.MapDataset.range(first_step, total_steps).map(rows)
    stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=default_workers(workers),
                                                       prefetch_buffer_size=max(buffer, 1)))
    if processes:
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=processes,
                                                                 per_worker_buffer_size=max(buffer // processes, 1)),
                                    worker_init_fn=_die_with_parent)
    return iter(stream)


def eval_batches(rows: EvalRows, workers: int | None) -> Iterator[dict[str, np.ndarray]]:
    """Grain's iterator over the evaluation batches of ``rows`` (threads of this process)."""
    grain = _grain()
    num_batches = -(-len(rows.records) // rows.batch_size)
    dataset = grain.MapDataset.range(num_batches).map(rows)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=default_workers(workers),
                                                          prefetch_buffer_size=4)))


# ---------------------------------------------------------------------------------------------
# The dataset as the rest of the run sees it.

class _SplitView:
    """A split's inputs or labels, decoded on demand a slice at a time (what the compression
    report reads in batches at the end of a run); the last slice read is kept for the other view."""

    def __init__(self, records: Records, part: int, cache: dict):
        self.records, self.part, self.cache = records, part, cache

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self.records))
        if self.cache.get("key") != (start, stop, step):
            self.cache.update(key=(start, stop, step), value=self._read(np.arange(start, stop, step)))
        return self.cache["value"][self.part]

    def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decoded in threads (Pillow and zlib release the GIL)."""
        import concurrent.futures
        chunks = np.array_split(indices, max(1, min(default_workers(None), len(indices) // 64)))
        with concurrent.futures.ThreadPoolExecutor(len(chunks)) as pool:
            parts = list(pool.map(self.records.read, chunks))
        return tuple(np.concatenate([part[i] for part in parts]) for i in range(2))


@dataclasses.dataclass(frozen=True)
class StreamDataset:
    """A dataset on the streaming path: what :class:`jaxaccel.data.Dataset` tells about its shape,
    and readers instead of decoded arrays."""
    name: str
    sizes: DatasetSizes
    train: Records
    test: Records
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.sizes.input_shape)

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self.sizes.input_dtype)

    @property
    def num_train(self) -> int:
        return self.sizes.num_train

    @property
    def test_inputs(self) -> _SplitView:
        return _SplitView(self.test, 0, self._test_cache)

    @property
    def test_labels(self) -> _SplitView:
        return _SplitView(self.test, 1, self._test_cache)

    @property
    def _test_cache(self) -> dict:
        cache = self.__dict__.get("_cache")
        if cache is None:
            object.__setattr__(self, "_cache", cache := {})
        return cache


def open_dataset(cfg: Config, sizes: DatasetSizes) -> StreamDataset:
    """The streaming view of the prepared dataset ``sizes`` describes (nothing is read yet)."""
    decoding = data_lib.Decoding(getattr(cfg.model, "vocab_size", data_lib.Decoding.vocab_size), cfg.data.max_length)
    return StreamDataset(sizes.name, sizes, Records(sizes, "train", cfg.data.dir, decoding),
                         Records(sizes, "test", cfg.data.dir, decoding), sizes.num_classes)

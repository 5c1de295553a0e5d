"""The streaming input pipeline (data.pipeline=stream): the resident path's batches bit for bit,
exact resume after SIGTERM/SIGKILL with another worker count, several processes each reading
only its share, the choice of pipeline against the device budget, and bad data."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel import export, prepare
from tests.conftest import SHARED, run_cli


def _train(workdir, *overrides, exp="mnist_mlp"):
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get(exp), [f"workdir={workdir}", *overrides])
    return jaxaccel.train(cfg)


def _metrics(workdir):
    """metrics.jsonl without the training seconds (on the test lines), which no two runs share."""
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in l.items() if k != "train_seconds"} for l in lines]


def _assert_same_run(workdir, reference):
    assert _metrics(workdir) == _metrics(reference)
    for a, b in zip(jax.tree.leaves(export.load(workdir).params), jax.tree.leaves(export.load(reference).params)):
        np.testing.assert_array_equal(a, b)


def _pipeline(workdir) -> dict:
    return json.loads((workdir / "config.json").read_text())["data"]


# ---------------------------------------------------------------------------------------------
# The same batches as the resident path.

@pytest.mark.parametrize("exp,overrides", [
    ("mnist_mlp", ["model.features=[64]", "train.steps=120", "train.log_every_steps=20", "checkpoint.every_steps=50"]),
    # Unrolled blocks of 10 and single steps: each compiled call gets exactly its stacked batches.
    ("mnist_mlp", ["model.features=[32]", "train.steps=45", "train.log_every_steps=20", "train.loop=unroll",
                   "train.steps_per_call=10"]),
    ("mnist_cnn", ["train.steps=12", "train.log_every_steps=4", "train.eval_batch_size=2000"]),
], ids=["mlp", "mlp-unrolled", "cnn"])
def test_stream_trains_bitwise_like_resident(tmp_path, exp, overrides):
    for pipeline in ("resident", "stream"):
        _train(tmp_path / pipeline, f"data.pipeline={pipeline}", *overrides, exp=exp)
        assert _pipeline(tmp_path / pipeline)["pipeline"] == pipeline
    _assert_same_run(tmp_path / "stream", tmp_path / "resident")


def test_stream_with_explicit_collectives_is_refused_clearly(tmp_path):
    """parallel.mode=pmap (shard_map, every batch whole on each device) does not stream yet: exit 2
    at once naming the alternatives, never a traceback."""
    result = run_cli("exp=mnist_mlp", "train.steps=30", "parallel.mode=pmap", "data.pipeline=stream",
                     f"workdir={tmp_path}", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data.pipeline=stream with parallel.mode=pmap is not supported yet" in result.stderr


# ---------------------------------------------------------------------------------------------
# Exact resume: the input position is the step.

RESUME = ["exp=mnist_mlp", "model.features=[64]", "train.steps=400", "checkpoint.every_steps=100",
          "train.log_every_steps=50"]


@pytest.fixture(scope="module")
def resident_reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("resident")
    result = run_cli(*RESUME, "data.pipeline=resident", f"workdir={workdir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir


def _wait_for_step(workdir, step, proc, timeout=300):
    deadline = time.monotonic() + timeout
    path = workdir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}: {proc.stderr.read()[-2000:]}")
        if path.exists() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines() if l.strip()):
            return
        time.sleep(0.02)
    pytest.fail("timed out waiting for training")


def _children(pid: int) -> set[int]:
    """Process ids of ``pid``'s children (Linux /proc)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:  # a thread that ended meanwhile
            pass
    return found


@pytest.mark.parametrize("sig,first,resumed", [
    (signal.SIGTERM, ["data.workers=2"], ["data.worker_processes=1", "data.workers=1"]),
    (signal.SIGKILL, ["data.worker_processes=2", "data.workers=1"], ["data.workers=1"]),
], ids=["sigterm-threads-then-a-worker-process", "sigkill-worker-processes-then-one-thread"])
def test_interrupted_stream_resumes_bitwise(tmp_path, resident_reference, sig, first, resumed):
    """Killed (or preempted) while streaming, resumed with another worker count (threads or
    Grain worker processes): the run ends bit for bit like an uninterrupted resident run. A
    SIGKILLed run leaves no worker processes behind."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "jaxaccel.run", *RESUME, "data.pipeline=stream", *first,
                             f"workdir={workdir}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(workdir, 150, proc)
    children = _children(proc.pid) if sig == signal.SIGKILL else set()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 0 and "SIGTERM: checkpointed step" in out, err[-2000:]
    else:
        assert proc.returncode == -signal.SIGKILL and len(children) >= 2  # the workers (and the shm tracker)
        deadline = time.monotonic() + 20
        while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(Path(f"/proc/{c}").exists() for c in children), "worker processes outlived the run"
    result = run_cli(*RESUME, "data.pipeline=stream", *resumed, f"workdir={workdir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from checkpoint step" in result.stdout
    _assert_same_run(workdir, resident_reference)


# ---------------------------------------------------------------------------------------------
# Several processes: each reads only its rows.

def test_two_processes_stream_their_shares_like_one_process(tmp_path):
    """2 processes x 2 devices streaming == 1 process x 4 devices resident, and each process
    read exactly its half of every batch (steps x batch / 2 examples)."""
    args = ["exp=mnist_mlp", "model.features=[64]", "train.steps=60", "train.log_every_steps=10",
            "train.batch_size=128"]
    one = tmp_path / "one"
    result = run_cli(*args, "data.pipeline=resident", f"workdir={one}",
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert result.returncode == 0, result.stderr[-2000:]
    two = tmp_path / "two"
    result = subprocess.run([sys.executable, "-m", "jaxaccel.launch", "-n", "2", "--devices-per-process", "2", *args,
                             "data.pipeline=stream", f"workdir={two}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    config = json.loads((two / "config.json").read_text())
    assert config["process_count"] == 2 and config["device_count"] == 4 and config["data"]["pipeline"] == "stream"
    reads = sorted(line for line in result.stdout.splitlines() if "training examples" in line)
    assert reads == [f"[{i}] data: process {i} of 2 read {60 * 128 // 2} training examples (stream pipeline)"
                     for i in range(2)]
    losses = lambda w: [l["loss"] for l in _metrics(w) if "split" not in l]  # noqa: E731
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(export.load(two).params), jax.tree.leaves(export.load(one).params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_each_process_reads_its_own_rows():
    """The rows Grain reads for a step on each of 2 processes are disjoint halves of that step's
    global batch, in the resident path's order."""
    from jaxaccel import streaming
    from jaxaccel.trainer import epoch_order

    class Reader:
        def __len__(self):
            return 1000

    rows = [streaming.StepRows(Reader(), epoch_order, 3, 8, 125, np.arange(i * 4, i * 4 + 4)) for i in range(2)]
    for step in (0, 124, 125, 300):
        perm = epoch_order(3, step // 125, 1000)
        got = np.concatenate([r.indices(step) for r in rows])
        np.testing.assert_array_equal(got, perm[(step % 125) * 8:(step % 125) * 8 + 8])


# ---------------------------------------------------------------------------------------------
# The choice against the budget, on a synthetic image dataset larger than it.

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """64x64x3 PNGs in TFDS's array_record form, written here (the benchmark writes > 1 GB)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    prepare.synthetic_images(data_dir, num_train=256, num_test=64)
    return data_dir


SYNTH = ["data.name=synthetic_images", "model.features=[32]", "train.batch_size=32",
         "train.steps=16", "train.log_every_steps=8", "train.eval_batch_size=32"]


def test_auto_streams_a_dataset_over_the_budget(tmp_path, synthetic):
    summary = _train(tmp_path, *SYNTH, f"data.dir={synthetic}", "data.device_budget_bytes=1000000")
    data = _pipeline(tmp_path)
    assert data["pipeline"] == "stream" and data["requested"] == "auto"
    assert data["resident_bytes_per_device"] == (256 + 64) * (64 * 64 * 3 + 4) > data["device_budget_bytes"] == 10**6
    assert data["budget_from"] == "data.device_budget_bytes" and summary["steps"] == 16
    # Within the budget the same dataset stays resident, and trains the same.
    _train(tmp_path / "resident", *SYNTH, f"data.dir={synthetic}", "data.device_budget_bytes=10000000")
    assert _pipeline(tmp_path / "resident")["pipeline"] == "resident"
    _assert_same_run(tmp_path, tmp_path / "resident")


def test_resident_over_the_budget_is_refused_before_decoding(tmp_path, synthetic):
    result = run_cli("exp=mnist_mlp", *SYNTH, f"data.dir={synthetic}", "data.pipeline=resident", "data.device_budget_bytes=1000000",
                     f"workdir={tmp_path}", "data.cache_dir=" + str(tmp_path / "cache"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "error: data.pipeline=resident" in result.stderr
    assert "3.93 MB on every device" in result.stderr and "use data.pipeline=stream" in result.stderr
    assert not (tmp_path / "cache").exists()  # nothing decoded


def test_text_streams_like_resident(tmp_path):
    """Text (two Text features joined and tokenized as the resident cache does) on both paths."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.proto import tf_example_pb2

    rng = np.random.default_rng(0)
    words = ["market", "shares", "goal", "match", "chip", "cloud", "vote", "senate", "rain", "storm"]

    def record(i):
        label = int(rng.integers(4))
        example = tf_example_pb2.Example()
        for key, n in (("title", 4), ("description", 30)):
            text = " ".join(words[(label * 2 + int(rng.integers(3))) % 10] for _ in range(n))
            example.features.feature[key].bytes_list.value.append(f"{text} #{i}".encode())
        example.features.feature["label"].int64_list.value.append(label)
        return example.SerializeToString()

    features = tfds.features.FeaturesDict({"title": tfds.features.Text(), "description": tfds.features.Text(),
                                           "label": tfds.features.ClassLabel(num_classes=4)})
    prepare.write_dataset(tmp_path / "tfds", "tiny_news", "1.0.0", features,
                          {"train": [record(i) for i in range(256)], "test": [record(i) for i in range(64)]})
    args = ["data.name=tiny_news", f"data.dir={tmp_path / 'tfds'}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=24", "model.width=8", "model.depth=1", "model.vocab_size=64", "train.batch_size=32",
            "train.steps=12", "train.log_every_steps=4", "train.eval_batch_size=32"]
    for pipeline in ("resident", "stream"):
        _train(tmp_path / pipeline, *args, f"data.pipeline={pipeline}", exp="ag_news_text")
    _assert_same_run(tmp_path / "stream", tmp_path / "resident")


# ---------------------------------------------------------------------------------------------
# Bad data.

def _copy_mnist(tmp_path):
    src = SHARED / "tfds" / "mnist" / "3.0.1"
    dst = tmp_path / "tfds" / "mnist" / "3.0.1"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_corrupt_record_names_its_file_and_index(tmp_path):
    version_dir = _copy_mnist(tmp_path)
    train = version_dir / "mnist-train.array_record-00000-of-00001"
    data = bytearray(train.read_bytes())
    middle = len(data) // 2
    data[middle:middle + (1 << 20)] = bytes(1 << 20)  # ~2,500 records' bytes zeroed
    train.write_bytes(bytes(data))
    result = run_cli("exp=mnist_mlp", "model.features=[16]", "train.steps=50", "data.pipeline=stream",
                     f"data.dir={tmp_path / 'tfds'}", f"workdir={tmp_path / 'run'}")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    assert f"{train}: record " in result.stderr and "tfds build mnist" in result.stderr


def test_an_undecodable_image_names_its_file_and_index(tmp_path):
    features = prepare._image_features((8, 8, 3), 2)
    good = prepare.example_record(prepare.encode_png(np.zeros((8, 8, 3), np.uint8)), 1)
    records = [good] * 64
    records[37] = prepare.example_record(b"\x89PNG not really", 0)
    version_dir = prepare.write_dataset(tmp_path, "tiny", "1.0.0", features, {"train": records, "test": [good] * 8})
    result = run_cli("exp=mnist_mlp", "data.name=tiny", f"data.dir={tmp_path}", "data.pipeline=stream",
                     "model.features=[8]", "train.batch_size=16", "train.steps=8", "train.eval_batch_size=8",
                     f"workdir={tmp_path / 'run'}")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"{version_dir}/tiny-train.array_record-00000-of-00001: record 37 " in result.stderr


def test_a_dataset_prepared_as_tfrecord_names_the_conversion(tmp_path):
    version_dir = tmp_path / "mnist" / "3.0.1"
    version_dir.mkdir(parents=True)
    for name in ("dataset_info.json", "features.json"):
        (version_dir / name).write_text((SHARED / "tfds" / "mnist" / "3.0.1" / name).read_text())
    (version_dir / "mnist-train.tfrecord-00000-of-00001").write_bytes(b"")
    result = run_cli("exp=mnist_mlp", "data.pipeline=stream", f"data.dir={tmp_path}", f"workdir={tmp_path / 'run'}")
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert "--file_format array_record" in result.stderr and "tfds build mnist" in result.stderr


def test_a_dead_worker_process_is_one_line_not_a_hang(tmp_path):
    start = time.monotonic()
    result = run_cli("exp=mnist_mlp", "model.features=[16]", "train.steps=100", "train.log_every_steps=10",
                     "data.pipeline=stream", "data.worker_processes=1", "data.workers=1",
                     f"workdir={tmp_path}", env={"JAXACCEL_FAULT": "worker@30"}, timeout=240)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "data worker process died" in result.stderr and "run the same command again" in result.stderr
    assert time.monotonic() - start < 200

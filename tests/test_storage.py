"""URL workdirs (``gs://bucket/run``) without a network: fsspec's in-memory file system stands in
for GCS behind etils.epath's real fsspec backend, and orbax is asked what directory it was given.

orbax's array writes go through TensorStore's own GCS driver, which no fake here reaches: the
training runs hand orbax the URL (asserted) and keep the checkpoints themselves in a local
directory, so that resuming works; everything else a run writes lands on the stand-in."""
from __future__ import annotations

import importlib.util
import json

import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.utils import stringify_path

import jaxaccel
from conftest import TINY, run_cli
from jaxaccel import checkpoint, export, finetune, report, storage
from jaxaccel import workdir as workdir_lib
from jaxaccel.metrics import MetricsWriter, Progress
from jaxaccel.plan import Plan
from test_metrics import _assert_same, _jsonl, _scalars

URL = "gs://bucket/run"


class FakeGCS(MemoryFileSystem):
    """fsspec's memory file system under gs:// names, as gcsfs names them: ``bucket/key``."""
    protocol = ("gs", "gcs")
    root_marker = ""

    @classmethod
    def _strip_protocol(cls, path):
        return stringify_path(path).removeprefix("gs://").removeprefix("gcs://").rstrip("/")

    def contents(self) -> dict[str, bytes]:
        return {name: bytes(f.getbuffer()) for name, f in self.store.items()}


@pytest.fixture
def gcs(monkeypatch) -> FakeGCS:
    """A fresh in-memory bucket store that every ``gs://`` epath reaches (fsspec backend, as
    without TensorFlow). google-cloud-storage, which orbax asks about the bucket, is not needed:
    the tests below keep orbax away from the store or answer its question."""
    fs = FakeGCS(global_store=False, skip_instance_cache=True)
    monkeypatch.setenv("EPATH_USE_TF", "false")
    monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: fs)
    monkeypatch.setattr(storage, "ORBAX_PACKAGES", {})
    return fs


@pytest.fixture
def orbax_dirs(monkeypatch, tmp_path) -> list:
    """Every directory handed to orbax's CheckpointManager; a URL's checkpoints are kept in a
    local directory of the same name instead (TensorStore's GCS driver would need the network)."""
    received, real = [], checkpoint._Manager

    def manager(directory, **kwargs):
        received.append(directory)
        local = tmp_path / "orbax" / str(directory).replace("://", "/") if storage.is_url(directory) else directory
        return real(local, **kwargs)

    monkeypatch.setattr(checkpoint, "_Manager", manager)
    return received


def test_local_paths_stay_pathlib_and_urls_stay_as_given(tmp_path):
    import pathlib
    assert type(storage.path(tmp_path / "run")) is type(tmp_path) and storage.path("runs/a") == pathlib.Path("runs/a")
    url = storage.path("gs://bucket/run/")
    assert str(url) == URL and str(url / "checkpoints") == URL + "/checkpoints" and storage.is_url(url)
    assert not storage.is_url(pathlib.Path("gs://bucket"))  # pathlib folds the // away: URLs stay strings
    with pytest.raises(storage.UnsupportedURL, match=r"^ftp://x/y: ftp:// is not a URL scheme"):
        storage.path("ftp://x/y")


def test_appends_rewrite_the_object_and_equal_a_local_append(gcs, tmp_path):
    for location in (storage.path(URL + "/log.txt"), tmp_path / "log.txt"):
        with storage.open_append(location) as f:
            f.write("one\n")
            f.flush()
        with storage.open_append(location) as f:  # opened again: appends after what is there
            f.write("two\n")
            f.write("three\n")
    assert gcs.contents()["bucket/run/log.txt"] == (tmp_path / "log.txt").read_bytes() == b"one\ntwo\nthree\n"
    events = storage.open_append(storage.path(URL + "/events"), binary=True)
    events.write(b"\x00\x01")
    assert "bucket/run/events" not in gcs.contents()  # nothing uploaded before a flush
    events.flush()
    assert gcs.contents()["bucket/run/events"] == b"\x00\x01"
    assert not hasattr(events, "fileno")  # tensorboardX fsyncs whatever has one
    events.close()


def test_npz_round_trip_through_the_store(gcs, tmp_path):
    arrays = {"a": np.arange(12, dtype=np.int8).reshape(3, 4), "b/c": np.float32([0.5, -1e-30])}
    storage.write_npz(storage.path(URL + "/x.npz"), arrays)
    storage.write_npz(tmp_path / "x.npz", arrays)
    assert gcs.contents()["bucket/run/x.npz"] == (tmp_path / "x.npz").read_bytes()
    back = storage.read_npz(storage.path(URL + "/x.npz"))
    assert back.keys() == arrays.keys() and all(np.array_equal(back[k], arrays[k]) for k in arrays)
    assert not list(tmp_path.glob("*.tmp.npz"))


def test_metrics_of_a_resume_are_cut_to_the_checkpoint_alike_on_both(gcs, tmp_path):
    lines = [{"step": s, "loss": 1.0 / s} for s in (10, 20, 30)] + [{"step": 20, "split": "test", "accuracy": 0.5}]
    written = {}
    for name, location in (("url", storage.path(URL + "/metrics.jsonl")), ("local", tmp_path / "metrics.jsonl")):
        writer = MetricsWriter(location)
        for line in lines:
            writer.write(line)
        writer.close()
        resumed = MetricsWriter(location, resume_step=20)
        resumed.write({"step": 20, "loss": 9.0})  # already kept: not written twice
        resumed.write({"step": 30, "loss": 0.25})
        resumed.close()
        written[name] = location.read_text()
    assert written["url"] == written["local"]
    assert [json.loads(l) for l in written["url"].splitlines()] == [
        lines[0], lines[1], lines[3], {"step": 30, "loss": 0.25}]


def test_staged_uploads_what_was_written_locally(gcs, tmp_path):
    with storage.staged(storage.path(URL + "/run.log")) as local, local.open("w") as f:
        f.write("line\n")
    assert gcs.contents()["bucket/run/run.log"] == b"line\n"
    with storage.staged(tmp_path / "run.log") as local:
        assert local == tmp_path / "run.log"


def test_a_url_workdir_is_not_held_and_the_run_says_so(gcs, capsys):
    with workdir_lib.held(URL, 0) as workdir:
        assert str(workdir) == URL
    assert gcs.contents() == {}  # no lock object
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"warning: workdir={URL} is a URL") and "not detected" in out
    with workdir_lib.held(URL, 1):
        pass
    assert capsys.readouterr().out == ""  # said once, by process 0


def test_a_missing_store_package_is_one_line(monkeypatch, gcs):
    monkeypatch.setattr(storage, "ORBAX_PACKAGES", {"gs": ("google.cloud.no_such_module", "no-such-package")})
    with pytest.raises(storage.StorageUnavailable, match=r"^gs://bucket/run: orbax needs no-such-package .*"
                                                         r"pip install no-such-package$"):
        with workdir_lib.held(URL):
            pass

    def missing(path):
        raise ImportError("Please install gcsfs to access Google Storage")
    monkeypatch.setattr(epath_backend.fsspec_backend, "fs", missing)
    with pytest.raises(storage.StorageUnavailable, match=r"^gs://bucket/run: Please install gcsfs") as e:
        with workdir_lib.held(URL):
            pass
    assert "\n" not in str(e.value)


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")),
                    reason="a GCS backend is installed: the run would reach for the network")
@pytest.mark.parametrize("workdir, status, words", [
    (URL, 3, "gcsfs"), ("ftp://host/run", 2, "ftp:// is not a URL scheme")])
def test_cli_url_workdir_that_cannot_be_reached_exits_at_once(workdir, status, words):
    out = run_cli("exp=mnist_mlp", f"workdir={workdir}", timeout=300)
    assert out.returncode == status, out.stderr[-2000:]
    error = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(error) == 1 and words in error[0] and "Traceback" not in out.stderr


def test_orbax_sees_commits_on_the_store_by_its_gcs_protocol(gcs, monkeypatch):
    """The real CheckpointManager on the stand-in: a step counts once its commit_success.txt is
    there (orbax's protocol for gs://, where a directory cannot be renamed atomically)."""
    from orbax.checkpoint._src.path import gcs_utils
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)  # a flat bucket
    directory = storage.path(URL + "/checkpoints")
    (directory / "5").mkdir(parents=True)
    (directory / "5" / "commit_success.txt").write_text("done")
    (directory / "7").mkdir()
    (directory / "7" / "meta").write_text("{}")  # being written: no commit file yet
    ckpt = checkpoint.Checkpointer(URL + "/checkpoints", 2)
    try:
        assert ckpt.committed_steps() == [5] and ckpt.latest_step() == 5
        assert str(ckpt.manager.directory) == URL + "/checkpoints"
    finally:
        ckpt.manager.close()


def _cfg(workdir, *overrides):
    return jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"), [
        f"workdir={workdir}", *TINY, "train.steps=40", "checkpoint.every_steps=20", "train.tensorboard=true",
        *overrides])


def test_run_into_a_url_writes_there_resumes_there_and_matches_a_local_run(gcs, orbax_dirs, tmp_path, monkeypatch,
                                                                          capfd):
    """A run stopped at its step-20 checkpoint and started again, into gs://bucket/run: every file
    is on the store, orbax was handed the URL, and the results equal a local uninterrupted run's."""
    class Stop(Exception):
        pass

    original = Plan.next_boundary

    def boundary(self, step):  # killed right after the step-20 checkpoint
        if step >= 20:
            raise Stop()
        return original(self, step)

    with monkeypatch.context() as m:
        m.setattr(Plan, "next_boundary", boundary)
        with pytest.raises(Stop):
            jaxaccel.train(_cfg(URL))
    stopped = [json.loads(l) for l in storage.path(URL + "/metrics.jsonl").read_text().splitlines()]
    assert stopped[-1]["step"] == 20
    messages = []  # the run's progress lines (its stream is bound when jaxaccel.metrics is imported)
    monkeypatch.setattr(Progress, "message", lambda self, text: messages.append(text))
    summary = jaxaccel.train(_cfg(URL))
    assert f"warning: workdir={URL} is a URL" in capfd.readouterr().out
    assert f"resuming from checkpoint step 20 in {URL}/checkpoints" in messages
    assert orbax_dirs == [URL + "/checkpoints"] * 2  # the text given, not a local path made of it

    files = gcs.contents()
    for name in ("config.json", "metrics.jsonl", "summary.json", "export/model.json", "export/params.npz",
                 "export/compressed.npz"):
        assert f"bucket/run/{name}" in files, sorted(files)
    assert json.loads(files["bucket/run/summary.json"]) == summary and summary["steps"] == 40
    assert json.loads(files["bucket/run/config.json"])["config"]["workdir"] == URL

    local = tmp_path / "local"
    jaxaccel.train(_cfg(local))
    ours, theirs = (_jsonl(storage.path(URL)), _jsonl(local))
    assert ours["train/loss"] == theirs["train/loss"] and ours["test/accuracy"] == theirs["test/accuracy"]
    for a, b in zip(jax.tree.leaves(export.load(URL).params), jax.tree.leaves(export.load(local).params)):
        np.testing.assert_array_equal(a, b)
    # init.from reads the run from the URL (its export).
    for a, b in zip(jax.tree.leaves(finetune._source_variables(URL)[0]), jax.tree.leaves(export.load(local).params)):
        np.testing.assert_array_equal(a, b)
    # TensorBoard's events went through the same layer; shown as TensorBoard would, each step once.
    assert len([n for n in files if n.startswith("bucket/run/events.out.tfevents.")]) == 2
    _assert_same(_scalars(storage.path(URL), purge=True), ours)

    # Finished: started again, every file is left as it was.
    jaxaccel.train(_cfg(URL))
    assert gcs.contents() == files
    # The report reads runs under a URL.
    runs = report.find_runs(["gs://bucket"])
    assert [str(r) for r in runs] == [URL]
    assert report.load_run(runs[0]).summary == summary


def test_report_labels_runs_under_urls_like_local_ones(tmp_path):
    urls = [storage.path("gs://bucket/sweep/a=1"), storage.path("gs://bucket/sweep/nested/a=2")]
    local = [tmp_path / "sweep" / "a=1", tmp_path / "sweep" / "nested" / "a=2"]
    assert report._labels(urls) == report._labels(local) == ["a=1", "nested/a=2"]

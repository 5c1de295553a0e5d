"""First-run preparation without TensorFlow: an absent MNIST is downloaded (from a local HTTP
server serving ../shared/data, never the internet) and prepared as array_record, example for
example what TFDS prepares; offline it stays a fast exit 3, and a bad download leaves nothing."""
from __future__ import annotations

import functools
import http.server
import threading
import time

import numpy as np
import pytest

from jaxaccel import data, prepare
from tests.conftest import SHARED, run_cli

RUN = ["exp=mnist_mlp", "model.features=[16]", "train.steps=10", "train.log_every_steps=5"]


class _Server:
    """``../shared/data`` over HTTP on 127.0.0.1; ``truncate`` serves that file cut in half."""

    def __init__(self, truncate: str | None = None):
        handler = functools.partial(_Handler, directory=str(SHARED / "data"), truncate=truncate)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, truncate=None, **kwargs):
        self.truncate = truncate
        super().__init__(*args, **kwargs)

    def copyfile(self, source, outputfile):
        if self.truncate and self.path.endswith(self.truncate):
            outputfile.write(source.read()[: 1000])
            return
        super().copyfile(source, outputfile)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_an_absent_mnist_is_prepared_like_tfds(tmp_path, server, mnist):
    result = run_cli(*RUN, f"data.dir={tmp_path / 'tfds'}", f"workdir={tmp_path / 'run'}",
                     env={prepare.MIRROR_ENV: server.url})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prepared mnist: 70,000 examples" in result.stdout
    assert sorted(p.name for p in (tmp_path / "tfds" / "mnist").iterdir()) == ["3.0.1"]  # no leftovers
    # Every example, in TFDS's record order, decodes to what the shared TFDS dir holds.
    ours = data.load("mnist", str(tmp_path / "tfds"), str(tmp_path / "cache"))
    for field in ("train_inputs", "train_labels", "test_inputs", "test_labels"):
        np.testing.assert_array_equal(getattr(ours, field), getattr(mnist, field))


def test_offline_stays_a_fast_exit_3(tmp_path):
    start = time.monotonic()
    result = run_cli(*RUN, f"data.dir={tmp_path}", f"workdir={tmp_path / 'run'}",
                     env={prepare.MIRROR_ENV: "http://127.0.0.1:9"})  # nothing listens: refused, as offline
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert "dataset 'mnist' is not prepared in" in result.stderr and "127.0.0.1 cannot be reached" in result.stderr
    assert "network access" in result.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "mnist").exists()


def test_a_bad_download_leaves_nothing_half_prepared(tmp_path):
    bad = _Server(truncate="train-images-idx3-ubyte.gz")
    try:
        result = run_cli(*RUN, f"data.dir={tmp_path}", f"workdir={tmp_path / 'run'}",
                         env={prepare.MIRROR_ENV: bad.url})
    finally:
        bad.close()
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert "train-images-idx3-ubyte.gz" in result.stderr and "MD5" in result.stderr
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file() or "incomplete" in p.name]
    assert leftovers == [] and not (tmp_path / "mnist" / "3.0.1").exists()

"""The workdir: one run at a time (an OS lock that dies with its process), and a workdir that
cannot be one is exit 2 with one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxaccel import workdir as workdir_lib
from tests.conftest import run_cli

ARGS = ["exp=mnist_mlp", "model.features=[32]", "train.steps=200", "checkpoint.every_steps=100",
        "train.log_every_steps=50"]


def _wait_for_lock(workdir, proc, timeout=120):
    path = workdir_lib.lock_path(workdir, 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if path.exists() and path.read_text():
            return json.loads(path.read_text())
        time.sleep(0.05)
    pytest.fail("the first run never took the workdir")


def test_second_run_in_a_held_workdir_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "jaxaccel.run", *ARGS, "train.steps=100000",
                              f"workdir={tmp_path}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder = _wait_for_lock(tmp_path, first)
        assert holder["pid"] == first.pid
        start = time.monotonic()
        second = run_cli(*ARGS, f"workdir={tmp_path}")
        assert second.returncode == 2, second.stderr[-2000:]
        assert time.monotonic() - start < 15
        err = second.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"is in use by pid {first.pid} on " in err and "jaxaccel.run exp=mnist_mlp" in err
        first.send_signal(signal.SIGKILL)  # leaves its lock file behind, but not its lock
        first.communicate(timeout=30)
    finally:
        first.kill()
    assert workdir_lib.lock_path(tmp_path, 0).exists()
    result = run_cli(*ARGS, f"workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not workdir_lib.lock_path(tmp_path, 0).exists()  # released at the end


def _read_only_dir(tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: use a location no one can write
        return "/sys/jaxaccel-run"
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(0o555)
    return str(path / "run")


@pytest.mark.parametrize("case", ["file", "under-file", "read-only"])
def test_workdir_that_cannot_be_one_exits_2(case, tmp_path):
    (tmp_path / "afile").write_text("x")
    workdir, needle = {
        "file": (tmp_path / "afile", "is a file, not a directory"),
        "under-file": (tmp_path / "afile" / "run", f"cannot be created ({tmp_path / 'afile'} is a file)"),
        "read-only": (_read_only_dir(tmp_path), "cannot be created"),
    }[case]
    start = time.monotonic()
    result = run_cli(*ARGS, f"workdir={workdir}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: workdir={workdir} ")
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 15


def test_lock_is_per_process_index_and_released(tmp_path):
    with workdir_lib.held(tmp_path, 0):
        with workdir_lib.held(tmp_path, 1):  # another process of the same run
            pass
        with pytest.raises(workdir_lib.WorkdirBusy, match=f"pid {os.getpid()}"):
            with workdir_lib.held(tmp_path, 0):
                pass
    with workdir_lib.held(tmp_path, 0):  # released: taken again
        pass

"""The multi-process runtime's start: impossible distributed.* settings are exit 2 at once, and a
process started in a cluster job joins its peers (or is refused), never trains alone."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jaxaccel.runtime import detected_cluster
from tests.conftest import run_cli

ARGS = ["exp=mnist_mlp", "model.features=[16]", "train.steps=20", "train.log_every_steps=10"]
CLUSTER_VARS = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JAXACCEL_AUTO_DISTRIBUTED")


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without any cluster variables (the tests may run inside a job), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARS)}
    return {**env, **extra}


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxaccel.run", *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize("keys, needle", [
    (["distributed.coordinator=localhost:1234", "distributed.num_processes=2", "distributed.process_id=2"],
     "distributed.process_id=2 is not below distributed.num_processes=2"),
    (["distributed.coordinator=localhost", "distributed.num_processes=2", "distributed.process_id=1"],
     "distributed.coordinator must be host:port"),
    (["distributed.num_processes=2"], "distributed.coordinator, distributed.process_id are not set"),
], ids=["process-id-too-large", "coordinator-without-port", "partly-set"])
def test_impossible_distributed_settings_exit_2_at_once(keys, needle, tmp_path):
    start = time.monotonic()
    result = _run(*ARGS, f"workdir={tmp_path}", *keys, env=_clean_env())
    err = result.stderr.strip()
    assert result.returncode == 2, err[-2000:]
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert time.monotonic() - start < 20  # not distributed.init_timeout_seconds


def test_slurm_job_without_what_jax_needs_is_refused_not_run_alone(tmp_path):
    result = _run(*ARGS, f"workdir={tmp_path}", env=_clean_env(SLURM_NTASKS="2"))
    err = result.stderr.strip()
    assert result.returncode == 2, err[-2000:]
    assert err.startswith("error: this is a SLURM job (SLURM_NTASKS=2)") and "distributed.process_id=..." in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_slurm_job_initialises_through_jax_detection(tmp_path):
    """Two processes with the variables srun sets and no distributed.* keys: one 2-process run."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "jaxaccel.run", *ARGS, f"workdir={tmp_path}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_clean_env(SLURM_JOB_ID="42", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                                             SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=str(port)))
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-2000:]
        assert f"jax.distributed: process {i} of 2, coordinator localhost:{port} (detected: this is a SLURM job" in out
    assert json.loads((tmp_path / "config.json").read_text())["process_count"] == 2


def test_detected_cluster_reads_the_job_environment():
    assert detected_cluster({}) is None
    assert detected_cluster({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "3"}) is None  # a one-task job runs alone
    assert "SLURM" in detected_cluster({"SLURM_NTASKS": "4"})
    assert "Open MPI" in detected_cluster({"OMPI_COMM_WORLD_SIZE": "2"})
    assert "Cloud TPU" in detected_cluster({"TPU_WORKER_HOSTNAMES": "t1,t2"})
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "t1"}) is None
    assert "JAX_COORDINATOR_ADDRESS" in detected_cluster({"JAX_COORDINATOR_ADDRESS": "h:1"})

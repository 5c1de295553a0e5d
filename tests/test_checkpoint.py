"""Checkpoints are verified on restore: a checksum of every leaf is written with each checkpoint,
and flipped bytes in a data file are the same clear error as an unreadable checkpoint."""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxaccel.checkpoint import checksums
from tests.conftest import run_cli

ARGS = ["exp=mnist_mlp", "model.features=[64]", "checkpoint.every_steps=100", "train.log_every_steps=50"]


def _flip_bytes(checkpoint: Path) -> Path:
    """Four bytes of 0xFF in the middle of the checkpoint's largest data file (array bytes)."""
    data = max(checkpoint.glob("state/ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 4] = b"\xff" * 4
    data.write_bytes(bytes(raw))
    return data


def test_flipped_bytes_are_caught_and_fallback_restores_the_previous_checkpoint(tmp_path):
    result = run_cli(*ARGS, "train.steps=300", f"workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    _flip_bytes(tmp_path / "checkpoints" / "300")
    result = run_cli(*ARGS, "train.steps=400", f"workdir={tmp_path}")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    # Mostly the flipped bytes are array bytes, which orbax reads back as if nothing happened and
    # only the checksums catch; where they land in OCDBT's own structures (the file layout varies
    # from run to run) orbax fails first. Either way: the same one line, exit 1, and the fallback.
    corrupt = f"checkpoint step 300 in {tmp_path / 'checkpoints'} is corrupt" in err
    assert corrupt or f"checkpoint step 300 in {tmp_path / 'checkpoints'} cannot be read" in err, err
    assert (not corrupt or "differ from the checksums written with them" in err) and "checkpoint.fallback=true" in err
    result = run_cli(*ARGS, "train.steps=400", "checkpoint.fallback=true", f"workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint step 300 in" in result.stdout and "resuming from checkpoint step 200" in result.stdout
    assert "done: test accuracy" in result.stdout


def test_checksums_do_not_depend_on_the_sharding(tmp_path):
    """Written from FSDP-sharded leaves on 4 devices, verified after a restore onto 1 device."""
    common = [*ARGS, "checkpoint.every_steps=10", f"workdir={tmp_path}"]
    result = run_cli(*common, "train.steps=20", "parallel.fsdp=true",
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli(*common, "train.steps=30", env={"XLA_FLAGS": os.environ.get("XLA_FLAGS", "")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from checkpoint step 20" in result.stdout


def test_checksums_cover_every_dtype_and_key_leaves():
    tree = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "h": jnp.ones(5, jnp.bfloat16),
            "m": jnp.ones((2, 2), bool), "n": jnp.int32(7), "key": jax.random.key(0)}
    sums = checksums(tree)
    assert len(sums) == 5 and all(len(v) == 16 for v in sums.values())
    for name, changed in (("w", tree["w"].at[2, 3].set(-0.0)), ("h", tree["h"].at[0].set(2)),
                          ("m", tree["m"].at[1, 0].set(False)), ("n", jnp.int32(8)), ("key", jax.random.key(1))):
        assert checksums({**tree, name: changed})[f"['{name}']"] != sums[f"['{name}']"], name
    # Moving a value elsewhere in a leaf changes it too (positions are hashed, not only summed).
    assert checksums({**tree, "w": tree["w"][::-1]})["['w']"] != sums["['w']"]

"""Local multi-process launcher: ``python -m jaxaccel.launch -n N exp=NAME [key=value ...]``.

Starts N ``python -m jaxaccel.run`` processes on this machine, joined by ``jax.distributed``
through a coordinator on a free localhost port (CPU collectives go through gloo), and streams
their output with a ``[i]`` prefix. It is the development stand-in for a cluster job, where each
host runs the ``jaxaccel.run`` command itself (README, "Cloud jobs").

Exit status: the first non-zero status of any process (its peers then stop on their own, as
they would on a cluster; stragglers are terminated after a grace period), else 0. SIGTERM and
Ctrl-C are passed on to every process, so a preempted launch checkpoints and can be resumed by
running the same command again.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

__all__ = ["main", "worker_commands"]

GRACE_SECONDS = 60.0  # after one process fails, how long its peers get to notice and exit


def free_port() -> int:
    """A TCP port nothing listens on now (the coordinator binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def worker_commands(n: int, args: list[str], port: int) -> list[list[str]]:
    """The ``jaxaccel.run`` command line of each of the ``n`` processes."""
    return [[sys.executable, "-u", "-m", "jaxaccel.run", *args, f"distributed.coordinator=localhost:{port}",
             f"distributed.num_processes={n}", f"distributed.process_id={i}"] for i in range(n)]


def _stream(index: int, pipe, out) -> None:
    for line in pipe:
        out.write(f"[{index}] {line}")
        out.flush()


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m jaxaccel.launch", description=__doc__.split("\n\n")[1],
        usage="python -m jaxaccel.launch -n N [--devices-per-process K] exp=NAME [key=value ...]")
    parser.add_argument("-n", "--num-processes", type=int, required=True, help="processes to start (>= 1)")
    parser.add_argument("--devices-per-process", type=int, default=None,
                        help="CPU only: emulate K devices in each process (XLA_FLAGS device count)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port on localhost (default: a free one)")
    opts, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if opts.num_processes < 1:
        parser.error("-n must be at least 1")
    taken = [a for a in rest if a.startswith("distributed.")]
    if taken:
        parser.error(f"{' '.join(taken)}: the launcher sets distributed.* itself; run "
                     "python -m jaxaccel.run directly to set them by hand")
    return opts, rest


def main(argv: list[str] | None = None) -> int:
    """Run the launcher; returns the exit status."""
    opts, args = _parse(list(sys.argv[1:] if argv is None else argv))
    env = dict(os.environ)
    if opts.devices_per_process:
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={opts.devices_per_process}".strip()
    port = opts.port or free_port()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1) for cmd in worker_commands(opts.num_processes, args, port)]
    streams = [threading.Thread(target=_stream, args=(i, p.stdout, sys.stdout), daemon=True)
               for i, p in enumerate(procs)]
    for t in streams:
        t.start()

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = _wait(procs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for t in streams:
        t.join(timeout=5)
    return status


def _wait(procs: list[subprocess.Popen]) -> int:
    """Wait for every process; after the first failure give the rest GRACE_SECONDS, then kill."""
    failed_at, status = None, 0
    while any(p.poll() is None for p in procs):
        for i, p in enumerate(procs):
            if p.returncode not in (None, 0) and status == 0:
                status, failed_at = p.returncode, time.monotonic()
                print(f"[launch] process {i} exited with status {p.returncode}", file=sys.stderr, flush=True)
        if failed_at is not None and time.monotonic() - failed_at > GRACE_SECONDS:
            for i, p in enumerate(procs):
                if p.poll() is None:
                    print(f"[launch] process {i} still running {GRACE_SECONDS:.0f}s after a peer failed: killing it",
                          file=sys.stderr, flush=True)
                    p.kill()
        time.sleep(0.2)
    for p in procs:
        if p.returncode != 0 and status == 0:
            status = p.returncode
    return status if status >= 0 else 128 - status  # killed by signal S: 128 + S, as a shell says


if __name__ == "__main__":
    sys.exit(main())

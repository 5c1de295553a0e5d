"""Local multi-process launcher: ``python -m jaxaccel.launch -n N exp=NAME [key=value ...]``.

Starts N ``python -m jaxaccel.run`` processes on this machine, joined by ``jax.distributed``
through a coordinator on a free localhost port (CPU collectives go through gloo), and streams
their output with a ``[i]`` prefix. On a GPU host each process gets its own GPUs
(``CUDA_VISIBLE_DEVICES``, ``--devices-per-process`` of them, default an equal share); on CPU
``--devices-per-process`` emulates that many devices per process. It is the development
stand-in for a cluster job, where each host runs the ``jaxaccel.run`` command itself (README,
"Cloud jobs").

Exit status: 0 when every process ends with 0 (also after a SIGTERM or Ctrl-C, which are passed
on to every process: they checkpoint the same step and exit 0, and the same command resumes).
A process that exits with an error gives its status (2 config, 3 data, 1 other); its peers get
a few seconds to end on their own, then are stopped. A process killed by a signal (SIGKILL, the
OOM killer) leaves its peers waiting on it forever: they are stopped at once, the launcher says
which process died and which checkpoint the same command resumes from, and exits 1.
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["main", "worker_commands", "worker_environments", "visible_gpus", "nvidia_smi_gpus", "LaunchError"]

GRACE_SECONDS = 10.0  # after one process exits with an error, how long its peers get to end on their own


class LaunchError(ValueError):
    """The processes cannot be laid out as asked (exit 2)."""


def free_port() -> int:
    """A TCP port nothing listens on now (the coordinator binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def worker_commands(n: int, args: list[str], port: int) -> list[list[str]]:
    """The ``jaxaccel.run`` command line of each of the ``n`` processes."""
    return [[sys.executable, "-u", "-m", "jaxaccel.run", *args, f"distributed.coordinator=localhost:{port}",
             f"distributed.num_processes={n}", f"distributed.process_id={i}"] for i in range(n)]


def visible_gpus(env: dict[str, str]) -> list[str]:
    """The GPUs this launcher hands out: ``JAXACCEL_LAUNCH_GPUS`` if set (a comma list; empty
    means none); else, when JAX here can use CUDA, the GPUs ``nvidia-smi -L`` lists, narrowed to
    ``CUDA_VISIBLE_DEVICES`` if that is set (a scheduler's share)."""
    if "JAXACCEL_LAUNCH_GPUS" in env:
        return [g.strip() for g in env["JAXACCEL_LAUNCH_GPUS"].split(",") if g.strip()]
    return nvidia_smi_gpus(env) if _jax_uses_cuda(env) else []


def _jax_uses_cuda(env: dict[str, str]) -> bool:
    """Whether the workers' JAX would run on CUDA GPUs (a CPU-only JAX on a GPU host keeps
    emulating CPU devices)."""
    from importlib import metadata
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return False
    return any((d.metadata["Name"] or "").lower().startswith(("jax-cuda", "jax_cuda"))
               for d in metadata.distributions())


def nvidia_smi_gpus(env: dict[str, str]) -> list[str]:
    """GPU ids from ``nvidia-smi -L`` (searched on ``env``'s PATH), narrowed to
    ``CUDA_VISIBLE_DEVICES`` when that is set; [] without nvidia-smi."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = re.findall(r"^GPU (\d+):", listing.stdout, re.M) if listing.returncode == 0 else []
    if found and env.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    return found


def worker_environments(n: int, devices_per_process: int | None, env: dict[str, str],
                        gpus: list[str]) -> list[dict[str, str]]:
    """The environment of each of the ``n`` processes. With GPUs, process i sees its own
    ``devices_per_process`` of them (default: an equal share of ``gpus``); without, the CPU
    platform is split into ``devices_per_process`` emulated devices. Raises LaunchError if the
    GPUs do not go round."""
    if gpus:
        per = devices_per_process or len(gpus) // n
        if per < 1 or per * n > len(gpus):
            raise LaunchError(f"{n} processes x {devices_per_process or 1} GPU(s) need {n * max(per, 1)} GPUs; "
                              f"{len(gpus)} are visible ({','.join(gpus)}): use fewer processes or "
                              "--devices-per-process")
        return [{**env, "CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per:(i + 1) * per])} for i in range(n)]
    if devices_per_process:
        flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices_per_process}".strip()
        return [{**env, "XLA_FLAGS": flags} for _ in range(n)]
    return [dict(env) for _ in range(n)]


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m jaxaccel.launch", description=__doc__.split("\n\n")[1],
        usage="python -m jaxaccel.launch -n N [--devices-per-process K] [--dry-run] exp=NAME [key=value ...]")
    parser.add_argument("-n", "--num-processes", type=int, required=True, help="processes to start (>= 1)")
    parser.add_argument("--devices-per-process", type=int, default=None,
                        help="GPUs per process (default: an equal share of the visible ones); on CPU, emulate "
                             "K devices in each process (XLA_FLAGS device count)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port on localhost (default: a free one)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each process's environment changes and command, start nothing")
    opts, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if opts.num_processes < 1:
        parser.error("-n must be at least 1")
    if opts.devices_per_process is not None and opts.devices_per_process < 1:
        parser.error("--devices-per-process must be at least 1")
    taken = [a for a in rest if a.startswith("distributed.")]
    if taken:
        parser.error(f"{' '.join(taken)}: the launcher sets distributed.* itself; run "
                     "python -m jaxaccel.run directly to set them by hand")
    return opts, rest


def _changes(env: dict[str, str], base: dict[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if base.get(k) != v)


def main(argv: list[str] | None = None) -> int:
    """Run the launcher; returns the exit status."""
    opts, args = _parse(list(sys.argv[1:] if argv is None else argv))
    base = dict(os.environ)
    try:
        envs = worker_environments(opts.num_processes, opts.devices_per_process, base, visible_gpus(base))
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    commands = worker_commands(opts.num_processes, args, opts.port or free_port())
    if opts.dry_run:
        for i, (env, cmd) in enumerate(zip(envs, commands)):
            print(f"[launch] process {i}: {_changes(env, base)} {shlex.join(cmd)}".replace(":  ", ": "))
        return 0
    return _Launch(commands, envs, args).run()


class _Launch:
    """The running processes: their output, the signals passed on, and what ends them."""

    def __init__(self, commands: list[list[str]], envs: list[dict[str, str]], args: list[str]):
        self.args, self.n = args, len(commands)
        self.muted: set[int] = set()  # processes stopped by the launcher: their last words are noise
        self.forwarded: int | None = None
        self.procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       bufsize=1) for cmd, env in zip(commands, envs)]
        for i, (p, env) in enumerate(zip(self.procs, envs)):
            gpus = f", CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env else ""
            print(f"[launch] process {i} of {self.n}: pid {p.pid}{gpus}", file=sys.stderr, flush=True)
        self.streams = [threading.Thread(target=self._stream, args=(i, p.stdout), daemon=True)
                        for i, p in enumerate(self.procs)]
        for t in self.streams:
            t.start()

    def _stream(self, index: int, pipe) -> None:
        for line in pipe:
            if index not in self.muted:
                sys.stdout.write(f"[{index}] {line}")
                sys.stdout.flush()

    def _forward(self, signum, frame) -> None:
        self.forwarded = signal.SIGTERM
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def run(self) -> int:
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            status = self._wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        for t in self.streams:
            t.join(timeout=5)
        return status

    def _stop_others(self, but: int) -> list[int]:
        stopped = []
        for j, p in enumerate(self.procs):
            if j != but and p.poll() is None:
                self.muted.add(j)
                p.kill()
                stopped.append(j)
        return stopped

    def _wait(self) -> int:
        """Wait for every process; stop the rest at once after a death by a signal, or
        GRACE_SECONDS after an error exit. Returns the exit status."""
        ended: queue.Queue[int] = queue.Queue()
        for i, p in enumerate(self.procs):
            threading.Thread(target=lambda i=i, p=p: (p.wait(), ended.put(i)), daemon=True).start()
        status, deadline, left = 0, None, set(range(self.n))
        while left:
            try:
                i = ended.get(timeout=0.5)
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    for j in self._stop_others(but=-1):
                        print(f"[launch] process {j} still running {GRACE_SECONDS:.0f}s after a peer failed: "
                              "stopped it", file=sys.stderr, flush=True)
                    deadline = None
                continue
            left.discard(i)
            code = self.procs[i].returncode
            if code == 0 or status != 0 or i in self.muted:
                continue
            if code < 0 and -code != self.forwarded:  # died: its peers would wait on it until they time out
                self._stop_others(but=i)
                print(f"[launch] error: {self._died(i, -code)}", file=sys.stderr, flush=True)
                status = 1
            else:
                status = code if code > 0 else 128 - code
                print(f"[launch] process {i} exited with status {status}", file=sys.stderr, flush=True)
                deadline = time.monotonic() + GRACE_SECONDS
        return status

    def _died(self, i: int, signum: int) -> str:
        workdir = _workdir(self.args)
        latest = None if "://" in workdir else _latest_checkpoint(Path(workdir))
        if "://" in workdir:  # not listed from here: a remote store may need credentials or time
            resume = f"the run resumes from the latest checkpoint in {workdir}, if one was written"
        elif latest is not None:
            resume = f"the run resumes from its latest checkpoint (step {latest})"
        else:
            resume = "no checkpoint was written yet, so it starts over"
        others = "; the launcher stopped the others" if self.n > 1 else ""
        return (f"process {i} of {self.n} stopped (killed by {signal.Signals(signum).name}){others}. "
                f"Restart every process with the same command (this launch command): {resume}.")


def _workdir(args: list[str]) -> str:
    """The run's workdir as the command gives it (a local path or a URL)."""
    given = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
    return given.get("workdir") or f"runs/{given.get('exp', 'run')}"


def _latest_checkpoint(workdir: Path) -> int | None:
    """The newest committed checkpoint step in a local workdir (orbax renames a checkpoint to its
    bare step number only once it is complete)."""
    try:
        steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    except OSError:
        return None
    return max(steps, default=None)


if __name__ == "__main__":
    sys.exit(main())

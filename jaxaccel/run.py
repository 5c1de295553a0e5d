"""Command line: ``python -m jaxaccel.run exp=NAME [dotted.key=value ...]`` and ``--list``.

Exit status: 0 done; 2 bad command line or config; 3 data not available; 1 anything else.
"""
from __future__ import annotations

import os
import sys

USAGE = """usage: python -m jaxaccel.run exp=NAME [dotted.key=value ...]
       python -m jaxaccel.run --list

Values parse as YAML (true, 3, 1e-3, [2,4], null). A duration is a step count (1000), epochs
('2 epochs', '2ep') or a fraction of the run ('30%'). Keys and defaults:
"""


def _fail(code: int, message: str, exit_now: bool = False) -> int:
    """Print the one-line error; ``exit_now`` skips the interpreter's shutdown (whose unfinished
    background writes would print their own reports)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    _exit_now_if_multiprocess(code)
    if exit_now:
        sys.stdout.flush()
        os._exit(code)
    return code


def _exit_now_if_multiprocess(code: int) -> None:
    """A failed process of a multi-process run exits at once: a normal exit would wait in
    jax.distributed's shutdown barrier for peers that are gone, then abort with a C++ trace
    and another exit status. Everything worth keeping is already written (checkpoints are
    committed before the error reaches here)."""
    if "jax" in sys.modules:
        import jax
        if jax.distributed.is_initialized() and jax.process_count() > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Imported here, not at module level: --help and config errors must answer fast.
    from jaxaccel import experiments
    from jaxaccel.config import ConfigError, field_help

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + field_help())
        return 0 if argv else 2
    if argv[0] == "--list":
        for name in experiments.names():
            print(f"{name:24s} {experiments.info(name).summary}")
        return 0
    exp = [a for a in argv if a.startswith("exp=")]
    if len(exp) != 1:
        return _fail(2, "give exactly one exp=NAME (python -m jaxaccel.run --list shows them)")
    overrides = [a for a in argv if not a.startswith("exp=")]
    try:
        cfg = experiments.override(experiments.get(exp[0][4:]), overrides)
    except ConfigError as e:
        return _fail(2, str(e))
    return _train(cfg, overrides)


def _train(cfg, overrides: list[str]) -> int:
    from jaxaccel.checkpoint import CheckpointMismatch, CheckpointUnreadable
    from jaxaccel.config import ConfigError
    from jaxaccel.data import DataError
    from jaxaccel.feed import WorkerDied
    from jaxaccel.parallel import ReplicaMismatch
    from jaxaccel.pipeline import train
    from jaxaccel.precision import NonFiniteError
    from jaxaccel.runtime import DistributedError, Preempted
    from jaxaccel.failures import DiskFull

    try:
        summary = train(cfg, overrides)
    except (ConfigError, CheckpointMismatch) as e:
        return _fail(2, str(e))
    except DataError as e:
        return _fail(3, str(e))
    except (NonFiniteError, DistributedError, CheckpointUnreadable, ReplicaMismatch, WorkerDied) as e:
        return _fail(1, str(e))
    except DiskFull as e:
        return _fail(1, str(e), exit_now=True)
    except Preempted as e:
        print(f"{e}; run the same command again to resume", flush=True)
        return 130 if e.signal_name == "SIGINT" else 0
    import jax
    where = (f"outputs in {cfg.workdir or 'runs/' + cfg.experiment}" if jax.process_index() == 0
             else f"process {jax.process_index()}: process 0 writes the outputs")
    flops = f", {summary['model_flops_per_second'] / 1e9:.1f} model GFLOP/s" if summary.get("model_flops_per_second") else ""
    print(f"done: test accuracy {summary['test_accuracy']:.4f} after {summary['steps']} steps, "
          f"{summary['examples_per_second']:,.0f} examples/s{flops}; {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every registered experiment compiles for a TPU v5e:2x2 with the real XLA:TPU compiler: its step
group (the longest of its compiled-in lengths; the others are the same program with another trip
count), evaluation, and the compression report's float and int8 inference (also the int8 export's).

Needs libtpu, which is kept out of the training environment (it loads into every JAX process): it
runs from a second environment with the ``tpu`` extra, the tests' second part (README, "Install,
run, test"; CI runs it, ``.ci/run``), on two workers: ~14 CPU-minutes of XLA:TPU compiles.
The starting model of a run that changes its model mid-run (``lowrank.at``, ``sparsity.shrink``) is
the one compiled.
Datasets not prepared here (CIFAR-10, AG News, Speech Commands) take their shapes from the TFDS
catalog (``jaxaccel.aot_run.CATALOG``): a compile needs shapes, not examples."""
from __future__ import annotations

import pytest

import jaxaccel
from jaxaccel import aot, aot_run

pytestmark = pytest.mark.skipif(aot.missing_compiler("tpu") is not None,
                                reason="libtpu is not installed (pip install 'jaxaccel[tpu]')")


@pytest.fixture(scope="module")
def v5e_2x2():
    return aot.make_devices(aot.parse_target("v5e:2x2"))


@pytest.mark.parametrize("name", jaxaccel.experiments.names())
def test_every_experiment_compiles_for_v5e_2x2(name, v5e_2x2):
    built = aot.build_functions(jaxaccel.experiments.get(name), v5e_2x2)
    chosen = aot_run.representatives(list(built.functions))
    assert {"eval", "report_float", "report_int8"} <= set(chosen)
    assert sum(n.startswith("train_steps") for n in chosen) >= 1
    results = aot.compile_functions({n: built.functions[n] for n in chosen})
    problems = {n: f for n, f in results.items() if "problem" in f}
    assert not problems, problems
    assert all(f["total_bytes"] > 0 for f in results.values())

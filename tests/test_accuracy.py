"""Each experiment cheap enough for CI is run exactly as its docstring says and held to its
accuracy floor. The rest are held by benchmarks/accuracy.py (results in benchmarks/README.md)."""
from __future__ import annotations

import re

import pytest

import jaxaccel

# Experiments whose docstring runtime is at most this many seconds run in the test suite.
CI_SECONDS = 20


def _cheap(name: str) -> bool:
    info = jaxaccel.experiments.info(name)
    match = re.search(r"~\s*(\d+)\s*s\b", info.runtime)
    return info.unavailable is None and match is not None and int(match.group(1)) <= CI_SECONDS


def _cases() -> list:
    """The cheap experiments, and those without a measured floor as skipped with their reason."""
    cases = []
    for name in jaxaccel.experiments.names():
        reason = jaxaccel.experiments.info(name).not_measured
        if reason:
            cases.append(pytest.param(name, marks=pytest.mark.skip(reason=f"accuracy not measured: {reason}")))
        elif _cheap(name):
            cases.append(name)
    return cases


@pytest.mark.parametrize("name", _cases())
def test_experiment_meets_its_docstring_accuracy(name, tmp_path):
    info = jaxaccel.experiments.info(name)
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get(name), [f"workdir={tmp_path}"])
    summary = jaxaccel.train(cfg)
    assert summary["test_accuracy"] >= info.expected_accuracy, (name, summary["test_accuracy"], info.accuracy)
    if info.expected_sparsity is not None:
        assert summary["sparsity"] >= info.expected_sparsity - 1e-4, (name, summary["sparsity"], info.accuracy)

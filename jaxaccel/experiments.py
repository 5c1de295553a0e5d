"""The experiment registry: every module in ``experiments/`` is one experiment.

An experiment file holds a docstring (first line: the summary; then ``Command:``, ``Runtime:`` and
``Accuracy:`` lines that tests and benchmarks hold the code to) and a ``config`` dict with the
fields it changes from the :class:`~jaxaccel.config.Config` defaults. An Accuracy line that starts
with "not measured here:" gives the reason instead of a floor (e.g. the dataset is not on the
machine the numbers come from); tests report such experiments as skipped with that reason. An experiment that cannot run
yet may define ``unavailable = "why"``; the registry refuses it with that message.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
import re
from typing import Iterable

from jaxaccel import experiment_defs
from jaxaccel.config import Config, ConfigError, apply_overrides, build_config, parse_overrides

__all__ = ["names", "get", "override", "info", "ExperimentInfo"]


@dataclasses.dataclass(frozen=True)
class ExperimentInfo:
    """What an experiment's docstring promises."""
    name: str
    summary: str
    command: str
    runtime: str
    accuracy: str
    expected_accuracy: float | None  # the ">= X%" floor of the Accuracy line, as a fraction
    expected_sparsity: float | None  # the "at >= X% sparsity" floor (or "at X% ... sparsity"), if any
    unavailable: str | None
    not_measured: str | None = None  # why the Accuracy line has no floor ("not measured here: why")


def names() -> list[str]:
    """Registered experiment names, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(experiment_defs.__path__) if not m.name.startswith("_"))


def _module(name: str):
    if name not in names():
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown experiment {name!r}.{hint} Registered: {', '.join(names())} "
                          "(python -m jaxaccel.run --list)")
    return importlib.import_module(f"{experiment_defs.__name__}.{name}")


def _docline(doc: str, label: str) -> str:
    match = re.search(rf"^\s*{label}:\s*(.+)$", doc, re.M)
    return match.group(1).strip() if match else ""


def info(name: str) -> ExperimentInfo:
    """Parse the docstring of experiment ``name``."""
    module = _module(name)
    doc = module.__doc__ or ""
    accuracy = _docline(doc, "Accuracy")
    floor = re.search(r">=\s*([\d.]+)\s*%", accuracy)
    sparse = re.search(r"at (?:>=\s*)?([\d.]+)%[^,;]*sparsity", accuracy)
    return ExperimentInfo(
        name=name, summary=doc.strip().splitlines()[0] if doc.strip() else "",
        command=_docline(doc, "Command"), runtime=_docline(doc, "Runtime"), accuracy=accuracy,
        expected_accuracy=float(floor.group(1)) / 100 if floor else None,
        expected_sparsity=float(sparse.group(1)) / 100 if sparse else None,
        unavailable=getattr(module, "unavailable", None),
        not_measured=_not_measured(accuracy))


def _not_measured(accuracy: str) -> str | None:
    match = re.match(r"not measured here:\s*(.+)", accuracy)
    return match.group(1).strip() if match else None


def get(name: str) -> Config:
    """The validated config of experiment ``name`` (refused if the experiment is unavailable)."""
    module = _module(name)
    if getattr(module, "unavailable", None):
        raise ConfigError(f"experiment {name}: {module.unavailable}")
    tree = apply_overrides(getattr(module, "config", {}), [])
    tree["experiment"] = name
    try:
        return build_config(tree)
    except ConfigError as e:
        raise ConfigError(f"experiment file {name}.py: {e}") from None


def override(cfg: Config, overrides: Iterable[str]) -> Config:
    """Apply ``["a.b=c", ...]`` overrides to ``cfg``; raises ConfigError naming any bad key."""
    return build_config(apply_overrides(cfg.to_dict(), parse_overrides(list(overrides))))

"""The compression report never costs a run its summary.json: a form that cannot run on the
backend is reported unavailable, with the reason."""
from __future__ import annotations

import json

import jax
import pytest

import jaxaccel
from jaxaccel import precision


def test_a_form_that_cannot_run_is_unavailable_and_the_summary_is_written(tmp_path, monkeypatch):
    def int8_apply_as_on_gpu_before(*args, **kwargs):  # what XLA:GPU said of s8 x s8 -> s32 convs
        raise jax.errors.JaxRuntimeError("UNIMPLEMENTED: Can't lower one or more integer convolutions to idioms "
                                         "supported by CuDNN.\nmore detail")

    monkeypatch.setattr(precision, "int8_apply", int8_apply_as_on_gpu_before)
    cfg = jaxaccel.experiments.override(jaxaccel.experiments.get("mnist_mlp"), [
        f"workdir={tmp_path}", "train.steps=20", "model.features=[32]", "checkpoint.every_steps=20"])
    returned = jaxaccel.train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["compression"] == returned["compression"]
    forms = summary["compression"]
    for form in ("int8", "sparse_int8"):
        assert forms[form]["accuracy"] is None and forms[form]["bytes"] > 0
        assert forms[form]["unavailable"] == ("does not run on cpu: JaxRuntimeError: UNIMPLEMENTED: Can't lower one "
                                              "or more integer convolutions to idioms supported by CuDNN.")
    for form in ("dense_fp32", "sparse"):
        assert forms[form]["accuracy"] == pytest.approx(summary["test_accuracy"]) and "unavailable" not in forms[form]

"""The experiment registry and the promises in each experiment's docstring."""
from __future__ import annotations

import pytest

import jaxaccel
from jaxaccel.config import ConfigError


def test_registry_has_the_foundation_experiments():
    assert {"mnist_mlp", "mnist_cnn"} <= set(jaxaccel.experiments.names())


@pytest.mark.parametrize("name", jaxaccel.experiments.names())
def test_every_experiment_validates_and_documents_itself(name):
    cfg = jaxaccel.experiments.get(name)
    assert cfg.experiment == name
    info = jaxaccel.experiments.info(name)
    assert info.summary and info.command == f"python -m jaxaccel.run exp={name}"
    assert info.runtime and info.accuracy
    if info.not_measured is not None:  # no floor: the docstring must say why
        assert info.expected_accuracy is None and len(info.not_measured) > 20
    elif info.unavailable is None:
        assert 0.5 < info.expected_accuracy <= 1.0


def test_models_are_what_the_docstrings_say():
    assert jaxaccel.experiments.get("mnist_mlp").model.features == [300, 100]
    assert jaxaccel.experiments.get("mnist_cnn").model.name == "cnn"


def test_unknown_experiment_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        jaxaccel.experiments.get("mnist_mpl")
    assert "Did you mean mnist_mlp" in str(info.value) and "mnist_cnn" in str(info.value)


def test_import_touches_no_devices():
    # Building a config imports jax (each model's config class lives with its Flax module), but
    # touches no device and no data: with a platform that does not exist here, any backend
    # initialisation would fail.
    import os, subprocess, sys
    code = ("import jaxaccel, sys; jaxaccel.experiments.override(jaxaccel.experiments.get('mnist_sparse'), "
            "['model.name=cnn']); assert 'tensorflow_datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "tpu"})
    failing = "import jax; jax.devices()"
    assert subprocess.run([sys.executable, "-c", failing], env={**os.environ, "JAX_PLATFORMS": "tpu"},
                          capture_output=True).returncode != 0  # the probe would catch a device access

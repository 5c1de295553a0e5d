"""On-device augmentation: checked against NumPy slicing, deterministic per key, a no-op when off,
and used by the train step on the images only."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaccel import augment, step
from jaxaccel.config import AugmentConfig, model_config
from jaxaccel.models import build_model

IMAGES = np.random.default_rng(0).integers(0, 256, (6, 8, 10, 3), dtype=np.uint8)


def test_off_is_a_no_op():
    images = jnp.asarray(IMAGES)
    assert augment.augment(AugmentConfig(), jax.random.key(0), images) is images
    assert augment.sample(AugmentConfig(), jax.random.key(0), 6) == {}


def test_crop_and_flip_match_numpy_slicing():
    cfg = AugmentConfig(crop_padding=3, flip=True)
    key = jax.random.key(1)
    draws = jax.device_get(augment.sample(cfg, key, len(IMAGES)))
    got = np.asarray(augment.augment(cfg, key, jnp.asarray(IMAGES)))
    padded = np.pad(IMAGES, ((0, 0), (3, 3), (3, 3), (0, 0)))
    for i, ((r, c), flipped) in enumerate(zip(draws["offsets"], draws["flips"])):
        want = padded[i, r:r + 8, c:c + 10]
        np.testing.assert_array_equal(got[i], want[:, ::-1] if flipped else want)
    # The draws vary: offsets cover more than one value and some images flip, some do not.
    assert len({tuple(o) for o in draws["offsets"]}) > 1 and 0 < draws["flips"].sum() < len(IMAGES)


def test_rotation_by_a_right_angle_is_numpy_rot90_and_zero_angle_is_identity():
    square = jnp.asarray(IMAGES[:, :8, :8])
    quarter = augment.affine(square, jnp.full(6, math.pi / 2), jnp.ones(6))
    np.testing.assert_array_equal(np.asarray(quarter), np.rot90(IMAGES[:, :8, :8], -1, axes=(1, 2)))
    np.testing.assert_array_equal(np.asarray(augment.affine(square, jnp.zeros(6), jnp.ones(6))), IMAGES[:, :8, :8])


def test_zoom_out_by_two_samples_every_other_pixel():
    # Scale 1/2 about the centre of a 9x9 image: output pixel (4 + k) reads source (4 + 2k).
    image = np.arange(81, dtype=np.uint8).reshape(1, 9, 9, 1)
    out = np.asarray(augment.affine(jnp.asarray(image), jnp.zeros(1), jnp.full(1, 0.5)))
    np.testing.assert_array_equal(out[0, 2:7, 2:7, 0], image[0, 0:9:2, 0:9:2, 0])
    assert (out[0, 0] == 0).all()  # outside the source: zero fill


def test_same_key_same_images_other_key_other_images():
    cfg = AugmentConfig(crop_padding=2, flip=True, rotate_degrees=15, scale=0.1)
    images = jnp.asarray(IMAGES)
    a = augment.augment(cfg, jax.random.key(3), images)
    b = augment.augment(cfg, jax.random.key(3), images)
    c = augment.augment(cfg, jax.random.key(4), images)
    assert a.dtype == jnp.uint8 and a.shape == images.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c)) and not np.array_equal(np.asarray(a), IMAGES)


def test_non_image_inputs_are_refused():
    with pytest.raises(ValueError, match="augment section off"):
        augment.augment(AugmentConfig(flip=True), jax.random.key(0), jnp.zeros((2, 16), jnp.int32))


def test_train_step_augments_images_with_its_rng_and_keeps_labels():
    """The step's loss equals the loss of the model on augment(images, rng) against the original
    labels, and differs from the loss on the unaugmented batch."""
    cfg = AugmentConfig(crop_padding=2, flip=True)
    model = build_model(model_config(name="mlp", features=[16]), 10)
    images = jnp.asarray(IMAGES[:, :8, :8])
    labels = jnp.arange(6, dtype=jnp.int32)
    params = model.init(jax.random.key(0), images)["params"]
    tx = optax.sgd(0.1)
    state = step.TrainState.create(params, tx)
    rng = jax.random.key(7)
    batch = {"inputs": images, "labels": labels}
    _, metrics = jax.jit(functools.partial(step.train_step, apply_fn=model.apply, tx=tx, augment=cfg))(state, batch, rng)
    loss = lambda x: step.cross_entropy(model.apply({"params": params}, x), labels).mean()
    np.testing.assert_allclose(metrics["loss"], loss(augment.augment(cfg, rng, images)), rtol=1e-6)
    assert abs(float(metrics["loss"]) - float(loss(images))) > 1e-4

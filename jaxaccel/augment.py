"""Random image augmentation on the device, inside the compiled train step.

Every transform works on a uint8 batch ``[B, H, W, C]`` and returns uint8 of the same shape, so the
dataset stays uint8 on the device and the model scales it as usual. The random draws are a pure
function of the key the train step receives (``fold_in(step_key, step)``), so a run is
deterministic for its seed and a resumed run augments exactly like an uninterrupted one.

    crop_padding=p   pad by p zero pixels on each side, crop H x W back at a uniform offset in [0, 2p]^2
    flip             mirror left-right with probability 1/2
    rotate_degrees=d rotate about the centre by a uniform angle in [-d, d] degrees    } one affine map,
    scale=s          zoom by a uniform factor in [1 - s, 1 + s]                        } bilinear, zero fill

Order: affine, then crop, then flip. A transform that is off is not traced at all, so with the
default config the step is exactly the one without augmentation.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxaccel.config import AugmentConfig

__all__ = ["sample", "apply", "augment", "crop", "flip", "affine"]


def sample(cfg: AugmentConfig, key: jax.Array, batch: int) -> dict[str, jax.Array]:
    """The random parameters of one batch: only those of the transforms ``cfg`` turns on."""
    k_crop, k_flip, k_angle, k_scale = jax.random.split(key, 4)
    draws = {}
    if cfg.crop_padding:
        draws["offsets"] = jax.random.randint(k_crop, (batch, 2), 0, 2 * cfg.crop_padding + 1)
    if cfg.flip:
        draws["flips"] = jax.random.bernoulli(k_flip, 0.5, (batch,))
    if cfg.rotate_degrees or cfg.scale:
        d = math.radians(cfg.rotate_degrees)
        draws["angles"] = jax.random.uniform(k_angle, (batch,), minval=-d, maxval=d)
        draws["scales"] = jax.random.uniform(k_scale, (batch,), minval=1 - cfg.scale, maxval=1 + cfg.scale)
    return draws


def crop(images: jax.Array, offsets: jax.Array, padding: int) -> jax.Array:
    """Zero-pad by ``padding`` and crop back to the input size at ``offsets`` [B, 2] (row, col)."""
    h, w = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    one = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, image.shape[-1]))
    return jax.vmap(one)(padded, offsets)


def flip(images: jax.Array, flips: jax.Array) -> jax.Array:
    """Mirror left-right the images where ``flips`` [B] is true."""
    return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


def affine(images: jax.Array, angles: jax.Array, scales: jax.Array) -> jax.Array:
    """Rotate by ``angles`` (radians; positive turns the image clockwise as displayed, rows
    downward: pi/2 equals ``np.rot90(images, -1, axes=(1, 2))``) and zoom by ``scales`` about the image
    centre; bilinear interpolation, zero outside the source, rounded back to uint8."""
    h, w = images.shape[1:3]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy, jnp.arange(w, dtype=jnp.float32) - cx,
                              indexing="ij")

    def one(image, angle, scale):
        # Inverse map: each output pixel samples the source at R(-angle) / scale of its offset.
        cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
        src_r = cos * rows - sin * cols + cy
        src_c = sin * rows + cos * cols + cx
        sample_channel = lambda ch: jax.scipy.ndimage.map_coordinates(ch, [src_r, src_c], order=1, cval=0.0)
        out = jax.vmap(sample_channel, in_axes=-1, out_axes=-1)(image.astype(jnp.float32))
        return jnp.clip(jnp.round(out), 0, 255).astype(images.dtype)

    return jax.vmap(one)(images, angles, scales)


def apply(cfg: AugmentConfig, draws: dict[str, jax.Array], images: jax.Array) -> jax.Array:
    """Apply the transforms ``cfg`` turns on with the parameters ``draws`` (from :func:`sample`)."""
    if "angles" in draws:
        images = affine(images, draws["angles"], draws["scales"])
    if "offsets" in draws:
        images = crop(images, draws["offsets"], cfg.crop_padding)
    if "flips" in draws:
        images = flip(images, draws["flips"])
    return images


def augment(cfg: AugmentConfig, key: jax.Array, images: jax.Array) -> jax.Array:
    """A randomly augmented copy of the uint8 batch ``images`` [B, H, W, C] (the batch itself when
    ``cfg`` turns nothing on)."""
    if not cfg.enabled:
        return images
    if images.ndim != 4:
        raise ValueError(f"augmentation works on images [B, H, W, C], got shape {images.shape}: "
                         "leave the augment section off for this dataset")
    return apply(cfg, sample(cfg, key, images.shape[0]), images)

"""The pure training and evaluation steps, and the compiled groups of steps the loop calls.

``train_step(state, batch, rng) -> (state, metrics)`` is one optimizer step and knows nothing about
devices. :func:`make_train_steps` wraps it into one compiled call that runs several steps with the
whole dataset already on the device: each batch is gathered on device from the epoch's permutation,
so there is no host round trip per step, and the train state is donated so XLA updates it in place.

How the steps of one call are compiled is a measured choice (see benchmarks/README.md): a device
loop (``scan``; one compile serves any number of steps) or an unrolled block (``unroll``; XLA:CPU
runs convolutions much faster outside loop bodies).
"""
from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from jaxaccel import augment as augment_lib
from jaxaccel import precision as prec

__all__ = ["TrainState", "cross_entropy", "train_step", "eval_step", "make_train_steps", "make_eval"]

TrainState = train_state.TrainState
Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in f32 against (optionally smoothed) one-hot labels."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               label_smoothing: float = 0.0, axis_name: str | None = None,
               penalty: Callable[[Any], jax.Array] | None = None, precision: Any = None,
               quant_start_step: int | None = None, augment: Any = None,
               tx: optax.GradientTransformation | None = None) -> tuple[TrainState, Metrics]:
    """One optimizer step on ``batch`` ({"image": inputs [B, ...], "label": int32 [B]}).

    Inputs are uint8 images [B,H,W,C], int32 tokens [B,L] or int16 audio [B,T]; the model turns
    them into floats, so the dataset stays in its compact integer form on the device.

    ``axis_name``: under pmap, the device axis over which gradients and metrics are averaged
    (under jit with a sharded batch the compiler inserts that reduction itself), so the
    optimizer's finiteness check sees the reduced gradients and every replica decides alike.
    ``penalty``: a regularizer of the params added to the loss (e.g. L1 / group lasso for
    sparsity); the reported ``loss`` is the task loss, ``penalty`` is reported beside it.
    ``precision``: a PrecisionConfig whose ``include``-d params are cast for the forward pass
    (the float32 master weights get float32 gradients through the cast).
    ``quant_start_step``: QAT models fake-quantize from this step on.
    ``augment``: an AugmentConfig; images are randomly augmented with keys drawn from ``rng``
    (under pmap folded with the device index, so the devices' slices get different draws).
    ``tx``: apply the gradients with this optimizer instead of ``state.tx`` (it must keep the same
    state; the trainer passes the unguarded half of the rollback guard).
    The loss is multiplied by the loss scale found in the optimizer state (1 without scaling);
    the optimizer's loss-scaling wrapper unscales the gradients and skips non-finite steps.
    """
    chex.assert_rank(batch["label"], 1)
    chex.assert_type(batch["label"], jnp.int32)
    if batch["image"].dtype not in (jnp.uint8, jnp.int32, jnp.int16):
        raise TypeError(f"inputs must be uint8 images, int32 tokens or int16 audio, got {batch['image'].dtype}")
    images = batch["image"]
    if augment is not None and augment.enabled:
        key = jax.random.fold_in(rng, jax.lax.axis_index(axis_name)) if axis_name is not None else rng
        images = augment_lib.augment(augment, key, images)
    model_kwargs = {} if quant_start_step is None else {"quant_enabled": state.step >= quant_start_step}

    def loss_fn(params):
        compute_params = prec.cast_params(params, precision) if precision is not None else params
        logits = state.apply_fn({"params": compute_params}, images, **model_kwargs)
        chex.assert_shape(logits, (images.shape[0], None))
        loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
        extra = penalty(params) if penalty is not None else jnp.zeros((), jnp.float32)
        return prec.scale_loss(loss + extra, state.opt_state), (loss, extra, logits)

    (_, (loss, extra, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    finite = jnp.isfinite(loss)
    # Non-finite losses are left out of the sums (their steps are skipped by the optimizer).
    metrics = {"loss": jnp.where(finite, loss, 0.0),
               "accuracy": jnp.where(finite, jnp.mean(jnp.argmax(logits, -1) == batch["label"]), 0.0),
               "finite_steps": finite.astype(jnp.float32)}
    if penalty is not None:
        metrics["penalty"] = jnp.where(finite, extra, 0.0)
    if axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    new_state = (state.apply_gradients(grads=grads) if tx is None
                 else state.replace(tx=tx).apply_gradients(grads=grads).replace(tx=state.tx))
    # The optimizer's own verdict (its consecutive-skip counter is reset by every applied step):
    # a step can be skipped for non-finite gradients even when its loss is finite.
    metrics["skipped_steps"] = (prec.nonfinite_steps(new_state.opt_state) > 0).astype(jnp.float32)
    return new_state, metrics


def eval_step(params: Any, apply_fn: Callable, images: jax.Array, labels: jax.Array,
              weights: jax.Array) -> Metrics:
    """Sums of loss and correct predictions over the examples with weight 1 (padding has 0)."""
    logits = apply_fn({"params": params}, images)
    loss = cross_entropy(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * weights), "correct": jnp.sum(correct * weights),
            "count": jnp.sum(weights)}


def _slice_batch(arrays, perm, position, batch_size, batch_sharding, axis_name):
    """Batch number ``position`` of the epoch, gathered on device from ``perm``.

    Under jit the global batch is gathered and constrained to the data-axis sharding (each device
    computes only its part); under pmap each device gathers its own contiguous slice of it.
    """
    start, size = position * batch_size, batch_size
    if axis_name is not None:
        size = batch_size // jax.lax.psum(1, axis_name)
        start = start + jax.lax.axis_index(axis_name) * size
    idx = jax.lax.dynamic_slice_in_dim(perm, start, size)
    batch = tuple(jnp.take(a, idx, axis=0) for a in arrays)
    if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return batch


def make_train_steps(step_fn: Callable, *, batch_size: int, batch_sharding: Any, unroll: int | None,
                     step_key: jax.Array, axis_name: str | None = None) -> Callable:
    """A jittable ``(state, images, labels, perm, position, count) -> (state, metric sums)``.

    Runs ``count`` steps starting at batch ``position`` of the epoch whose order is ``perm``.
    ``unroll=None``: a device loop, ``count`` may vary without recompiling. ``unroll=K``: K steps
    unrolled, ``count`` must equal K. The step's RNG is ``fold_in(step_key, state.step)``, so a
    step's randomness depends only on (seed, step), however the steps are grouped or resumed.
    """
    def one_step(state, images, labels, perm, position):
        image, label = _slice_batch((images, labels), perm, position, batch_size, batch_sharding, axis_name)
        return step_fn(state, {"image": image, "label": label}, jax.random.fold_in(step_key, state.step))

    def add(sums, metrics):
        return jax.tree.map(jnp.add, sums, metrics)

    def run(state, images, labels, perm, position, count):
        zeros = jax.eval_shape(lambda: one_step(state, images, labels, perm, position)[1])
        sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        if unroll is None:
            def body(i, carry):
                state, sums = carry
                state, metrics = one_step(state, images, labels, perm, position + i)
                return state, add(sums, metrics)
            return jax.lax.fori_loop(0, count, body, (state, sums))
        for i in range(unroll):  # a Python loop: XLA sees one straight-line block
            state, metrics = one_step(state, images, labels, perm, position + i)
            sums = add(sums, metrics)
        return state, sums

    return run


def make_eval(apply_fn: Callable, batch_size: int, batch_sharding: Any, axis_name: str | None = None) -> Callable:
    """A ``(params, images, labels, weights, index) -> metric sums`` over batch ``index``.

    The split is padded to a whole number of batches (padding weighted 0). The loop calls it once
    per batch rather than looping on device, which is slow for convolutions on CPU.
    """
    def one(params, images, labels, weights, index):
        batch = _slice_batch((images, labels, weights), jnp.arange(images.shape[0]), index, batch_size,
                             batch_sharding, axis_name)
        sums = eval_step(params, apply_fn, *batch)
        return sums if axis_name is None else jax.lax.psum(sums, axis_name)

    return one

"""The pure train step: deterministic, and its measurements equal references computed another way."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jaxaccel
from jaxaccel import precision as prec
from jaxaccel import step as step_lib
from jaxaccel.config import PrecisionConfig
from jaxaccel.models import CNN
from jaxaccel.optim import make_optimizer


def test_train_step_is_deterministic(mnist):
    model = CNN(num_classes=10)
    tx = make_optimizer(jaxaccel.config.OptimConfig(name="adam"), 10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.uint8))["params"]
    state = step_lib.TrainState.create(params, tx)
    batch = {"inputs": jnp.asarray(mnist.train_inputs[:32]), "labels": jnp.asarray(mnist.train_labels[:32])}
    step = jax.jit(functools.partial(step_lib.train_step, apply_fn=model.apply, tx=tx))
    a = step(state, batch, jax.random.key(1))
    b = step(state, batch, jax.random.key(1))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(a[1]["loss"]) > 0


def test_measurements_equal_references_computed_another_way(mnist):
    """Loss, accuracy and the L2 norms of gradients, updates and parameters, and the learning rate,
    against plain jax.grad + optax on the same batch."""
    model = jaxaccel.models.MLP(features=(32,), num_classes=10)
    schedule = optax.cosine_decay_schedule(1e-2, 100)
    tx = optax.adam(schedule)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.uint8))["params"]
    batch = {"inputs": jnp.asarray(mnist.train_inputs[:64]), "labels": jnp.asarray(mnist.train_labels[:64])}
    state = step_lib.TrainState.create(params, tx)
    step = jax.jit(functools.partial(step_lib.train_step, apply_fn=model.apply, tx=tx, learning_rate=schedule))
    state, _ = step(state, batch, jax.random.key(1))  # a second step: a non-trivial learning rate and moments
    new, got = step(state, batch, jax.random.key(1))

    def loss_fn(p):
        logits = model.apply({"params": p}, batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, _ = tx.update(grads, state.opt_state, state.params)
    norm = lambda tree: np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))
    np.testing.assert_allclose(got["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(got["accuracy"], np.mean(np.argmax(logits, -1) == batch["labels"]))
    np.testing.assert_allclose(got["grad_norm"], norm(grads), rtol=1e-5)
    np.testing.assert_allclose(got["update_norm"], norm(updates), rtol=1e-5)
    np.testing.assert_allclose(got["param_norm"], norm(new.params), rtol=1e-5)
    np.testing.assert_allclose(got["learning_rate"], schedule(1), rtol=1e-6)
    assert float(got["finite_steps"]) == 1 and float(got["skipped_steps"]) == 0 and int(new.step) == 2


class _BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(10)(x)


def test_model_state_is_updated_and_left_alone_by_a_skipped_step():
    """Batch statistics travel in the state; a step the guard skips (a NaN input) leaves them unchanged."""
    model = _BatchNormNet()
    x = jnp.asarray(np.random.default_rng(0).integers(0, 255, (8, 4, 4, 1)), jnp.uint8)
    variables = dict(model.init(jax.random.key(0), x))
    params = variables.pop("params")
    tx = prec.with_precision(optax.sgd(0.1), PrecisionConfig())  # the non-finite guard
    state = step_lib.TrainState.create(params, tx, model_state=variables)
    def step_with_inputs_times(scale):
        apply = lambda v, inputs, mutable: model.apply(v, inputs.astype(jnp.float32) * scale, mutable=mutable)
        return jax.jit(functools.partial(step_lib.train_step, apply_fn=apply, tx=tx))

    labels = jnp.arange(8, dtype=jnp.int32)
    good, _ = step_with_inputs_times(1.0)(state, {"inputs": x, "labels": labels}, jax.random.key(0))
    before = jax.tree.leaves(state.model_state)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(good.model_state), before))
    skipped, measured = step_with_inputs_times(jnp.nan)(good, {"inputs": x, "labels": labels}, jax.random.key(0))
    assert float(measured["skipped_steps"]) == 1 and float(measured["finite_steps"]) == 0
    for a, b in zip(jax.tree.leaves(skipped.model_state), jax.tree.leaves(good.model_state)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(good.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("unroll", [None, 4])
def test_a_step_group_sums_its_steps_and_measures_the_norms_of_its_last(mnist, unroll):
    """A compiled group of 4 steps (device loop or unrolled): loss and accuracy summed over its
    steps, the gradient/update/parameter norms those of its last step (and only that step pays for
    them), against the same 4 steps run one by one."""
    model = jaxaccel.models.MLP(features=(32,), num_classes=10)
    tx = optax.adam(1e-2)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.uint8))["params"]
    state = step_lib.TrainState.create(params, tx)
    inputs, labels = jnp.asarray(mnist.train_inputs[:256]), jnp.asarray(mnist.train_labels[:256])
    perm, key = jnp.arange(256, dtype=jnp.int32), jax.random.key(3)
    step_fn = functools.partial(step_lib.train_step, apply_fn=model.apply, tx=tx)
    group = step_lib.make_train_steps(step_fn, batch_size=64, batch_sharding=None, unroll=unroll, step_key=key)
    _, sums = jax.jit(group)(state, inputs, labels, perm, np.int32(0), np.int32(4))
    one = jax.jit(step_fn)
    losses = []
    for i in range(4):
        batch = {"inputs": inputs[64 * i:64 * (i + 1)], "labels": labels[64 * i:64 * (i + 1)]}
        state, last = one(state, batch, jax.random.fold_in(key, state.step))
        losses.append(float(last["loss"]))
    np.testing.assert_allclose(float(sums["loss"]), sum(losses), rtol=1e-5)
    for name in step_lib.LAST_OF_GROUP:
        assert float(last[name]) > 0
        np.testing.assert_allclose(float(sums[name]), float(last[name]), rtol=1e-5)
    jaxpr = str(jax.make_jaxpr(group)(state, inputs, labels, perm, np.int32(0), np.int32(4)))
    assert ("cond[" in jaxpr) == (unroll is None)  # unrolled: the norms are traced for the last step only

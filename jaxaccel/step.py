"""The pure training and evaluation steps, and the groups of steps one compiled call runs.

``train_step(state, batch, rng) -> (state, measurements)`` is one optimizer step and knows nothing about
devices. :func:`make_train_steps` wraps it into one compiled call that runs several steps with the
whole dataset already on the device: each batch is gathered on device from the epoch's permutation,
so there is no host round trip per step, and the train state is donated so XLA updates it in place.

How the steps of one call are compiled is a measured choice (see benchmarks/README.md): a device
loop (``device_loop``, a ``lax.fori_loop``; one compile serves any number of steps) or an unrolled block (``unroll``; XLA:CPU
runs convolutions much faster outside loop bodies).
"""
from __future__ import annotations

from typing import Any, Callable

import chex
import flax
import jax
import jax.numpy as jnp
import optax

from jaxaccel import augment as augment_lib
from jaxaccel import precision as prec

__all__ = ["TrainState", "cross_entropy", "train_step", "eval_step", "make_train_steps", "make_eval",
           "combine_measurements"]

Measurements = dict[str, jax.Array]
# Measurements a step group reduces by maximum rather than by sum.
_MAX_OVER_GROUP = ("nonfinite_run",)
# Measurements taken at the last step of a group only (big_vision logs them at its log steps):
# three more passes over the parameters each step cost 1.5x LeNet's epoch on CPU (benchmarks/README).
LAST_OF_GROUP = ("grad_norm", "update_norm", "param_norm")


def combine_measurements(a: Measurements, b: Measurements) -> Measurements:
    """The measurements of two runs of steps (``b`` after ``a``) as one: sums; maxima for the
    longest run of consecutive non-finite steps (so it does not depend on where a group ends);
    ``b``'s for the norms measured at a group's last step."""
    return {k: jnp.maximum(a[k], b[k]) if k in _MAX_OVER_GROUP else b[k] if k in LAST_OF_GROUP else a[k] + b[k]
            for k in a}


@flax.struct.dataclass
class TrainState:
    """Everything a step changes, as a plain pytree: the step count, the parameters, the optimizer
    state and the model's other variables (e.g. batch statistics; empty for most models). The
    model's apply function and the optimizer are not in it: the step is bound to them."""
    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any = flax.struct.field(default_factory=dict)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, model_state: Any = None) -> "TrainState":
        return cls(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                   model_state=dict(model_state or {}))

    def variables(self, params: Any = None) -> dict[str, Any]:
        """The model's variables: ``params`` (default: the state's own) and the model state."""
        return {"params": self.params if params is None else params, **self.model_state}


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in f32 against (optionally smoothed) one-hot labels."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *, apply_fn: Callable,
               tx: optax.GradientTransformation, learning_rate: optax.Schedule | None = None,
               label_smoothing: float = 0.0, axis_name: str | None = None,
               penalty: Callable[[Any], jax.Array] | None = None, precision: Any = None,
               quant_start_step: int | None = None, augment: Any = None,
               measure_norms: bool | jax.Array = True) -> tuple[TrainState, Measurements]:
    """One optimizer step on ``batch`` ({"inputs": [B, ...], "labels": int32 [B]}).

    The model (``apply_fn``) and the optimizer (``tx``) are bound by the caller with
    ``functools.partial``. Inputs are uint8 images [B,H,W,C], int32 tokens [B,L] or int16 audio
    [B,T]; the model turns them into floats, so the dataset stays compact on the device.

    ``axis_name``: with explicit collectives, the device axis over which gradients and
    measurements are averaged (under jit with a sharded batch the compiler inserts that reduction
    itself), so the optimizer's finiteness check sees the reduced gradients on every replica.
    ``penalty``: a regularizer of the params added to the loss (L1 / group lasso for sparsity);
    the reported ``loss`` is the task loss, ``penalty`` is reported beside it.
    ``precision``: a PrecisionConfig whose ``include``-d params are cast for the forward pass.
    ``quant_start_step``: QAT models fake-quantize from this step on.
    ``augment``: an AugmentConfig; images are augmented with keys drawn from ``rng`` (folded with
    the device index under explicit collectives, so the devices' slices get different draws).
    The loss is multiplied by the loss scale found in the optimizer state (1 without scaling);
    the optimizer's loss-scaling wrapper unscales the gradients and skips non-finite steps, and a
    skipped step leaves the model state (batch statistics) unchanged as well.

    Returns the new state and big_vision-style measurements: loss, accuracy, L2 norms of the
    gradients, updates and parameters (zeros unless ``measure_norms``, a bool or a traced flag:
    step groups measure them at their last step only), the learning rate, the step's finiteness
    flags and the optimizer's count of consecutive non-finite steps after it.
    """
    chex.assert_rank(batch["labels"], 1)
    chex.assert_type(batch["labels"], jnp.int32)
    inputs = batch["inputs"]
    if inputs.dtype not in (jnp.uint8, jnp.int32, jnp.int16):
        raise TypeError(f"inputs must be uint8 images, int32 tokens or int16 audio, got {inputs.dtype}")
    if augment is not None and augment.enabled:
        key = jax.random.fold_in(rng, jax.lax.axis_index(axis_name)) if axis_name is not None else rng
        inputs = augment_lib.augment(augment, key, inputs)
    model_kwargs = {} if quant_start_step is None else {"quant_enabled": state.step >= quant_start_step}
    if getattr(apply_fn, "takes_rng", False):  # user models (models.custom): dropout keys, train mode
        dropout = jax.random.fold_in(rng, 1)
        model_kwargs["rng"] = (jax.random.fold_in(dropout, jax.lax.axis_index(axis_name)) if axis_name is not None
                               else dropout)
    mutable = list(state.model_state)

    def loss_fn(params):
        compute_params = prec.cast_params(params, precision) if precision is not None else params
        out = apply_fn(state.variables(compute_params), inputs, **model_kwargs, **({"mutable": mutable} if mutable else {}))
        logits, model_state = out if mutable else (out, state.model_state)
        chex.assert_shape(logits, (inputs.shape[0], None))
        loss = cross_entropy(logits, batch["labels"], label_smoothing).mean()
        extra = penalty(params) if penalty is not None else jnp.zeros((), jnp.float32)
        return prec.scale_loss(loss + extra, state.opt_state), (loss, extra, logits, model_state)

    (_, (loss, extra, logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    measurements = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"])}
    if penalty is not None:
        measurements["penalty"] = extra
    if axis_name is not None:
        grads, measurements, model_state = jax.lax.pmean((grads, measurements, model_state), axis_name)
    finite = jnp.isfinite(measurements["loss"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The optimizer's own verdict (its consecutive-skip counter is reset by every applied step):
    # a step can be skipped for non-finite gradients even when its loss is finite.
    skipped = prec.nonfinite_steps(opt_state) > 0
    model_state = jax.tree.map(lambda new, old: jnp.where(skipped, old, new), model_state, state.model_state)
    measurements |= _norms(grads, state.params, params, measure_norms)
    if learning_rate is not None:
        measurements["learning_rate"] = jnp.asarray(learning_rate(state.step), jnp.float32)
    # Non-finite steps are left out of the sums (the loop averages over finite steps).
    measurements = {k: jnp.where(finite, v, 0.0).astype(jnp.float32) for k, v in measurements.items()}
    measurements |= {"finite_steps": finite.astype(jnp.float32), "skipped_steps": skipped.astype(jnp.float32),
                     "nonfinite_run": prec.nonfinite_steps(opt_state).astype(jnp.float32)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state), measurements


def _norms(grads: Any, old_params: Any, params: Any, measure: bool | jax.Array) -> Measurements:
    """L2 norms of the gradients, the applied update (``params - old_params``) and the parameters;
    zeros where ``measure`` is false. The update is taken from the parameters, which the step keeps
    anyway: asking for the optimizer's ``updates`` would make XLA write them out every step."""
    def norms(trees):
        grads, old, new = trees
        update = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), new, old)
        return dict(zip(LAST_OF_GROUP, (optax.tree.norm(t).astype(jnp.float32) for t in (grads, update, new))))

    zeros = {k: jnp.zeros((), jnp.float32) for k in LAST_OF_GROUP}
    if isinstance(measure, bool):
        return norms((grads, old_params, params)) if measure else zeros
    return jax.lax.cond(measure, norms, lambda trees: zeros, (grads, old_params, params))


def eval_step(variables: Any, apply_fn: Callable, inputs: jax.Array, labels: jax.Array,
              weights: jax.Array) -> Measurements:
    """Sums of loss and correct predictions over the examples with weight 1 (padding has 0)."""
    logits = apply_fn(variables, inputs)
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
                     step_key: jax.Array, axis_name: str | None = None, trip_count: int | None = None,
                     streamed: bool = False) -> Callable:
    """A jittable ``(state, inputs, labels, perm, position, count) -> (state, measurement sums)``.

    Runs ``count`` steps starting at batch ``position`` of the epoch whose order is ``perm``.
    ``unroll=None``: a device loop, ``count`` may vary without recompiling, unless ``trip_count``
    compiles the loop's length in (``count`` must then equal it); such a loop takes the sums to
    add its measurements to as one more argument, so a group run as several calls (see
    ``Plan.call_lengths``) sums them in the order one loop would; ``initial_sums(state, *data,
    position)``, an attribute of the returned function, gives the zeros to start a group with.
    ``unroll=K``: K steps unrolled, ``count`` must equal K. The step's RNG is
    ``fold_in(step_key, state.step)``, so a step's randomness depends only on (seed, step), however
    the steps are grouped or resumed.

    ``streamed=True`` (the streaming pipeline): ``(state, inputs, labels, position, count)``, the
    call's batches passed in, stacked ``[n, B, ...]`` (pmap: ``[n, B / devices, ...]`` per device);
    step i takes batch ``position + i`` of the stack.
    """
    def batch_at(data, position):
        if not streamed:
            inputs, labels, perm = data
            return _slice_batch((inputs, labels), perm, position, batch_size, batch_sharding, axis_name)
        batch = tuple(jax.lax.dynamic_index_in_dim(a, position, keepdims=False) for a in data)
        return jax.lax.with_sharding_constraint(batch, batch_sharding) if batch_sharding is not None else batch

    def one_step(state, data, position, last=True):
        batch = batch_at(data, position)
        return step_fn(state, dict(zip(("inputs", "labels"), batch)), jax.random.fold_in(step_key, state.step),
                       measure_norms=last)

    def initial_sums(state, *args):
        *data, position = args
        shapes = jax.eval_shape(lambda: one_step(state, data, position)[1])
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def run(state, *args):
        if trip_count is None:
            *data, position, count = args
            sums = initial_sums(state, *data, position)
        else:
            *data, position, count, sums = args
        if unroll is None:
            steps = count if trip_count is None else trip_count

            def body(i, carry):
                state, sums = carry
                state, measurements = one_step(state, data, position + i, last=i == steps - 1)
                return state, combine_measurements(sums, measurements)
            return jax.lax.fori_loop(0, steps, body, (state, sums))
        for i in range(unroll):  # a Python loop: XLA sees one straight-line block
            state, measurements = one_step(state, data, position + i, last=i == unroll - 1)
            sums = combine_measurements(sums, measurements)
        return state, sums

    run.initial_sums = initial_sums
    return run


def make_eval(apply_fn: Callable, batch_size: int, batch_sharding: Any, axis_name: str | None = None) -> Callable:
    """A ``(variables, inputs, labels, weights, index) -> measurement sums`` over batch ``index``.

    The split is padded to a whole number of batches (padding weighted 0). The loop calls it once
    per batch rather than looping on device, which is slow for convolutions on CPU.
    """
    def one(variables, inputs, labels, weights, index):
        batch = _slice_batch((inputs, labels, weights), jnp.arange(inputs.shape[0]), index, batch_size,
                             batch_sharding, axis_name)
        sums = eval_step(variables, apply_fn, *batch)
        return sums if axis_name is None else jax.lax.psum(sums, axis_name)

    return one

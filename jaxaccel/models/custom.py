"""Models this project does not define: ``model.name=package.module:Attribute``, or the object
passed to ``jaxaccel.train(cfg, model=...)``.

The attribute (or object) is a Flax linen module class, instance or factory, or an NNX module
class, instance or factory. Classes and factories are called with ``num_classes`` (and ``rngs`` for
NNX) when they take them, plus ``model.kwargs``. The code is imported only when the run is built
(:meth:`ImportedModelConfig.build`), never when a config, checkpoint or export is read.

:class:`UserModel` puts such a model behind the interface the trainer, evaluation and export use
for our own linen models: ``init(key, x) -> {"params": ..., <model state>...}`` and a pure
``apply(variables, x, mutable=..., rng=...)``. For NNX, ``nnx.split``/``nnx.merge`` turn the module
into that: ``nnx.Param`` leaves are the params, every other Variable (``nnx.BatchStat``, ...) is the
model state ``{"state": ...}``, and RNG streams (dropout) are reseeded from the step's key on every
call, so a step's randomness depends only on (seed, step). Tree keys are strings (``layers/0/kernel``).

Conventions the adapter applies:

- Images (uint8) reach the model as float32 in [0, 1], NHWC (as in Flax's examples), unless the
  model has ``raw_inputs = True`` (an attribute, or a field set through ``model.kwargs``).
- Train or evaluate: a linen ``__call__`` argument named ``train``/``training``/``is_training``
  (True when training) or ``deterministic``/``use_running_average`` (False when training);
  NNX models get ``.train()`` / ``.eval()``.
- Convolutions: with ``model.conv=im2col`` (the CPU default) every plain ``nn.Conv`` /
  ``nnx.Conv`` runs as :func:`jaxaccel.models.layers.im2col_conv`, our own CNNs' lowering (same
  parameters, same results up to float rounding).
- Precision and QAT go through :func:`wrap_apply`: the model's ``dot_general``, convolution and
  ``einsum`` calls are intercepted (``jaxaccel.precision.intercept``), the model is not edited.
"""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable, ClassVar, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax
from pydantic import Field, PrivateAttr

from jaxaccel.models.base import IMPORT_PATH, REGISTRY, ModelConfig
from jaxaccel.models.layers import im2col_conv, to_float
from jaxaccel.paths import nnx  # flax.nnx, imported on first use
from jaxaccel.schema import ConfigError

__all__ = ["ImportedModelConfig", "UserModel", "wrap_apply", "object_config", "resolve", "is_user_model"]

_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_TRUE_WHEN_TRAINING = ("train", "training", "is_training")
_FALSE_WHEN_TRAINING = ("deterministic", "use_running_average")


class ImportedModelConfig(ModelConfig):
    """Your own linen or NNX model, named by its import path (README: "Your own model")."""
    name: str = Field(..., pattern=_PATH.pattern,
                      description="package.module:Attribute of a linen/NNX module class, instance or factory.")
    kwargs: dict[str, Any] = Field({}, description="Keyword arguments of the class or factory.")
    conv: Literal["auto", "im2col", "xla"] = Field(
        "auto", description="Lowering of the model's plain nn.Conv/nnx.Conv layers, as for model.name=cnn.")
    source: Literal["import", "object"] = Field(
        "import", description="import: built by importing model.name; object: the object given to "
                              "jaxaccel.train(cfg, model=...) (never imported).")
    inputs: ClassVar[tuple[str, int, str]] = ("any", 0, "whatever the model takes")
    _object: Any = PrivateAttr(None)

    def input_problem(self, dtype: str, shape: tuple[int, ...], data: str = "the dataset") -> str | None:
        return None  # the user's model decides what it takes

    def build(self, num_classes: int, precision: Any = None, quant: Any = None) -> "UserModel":
        return UserModel(resolve(self), num_classes, kwargs=self.kwargs, conv=self.conv,
                         precision=precision, quant=quant, what=f"model.name={self.name}")


REGISTRY[IMPORT_PATH] = ImportedModelConfig


def object_config(obj: Any, kwargs: dict[str, Any] | None = None, conv: str = "auto") -> ImportedModelConfig:
    """The ``model`` section for an object passed to ``jaxaccel.train(cfg, model=obj)``: named by
    its qualified name (what config.json and model.json record), built from the object itself."""
    target = obj if isinstance(obj, type) or inspect.isfunction(obj) else getattr(obj, "func", type(obj))
    cfg = ImportedModelConfig(name=f"{target.__module__}:{target.__qualname__.replace('<locals>.', '')}",
                              kwargs=dict(kwargs or {}), conv=conv, source="object")
    cfg._object = obj
    return cfg


def resolve(cfg: ImportedModelConfig) -> Any:
    """The object ``cfg`` names: the one given to ``train`` (source=object), else imported."""
    if cfg._object is not None:
        return cfg._object
    if cfg.source == "object":
        raise ConfigError(f"model.name={cfg.name} was given as an object to jaxaccel.train(cfg, model=...): "
                          "pass the same object again (it is never imported)")
    module_name, attr = cfg.name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ConfigError(f"model.name={cfg.name}: cannot import {module_name} ({e}); install it or put "
                              "its directory on PYTHONPATH") from None
        raise
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model.name={cfg.name}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def wrap_apply(apply_fn: Callable, precision: Any, quant: Any) -> Callable:
    """A user model's forward pass with the run's precision policy and QAT: the model's
    ``dot_general``/``conv_general_dilated``/``einsum`` calls intercepted
    (:func:`jaxaccel.precision.intercept.wrap_apply`; the model itself is not edited).
    ``apply_fn(variables, inputs, mutable=..., rng=...)`` returns the logits, or ``(logits, new
    model state)`` when ``mutable`` names collections. ``precision`` is the run's PrecisionConfig
    or None, ``quant`` its QuantConfig or None (only ``mode=qat`` changes training). The result
    takes ``quant_enabled`` too unless it is ``apply_fn`` itself (nothing to intercept)."""
    from jaxaccel.precision import intercept
    if quant is not None and quant.mode != "qat":
        quant = None
    return intercept.wrap_apply(apply_fn, precision, quant)


def is_user_model(model: Any) -> bool:
    """Whether ``model`` is a :class:`UserModel` (as opposed to one of our linen modules)."""
    return isinstance(model, UserModel)


# ---------------------------------------------------------------------------------------------
# Construction.

def _accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` has a parameter called ``name`` (``**kwargs`` alone does not count: a factory
    is given only what it names)."""
    try:  # a class: its __init__ (NNX's metaclass hides it behind *args, **kwargs)
        return name in inspect.signature(fn.__init__ if isinstance(fn, type) else fn).parameters
    except (TypeError, ValueError):
        return False


def _call_with(fn: Callable, num_classes: int, kwargs: dict[str, Any], rngs: Any = None) -> Any:
    kw = dict(kwargs)
    if "num_classes" not in kw and _accepts(fn, "num_classes"):
        kw["num_classes"] = num_classes
    if rngs is not None and _accepts(fn, "rngs"):
        kw["rngs"] = rngs
    return fn(**kw)


def _is_nnx_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nnx.Module)


def _constructor(obj: Any, num_classes: int, kwargs: dict[str, Any], what: str) -> tuple[str, Any]:
    """("linen", module) or ("nnx", ctor(rngs) -> module | module instance)."""
    if isinstance(obj, (nn.Module, nnx.Module)) and kwargs:
        raise ConfigError(f"{what} is a module instance: model.kwargs={kwargs} cannot be applied to it")
    if isinstance(obj, nn.Module):
        return "linen", obj
    if isinstance(obj, nnx.Module):
        return "nnx", obj
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return "linen", _call_with(obj, num_classes, kwargs)
    if _is_nnx_class(obj) or (callable(obj) and _accepts(obj, "rngs") and not isinstance(obj, type)):
        return "nnx", lambda rngs: _call_with(obj, num_classes, kwargs, rngs)
    if callable(obj) and not isinstance(obj, type):
        made = _call_with(obj, num_classes, kwargs)
        if isinstance(made, (nn.Module, nnx.Module)):
            return _constructor(made, num_classes, {}, what)
        raise ConfigError(f"{what} returned {type(made).__name__}, not a Flax linen or NNX module")
    raise ConfigError(f"{what} is {obj!r}, not a Flax linen or NNX module class, instance or factory")


# ---------------------------------------------------------------------------------------------
# Pure trees of NNX state: nested dicts of arrays with string keys.

def _pure(state: nnx.State) -> dict[str, Any]:
    return traverse_util.unflatten_dict({tuple(map(str, p)): v.get_value()
                                         for p, v in nnx.to_flat_state(state)})


def _state(template: list[tuple[tuple, Any]], pure: dict[str, Any]) -> nnx.State:
    flat = traverse_util.flatten_dict(pure) if pure else {}
    return nnx.from_flat_state({p: v.copy(flat[tuple(map(str, p))]) for p, v in template})


def _fresh_rngs(template: list[tuple[tuple, Any]], key: jax.Array) -> nnx.State:
    """RNG stream variables with keys derived from ``key`` (one per stream) and counts at zero."""
    out = {}
    for i, (p, v) in enumerate(template):
        if isinstance(v, nnx.RngKey):
            k = jax.random.fold_in(key, i)
            shape = tuple(v.get_value().shape)
            out[p] = v.copy(jax.random.split(k, shape) if shape else k)
        else:
            out[p] = v.copy(jnp.zeros(v.get_value().shape, v.get_value().dtype))
    return nnx.from_flat_state(out)


def _lower_nnx_convs(module: nnx.Module) -> None:
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Conv) and node.conv_general_dilated is lax.conv_general_dilated \
                and _plain_conv(node.kernel_dilation, node.input_dilation, node.feature_group_count):
            node.conv_general_dilated = im2col_conv()


def _plain_conv(kernel_dilation: Any, input_dilation: Any, groups: int) -> bool:
    dilations = [d for d in (kernel_dilation, input_dilation) if d is not None]
    flat = [x for d in dilations for x in ((d,) if isinstance(d, int) else d)]
    return all(x == 1 for x in flat) and groups == 1


def _im2col_interceptor() -> Callable:
    """Route every plain linen ``nn.Conv`` to :func:`im2col_conv` (a clone run on the layer's own
    variables, so flax's padding and batch handling stay its own)."""
    depth = [0]

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if depth[0] or context.method_name != "__call__" or type(mod) is not nn.Conv \
                or mod.conv_general_dilated is not None or mod.conv_general_dilated_cls is not None \
                or not _plain_conv(mod.kernel_dilation, mod.input_dilation, mod.feature_group_count):
            return next_fun(*args, **kwargs)
        depth[0] += 1
        try:
            # lax.dot_general looked up now: inside a precision/QAT interception it is the intercepting one.
            return mod.clone(parent=None, conv_general_dilated=im2col_conv(lax.dot_general)).apply(
                dict(mod.variables), *args, **kwargs)
        finally:
            depth[0] -= 1

    return interceptor


# ---------------------------------------------------------------------------------------------
# The adapter.

class UserModel:
    """A user's linen or NNX model with the ``init``/``apply`` interface of our linen models.

    ``apply`` runs the model in training mode exactly when it is given the step's ``rng`` (the
    train step passes one; evaluation, export and the compression report do not): dropout on, batch
    statistics updated when ``mutable`` asks for them. ``bound_state``: model state (batch
    statistics) used where ``apply``'s variables hold only params (export, compression report).
    """

    def __init__(self, obj: Any, num_classes: int, *, kwargs: dict[str, Any] | None = None, conv: str = "xla",
                 precision: Any = None, quant: Any = None, what: str | None = None):
        self.num_classes, self.conv = num_classes, conv
        self.precision, self.quant = precision, quant
        self.what = what or f"model {getattr(obj, '__qualname__', type(obj).__qualname__)}"
        self.kind, made = _constructor(obj, num_classes, dict(kwargs or {}), self.what)
        self.bound_state: dict[str, Any] = {}
        if self.kind == "linen":
            self.module = made
            call = type(made).__call__
            self._mode_args = [a for a in (*_TRUE_WHEN_TRAINING, *_FALSE_WHEN_TRAINING) if _accepts(call, a)]
        else:
            self._ctor = made if callable(made) and not isinstance(made, nnx.Module) else None
            example = made if self._ctor is None else nnx.eval_shape(lambda: self._ctor(nnx.Rngs(0)))
            self.module = example
            self._graphdef, params, rngs, rest = nnx.split(example, nnx.Param, nnx.RngState, ...)
            self._templates = [list(nnx.to_flat_state(s)) for s in (params, rngs, rest)]
        self.raw_inputs = bool(getattr(self.module, "raw_inputs", False))

    # -- the interface ------------------------------------------------------------------------
    def bind_state(self, model_state: dict[str, Any]) -> "UserModel":
        """The same model with ``model_state`` used where ``apply`` is given params alone."""
        other = object.__new__(UserModel)
        other.__dict__.update(self.__dict__, bound_state=dict(model_state or {}))
        return other

    def with_quant(self, quant: Any) -> "UserModel":
        """The same model with ``quant`` (a QuantConfig; ``mode=qat`` fake-quantizes its ops)."""
        other = object.__new__(UserModel)
        other.__dict__.update(self.__dict__, quant=quant)
        return other

    def init(self, key: jax.Array, x: jax.Array) -> dict[str, Any]:
        """``{"params": ..., <model state>}``: fresh for a class or factory (from ``key``), the
        object's own values for an NNX instance."""
        if self.kind == "linen":
            init_key, dropout = jax.random.split(key)
            variables = self.module.init({"params": init_key, "dropout": dropout}, self._inputs(x),
                                         **self._mode(False))
            return dict(variables)
        module = self.module if self._ctor is None else self._ctor(nnx.Rngs(key))
        _, params, _, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
        rest = _pure(rest)
        return {"params": _pure(params), **({"state": rest} if rest else {})}

    def apply(self, variables: dict[str, Any], x: jax.Array, *, mutable: Any = False, rng: jax.Array | None = None,
              quant_enabled: Any = True) -> Any:
        """Logits of ``x``; ``(logits, new model state)`` when ``mutable`` names collections."""
        variables = {**self.bound_state, **variables}
        base = self._apply_linen if self.kind == "linen" else self._apply_nnx
        run = wrap_apply(base, self.precision, self.quant)
        extra = {} if run is base else {"quant_enabled": quant_enabled}
        return run(variables, self._inputs(x), mutable=mutable, rng=rng, **extra)

    apply.takes_rng = True  # the train step passes a dropout key (jaxaccel.step)

    # -- internals ----------------------------------------------------------------------------
    def _inputs(self, x: jax.Array) -> jax.Array:
        return to_float(x) if x.dtype == jnp.uint8 and not self.raw_inputs else x

    def _mode(self, training: bool) -> dict[str, bool]:
        return {a: training if a in _TRUE_WHEN_TRAINING else not training for a in self._mode_args}

    def _apply_linen(self, variables, x, mutable, rng):
        training = rng is not None
        kw = {"rngs": {"dropout": rng}} if training else {}
        if mutable:
            kw["mutable"] = mutable
        if self.conv != "im2col":
            return self.module.apply(variables, x, **self._mode(training), **kw)
        with nn.intercept_methods(_im2col_interceptor()):
            return self.module.apply(variables, x, **self._mode(training), **kw)

    def _apply_nnx(self, variables, x, mutable, rng):
        params_t, rngs_t, rest_t = self._templates
        if any(jnp.issubdtype(jnp.asarray(v).dtype, jnp.integer) for v in jax.tree.leaves(variables["params"])):
            raise NotImplementedError(f"{self.what}: int8 inference of NNX models needs the dot/conv "
                                      "interception (jaxaccel.intercept), not available yet")
        training = rng is not None
        model = nnx.merge(self._graphdef, _state(params_t, variables["params"]),
                          _fresh_rngs(rngs_t, rng if training else jax.random.key(0)),
                          _state(rest_t, variables.get("state", {})))
        model.train() if training else model.eval()
        if self.conv == "im2col":
            _lower_nnx_convs(model)
        if self.precision is not None or self.quant is not None:
            from jaxaccel.precision import intercept
            intercept.prepare_nnx(model)  # NNX layers hold jax's ops: point them at the interception
        logits = model(x)
        if not mutable:
            return logits
        rest = _pure(nnx.split(model, nnx.Param, nnx.RngState, ...)[3])
        return logits, ({"state": rest} if rest else {})

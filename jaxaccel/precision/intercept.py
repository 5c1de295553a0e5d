"""Precision and QAT for any Flax model (linen or NNX) without editing it.

:func:`wrap_apply` wraps a model's apply function so that, inside the modules chosen by regexes
over their paths, ``jax.lax.dot_general``, ``jax.lax.conv_general_dilated`` and ``jnp.einsum``
run as our own layers run them:

* precision: :func:`policy.dot_general` / :func:`policy.conv_general_dilated` (inputs cast to
  ``precision.compute``, accumulation in ``precision.accumulation``, the dot's narrow backward);
* QAT (``quant.mode=qat``): :func:`quant.quant_dot_general` / :func:`quant.quant_conv_general_dilated`
  (weight = the op's rhs / kernel / second einsum operand, per output channel; activation per
  tensor; straight-through gradients), gated by ``quant_enabled`` as our models are from
  ``quant.start``. Both compose as in our layers: quantize, then cast.

How (the design Qwix uses, narrowed; NOTES.md says why not Qwix itself): while a wrapped call
runs, the three public attributes ``jax.lax.dot_general``, ``jax.lax.conv_general_dilated`` and
``jax.numpy.einsum`` are dispatchers, restored when the last wrapped call in the process returns.
A dispatcher takes our op only in a thread that is inside a wrapped call, not already inside one
of our ops, and whose innermost running module (the nearest ``self`` on the Python stack below the
wrapped call: a bound linen module, or an NNX module) has a selected path. Everything else, other
threads included, gets jax's own function. Nothing of jax itself is rewritten: jax's internal
callers (``jnp.dot``, ``@``, ``jnp.einsum``'s own dot) never see the dispatchers.

Module paths are those of the parameter names (:mod:`jaxaccel.paths`) without the leaf:
``Conv_0``, ``Block_1/Dense_0`` (linen scope paths), ``layers/0`` (NNX attribute paths from
the outermost NNX module called); the top-level module is ``""``.

NNX layers keep the op they were built with (``nnx.Linear(dot_general=lax.dot_general)`` is bound
at construction), so an NNX model is passed through :func:`prepare_nnx` once, before it is split:
that points such attributes at the dispatchers (parameters untouched; outside a wrapped call the
model computes exactly what it did).

Limits: ops a module reaches another way are not intercepted (``x @ w``, ``jnp.dot``, an op
imported by name before the call, a linen field defaulting to ``lax.dot_general``); a function
jitted by the user *inside* the model keeps whatever its first trace decided.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaccel.paths import matches
from jaxaccel.paths import nnx  # flax.nnx, imported on first use
from jaxaccel.precision import policy
from jaxaccel.precision import quant as quant_ops
from jaxaccel.schema import ConfigError

if TYPE_CHECKING:  # annotations only: config.py imports the models, which import this package
    from jaxaccel.config import PrecisionConfig, QuantConfig

__all__ = ["wrap_apply", "scope", "prepare_nnx", "INTERCEPTED"]

# The intercepted functions: where each is patched, and jax's own function.
_TARGETS: dict[str, tuple[types.ModuleType, str]] = {
    "dot_general": (jax.lax, "dot_general"),
    "conv_general_dilated": (jax.lax, "conv_general_dilated"),
    "einsum": (jax.numpy, "einsum"),
}
_ORIGINAL: dict[str, Callable] = {kind: getattr(mod, attr) for kind, (mod, attr) in _TARGETS.items()}
INTERCEPTED: tuple[str, ...] = ("jax.lax.dot_general", "jax.lax.conv_general_dilated", "jax.numpy.einsum")

# Argument names of jax's dot and convolution, so that a positional call (e.g. the dimension
# numbers of a convolution passed by position) reaches our ops with the right meaning.
_SIGNATURES = {kind: inspect.signature(_ORIGINAL[kind]) for kind in ("dot_general", "conv_general_dilated")}


# ---------------------------------------------------------------------------------------------
# What is selected.

@dataclass(frozen=True)
class _Plan:
    """Which features apply to a module path: precision (None: nothing to do) and QAT (None: off)."""
    precision: Optional[PrecisionConfig]
    quant: Optional[QuantConfig]
    include: tuple[str, ...]
    exclude: tuple[str, ...]

    def features(self, path: str) -> tuple[bool, bool]:
        """(precision, QAT) for the ops of the module at ``path``."""
        if not matches(path, self.include, self.exclude):
            return False, False
        # The same tests as our layers (quant.layer_kwargs): the kernel's name for precision.include,
        # the layer's name for quant.include.
        on_precision = self.precision is not None and matches(f"{path}/kernel", self.precision.include)
        on_quant = self.quant is not None and matches(path, self.quant.include)
        return on_precision, on_quant


def _make_plan(precision: Optional[PrecisionConfig], quant_cfg: Optional[QuantConfig],
               include: Sequence[str], exclude: Sequence[str]) -> Optional[_Plan]:
    """The plan, or None when nothing would change (float32 compute and accumulation, no QAT)."""
    if precision is not None:
        pol = policy.Policy.from_config(precision)
        if pol.compute == jnp.float32 and pol.accumulation == jnp.float32:
            precision = None  # the policy's op would be jax's own
    if quant_cfg is not None and quant_cfg.mode != "qat":
        quant_cfg = None  # ptq quantizes after training; nothing runs differently while training
    if precision is None and quant_cfg is None:
        return None
    return _Plan(precision, quant_cfg, tuple(include), tuple(exclude))


# ---------------------------------------------------------------------------------------------
# Our ops for one (precision, QAT) choice.

def _einsum_weight_axes(subscripts: str, rhs_ndim: int) -> Optional[tuple[int, ...]]:
    """Axes of a two-operand einsum's second operand that appear in the output (its channels,
    as the non-contracted rhs axes of a dot); None for other einsums."""
    spec = subscripts.replace(" ", "")
    inputs, arrow, output = spec.partition("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    if not arrow:  # numpy's implicit output: the labels used once, and the broadcast dims
        letters = inputs.replace(",", "").replace(".", "")
        output = "..." + "".join(c for c in letters if letters.count(c) == 1)
    head, ellipsis, tail = terms[1].partition("...")
    broadcast = rhs_ndim - len(head) - len(tail) if ellipsis else 0
    labels = [*head, *["..."] * broadcast, *tail]  # "..." labels each broadcast dim
    return tuple(i for i, label in enumerate(labels) if label in output)


def _einsum_op(precision: Optional[PrecisionConfig], quant_cfg: Optional[QuantConfig],
               enabled: Union[bool, jax.Array]) -> Callable:
    """``jnp.einsum`` with QAT on its two operands (weight second) and the policy's dot inside."""
    dot = policy.dot_general(precision) if precision is not None else _ORIGINAL["dot_general"]

    def einsum(subscripts, *operands, _dot_general=None, **kw):
        if quant_cfg is not None and isinstance(subscripts, str) and len(operands) == 2:
            axes = _einsum_weight_axes(subscripts, jnp.ndim(operands[1]))
            if axes is not None:
                operands = quant_ops.fake_quant_operands(quant_cfg, *operands, axes, enabled)
        if precision is not None:  # cast first, so that einsum's result is in the compute dtype too
            compute = policy.DTYPES[precision.compute]
            operands = tuple(jnp.asarray(o).astype(compute) if jnp.issubdtype(jnp.result_type(o), jnp.floating)
                             else o for o in operands)
        if _dot_general in (None, _ORIGINAL["dot_general"], _DISPATCHERS["dot_general"]):
            _dot_general = dot  # a caller's own dot is kept
        return _ORIGINAL["einsum"](subscripts, *operands, _dot_general=_dot_general, **kw)

    return einsum


def _make_op(kind: str, precision: Optional[PrecisionConfig], quant_cfg: Optional[QuantConfig],
             enabled: Union[bool, jax.Array]) -> Callable:
    if kind == "einsum":
        return _einsum_op(precision, quant_cfg, enabled)
    if kind == "dot_general":
        op = policy.dot_general(precision) if precision is not None else _ORIGINAL[kind]
        return quant_ops.quant_dot_general(quant_cfg, op, enabled) if quant_cfg is not None else op
    op = policy.conv_general_dilated(precision) if precision is not None else _ORIGINAL[kind]
    return quant_ops.quant_conv_general_dilated(quant_cfg, op, enabled) if quant_cfg is not None else op


# ---------------------------------------------------------------------------------------------
# The active calls (per thread) and the module running now.

class _Scope:
    """One wrapped call in progress: its plan, QAT flag, where its stack starts, what it saw."""

    def __init__(self, plan: _Plan, enabled: Union[bool, jax.Array], boundary: Optional[types.FrameType]):
        self.plan, self.enabled, self.boundary = plan, enabled, boundary
        self.seen: dict[str, tuple[bool, bool]] = {}  # path of each module that called an op -> features
        self._ops: dict[tuple[str, bool, bool], Callable] = {}
        self._nnx_paths: dict[int, tuple[nnx.Module, dict[int, str]]] = {}

    def op(self, kind: str, path: str) -> Optional[Callable]:
        """Our op for ``kind`` in the module at ``path``, or None (jax's own)."""
        on_precision, on_quant = self.seen.setdefault(path, self.plan.features(path))
        if not (on_precision or on_quant):
            return None
        key = (kind, on_precision, on_quant)
        if key not in self._ops:  # one op object per choice: einsum's jit sees a stable _dot_general
            self._ops[key] = _make_op(kind, self.plan.precision if on_precision else None,
                                      self.plan.quant if on_quant else None, self.enabled)
        return self._ops[key]

    def module_path(self) -> Optional[str]:
        """Path of the innermost module running below the wrapped call (None: none is)."""
        nnx_modules = []
        frame = sys._getframe(1)
        while frame is not None and frame is not self.boundary:
            code = frame.f_code
            if code.co_argcount and code.co_varnames[0] == "self":
                owner = frame.f_locals.get("self")
                if isinstance(owner, nn.Module) and owner.scope is not None:
                    if not nnx_modules:
                        return "/".join(map(str, owner.scope.path))
                    break  # an NNX model inside a linen one (nnx.bridge): paths from the NNX model
                if isinstance(owner, nnx.Module) and (not nnx_modules or owner is not nnx_modules[-1]):
                    nnx_modules.append(owner)
            frame = frame.f_back
        return self._nnx_path(nnx_modules) if nnx_modules else None

    def _nnx_path(self, modules: list[nnx.Module]) -> Optional[str]:
        """Path of ``modules[0]`` from the outermost NNX module on the stack, ``modules[-1]``. A
        module not reachable from it (a copy made by a lifted transform) takes its nearest
        enclosing module's path."""
        root = modules[-1]
        cached = self._nnx_paths.get(id(root))
        if cached is None or cached[0] is not root:
            cached = self._nnx_paths[id(root)] = (
                root, {id(m): "/".join(map(str, p)) for p, m in nnx.iter_modules(root)})
        return next((cached[1][id(m)] for m in modules if id(m) in cached[1]), None)


class _Local(threading.local):
    def __init__(self) -> None:
        self.scopes: list[_Scope] = []  # wrapped calls in progress in this thread, innermost last
        self.busy = 0                   # > 0 while one of our ops runs: its own jax calls are jax's


_local = _Local()


def _dispatch(kind: str, args: tuple, kwargs: dict) -> Any:
    """Run our op for ``kind`` if this thread is in a wrapped call, in a selected module and not
    already inside one of our ops; jax's own function otherwise."""
    scope_ = _local.scopes[-1] if _local.scopes and not _local.busy else None
    path = scope_.module_path() if scope_ is not None else None
    op = scope_.op(kind, path) if path is not None else None
    if op is None:
        if kind == "einsum" and kwargs.get("_dot_general") is _DISPATCHERS["dot_general"]:
            # einsum's inner jit caches on its _dot_general: never let it cache a dispatcher's decision
            kwargs = {**kwargs, "_dot_general": _ORIGINAL["dot_general"]}
        return _ORIGINAL[kind](*args, **kwargs)
    if kind in _SIGNATURES:
        args, kwargs = _by_name(kind, args, kwargs)
    _local.busy += 1
    try:
        return op(*args, **kwargs)
    finally:
        _local.busy -= 1


def _by_name(kind: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(lhs, rhs), {every other argument by name}`` of a dot or convolution call, so that e.g. a
    convolution's dimension numbers given by position reach our op as ``dimension_numbers``."""
    bound = _SIGNATURES[kind].bind(*args, **kwargs).arguments
    lhs, rhs, *_ = bound.values()
    named = {k: v for k, v in list(bound.items())[2:] if k != "kwargs"}
    return (lhs, rhs), {**named, **bound.get("kwargs", {})}


def _dispatcher(kind: str) -> Callable:
    @functools.wraps(_ORIGINAL[kind])
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        return _dispatch(kind, args, kwargs)
    return dispatch


_DISPATCHERS: dict[str, Callable] = {kind: _dispatcher(kind) for kind in _TARGETS}


# ---------------------------------------------------------------------------------------------
# Installing the dispatchers for the duration of the wrapped calls.

_install_lock = threading.Lock()
_installed = {"count": 0, "saved": {}}


def _install() -> None:
    with _install_lock:
        if _installed["count"] == 0:
            for kind, (mod, attr) in _TARGETS.items():
                _installed["saved"][kind] = getattr(mod, attr)
                setattr(mod, attr, _DISPATCHERS[kind])
        _installed["count"] += 1


def _uninstall() -> None:
    with _install_lock:
        _installed["count"] -= 1
        if _installed["count"] == 0:
            for kind, (mod, attr) in _TARGETS.items():
                setattr(mod, attr, _installed["saved"].pop(kind))


@contextlib.contextmanager
def _active(plan: _Plan, enabled: Union[bool, jax.Array], boundary: Optional[types.FrameType]) -> Iterator[_Scope]:
    scope_ = _Scope(plan, enabled, boundary)
    _install()
    _local.scopes.append(scope_)
    try:
        yield scope_
    finally:
        _local.scopes.pop()
        _uninstall()


# ---------------------------------------------------------------------------------------------
# Public API.

def _check_selection(plan: _Plan, seen: dict[str, tuple[bool, bool]]) -> None:
    """A selection that intercepts nothing is a mistake (a typo, an unprepared NNX model), never a
    silent full-precision run: raise ConfigError naming what the model's modules are."""
    if not seen:
        raise ConfigError(
            f"precision/quant interception: the model called none of {', '.join(INTERCEPTED)} inside a module, "
            "so nothing would run in low precision or quantized. An NNX model must go through "
            "jaxaccel.precision.intercept.prepare_nnx(model) before it is split; `x @ w` and jnp.dot are not "
            "intercepted (use jax.lax.dot_general or jnp.einsum, or flax's layers)")
    paths = ", ".join(repr(p) for p in sorted(seen))
    for key, patterns in (("include", plan.include), ("quant.include", plan.quant.include if plan.quant else ())):
        for pattern in patterns:
            if not any(matches(p, [pattern]) for p in seen):
                raise ConfigError(f"{key}: {pattern!r} matches no module that calls {', '.join(INTERCEPTED)}; "
                                  f"such modules: {paths}")
    for name, index, cfg in (("precision", 0, plan.precision), ("quant", 1, plan.quant)):
        if cfg is not None and not any(features[index] for features in seen.values()):
            raise ConfigError(f"{name}: the include/exclude patterns select none of the modules that call "
                              f"{', '.join(INTERCEPTED)}: {paths}")


def _cast_output(out: Any, precision: Optional[PrecisionConfig], has_mutable: bool) -> Any:
    """The model output (the first element with ``mutable=``) in ``precision.output``, as our models' logits."""
    if precision is None:
        return out

    def cast(x):
        return policy.cast_output(x, precision) if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating) \
            else x

    if has_mutable and isinstance(out, tuple) and len(out) == 2:
        return cast(out[0]), out[1]
    return cast(out)


def wrap_apply(apply_fn: Callable, precision: Optional[PrecisionConfig] = None,
               quant: Optional[QuantConfig] = None, *, include: Sequence[str] = (".*",),
               exclude: Sequence[str] = ()) -> Callable:
    """``apply_fn`` with the precision policy and/or QAT applied inside the model's modules.

    ``apply_fn``: any function that runs the model: ``module.apply`` of a linen module, an
    ``apply(variables, x)`` that calls ``nnx.merge(graphdef, ...)(x)`` on a model prepared with
    :func:`prepare_nnx`, or ``lambda model, x: model(x)`` for a prepared NNX model.

    A module's ``jax.lax.dot_general``/``conv_general_dilated``/``jnp.einsum`` calls are changed when
    its path matches ``include`` and no ``exclude`` (``re.search``), and:

    * precision: ``f"{path}/kernel"`` matches ``precision.include`` (the test our layers use) and
      the policy is not float32 throughout: inputs in ``precision.compute``, accumulation in
      ``precision.accumulation``, result in ``precision.compute``; the output in ``precision.output``.
    * QAT: ``quant.mode == "qat"`` and ``path`` matches ``quant.include``: the op's rhs (a
      convolution's kernel, an einsum's second operand) fake-quantized per output channel, the
      lhs per tensor, straight-through gradients, exactly as our layers (``quant.layer_kwargs``).

    The returned function takes the same arguments plus ``quant_enabled`` (bool or traced bool,
    default True: the trainer passes ``step >= quant.start``), which it does not pass on.
    Parameters and their pytree are untouched (the step's ``cast_params`` does the params cast).
    With nothing to do (float32 policy, no QAT) ``apply_fn`` itself is returned. Our own models
    take the policy and QAT through their layers: they are not wrapped (their custom ops call
    ``lax.dot_general`` and would get ours on top).
    The first call raises :class:`~jaxaccel.schema.ConfigError` if the selection intercepts nothing
    or an ``include`` pattern matches no module that calls one of the ops.
    """
    plan = _make_plan(precision, quant, include, exclude)
    if plan is None:
        return apply_fn
    checked = []

    @functools.wraps(apply_fn)
    def apply(*args: Any, quant_enabled: Union[bool, jax.Array] = True, **kwargs: Any) -> Any:
        with _active(plan, quant_enabled, sys._getframe()) as scope_:
            out = apply_fn(*args, **kwargs)
        if not checked:
            _check_selection(plan, scope_.seen)
            checked.append(True)
        return _cast_output(out, plan.precision, bool(kwargs.get("mutable")))

    return apply


@contextlib.contextmanager
def scope(precision: Optional[PrecisionConfig] = None, quant: Optional[QuantConfig] = None, *,
          include: Sequence[str] = (".*",), exclude: Sequence[str] = (),
          quant_enabled: Union[bool, jax.Array] = True) -> Iterator[None]:
    """The interception of :func:`wrap_apply` for the module calls inside a ``with`` block, e.g.
    ``with scope(precision=cfg.precision): logits = model(x)`` in an NNX training step. Unlike
    :func:`wrap_apply` it neither checks the selection nor casts the output."""
    plan = _make_plan(precision, quant, include, exclude)
    if plan is None:
        yield
        return
    with _active(plan, quant_enabled, sys._getframe(2)):  # 2: the frame of the `with` statement
        yield


def prepare_nnx(model: nnx.Module) -> nnx.Module:
    """Point every attribute of ``model``'s modules that holds jax's own ``dot_general``,
    ``conv_general_dilated`` or ``jnp.einsum`` (``nnx.Linear``, ``nnx.Conv``, ``nnx.Einsum``, ...)
    at the interception's dispatchers, in place; returns ``model``. Call it before ``nnx.split``
    (outside any jax transform). Parameters are untouched, and outside :func:`wrap_apply` /
    :func:`scope` the dispatchers are jax's functions, so the model computes exactly as before."""
    for _, module in list(nnx.iter_modules(model)):
        for name, value in list(vars(module).items()):
            for kind, original in _ORIGINAL.items():
                if value is original:
                    setattr(module, name, _DISPATCHERS[kind])
    return model

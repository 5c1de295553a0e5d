"""The typed configuration schema and dotted ``key=value`` overrides.

Every run is described by one :class:`Config`. Experiments (``experiments/*.py``) give a nested dict
of the fields they change; the command line adds ``a.b=c`` overrides. Both go through
:func:`build_config`, so a typo in an experiment file and a typo on the command line get the same
error. Validation is pydantic's (unknown keys forbidden, types checked); this module only turns its
errors into one line that names the key, the value, what was expected and the closest valid key.

The plain sections (data, train, optim, ...) are declared in :mod:`jaxaccel.sections` and
re-exported here. Two sections are unions keyed on a name, each member declared next to the code it
configures:
``model`` on ``model.name`` (one class per model in ``jaxaccel/models/``) and ``sparsity`` on
``sparsity.method`` (``jaxaccel/sparsity/methods.py``). A field the chosen member does not declare
is refused, naming what it reads. Points in the run and periods (``sparsity.start``,
``quant.start``, ``optim.warmup``, ...) are durations (:mod:`jaxaccel.durations`): steps, epochs or
a fraction of the run, resolved to steps once the run's length is known.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from collections.abc import Hashable
from typing import Annotated, Any, Callable, Optional, Union

import pydantic
import yaml
from pydantic import BaseModel, Discriminator, Field, StrictInt, Tag

from jaxaccel.models import REGISTRY as MODELS
from jaxaccel.models import MLPConfig, ModelConfig, registry_key
from jaxaccel.schema import ConfigError, Section
from jaxaccel.sections import (AugmentConfig, CheckpointConfig, DataConfig, DistributedConfig, InitConfig,
                               LowRankConfig, OptimConfig, ParallelConfig, PrecisionConfig, QuantConfig, TrainConfig)
from jaxaccel.sparsity.methods import METHODS as SPARSITY_METHODS
from jaxaccel.sparsity.methods import NoSparsity, SparsityConfig

__all__ = [
    "Config", "ConfigError", "build_config", "parse_overrides", "apply_overrides", "valid_keys", "field_help",
    "field_info", "model_config", "sparsity_config", "from_saved", "ModelConfig", "SparsityConfig",
    "DataConfig", "TrainConfig", "OptimConfig", "AugmentConfig", "CheckpointConfig", "ParallelConfig",
    "DistributedConfig", "InitConfig", "PrecisionConfig", "QuantConfig", "LowRankConfig",
]

# ---------------------------------------------------------------------------------------------
# Sections keyed on a name.

@dataclasses.dataclass(frozen=True)
class _Union:
    """A section whose fields depend on one key (``model.name``, ``sparsity.method``)."""
    section: str
    key: str
    members: dict[str, type[Section]]  # key value -> its class
    default: str
    member_key: Callable[[Any], Any] = lambda value: value  # key value -> its members key

    def tag_of(self, value: Any) -> Any:
        """The members key of the key value ``value`` (a value YAML made a list or map: its text)."""
        key = self.member_key(value)
        return key if isinstance(key, Hashable) else str(key)

    def member(self, value: Any) -> type[Section] | None:
        """The class the key value ``value`` selects (None: none)."""
        return self.members.get(self.tag_of(value))

    def annotation(self) -> Any:
        def tag(value: Any) -> Any:
            raw = value.get(self.key, self.default) if isinstance(value, dict) else getattr(value, self.key, None)
            return self.tag_of(raw)
        return Annotated[Union[tuple(Annotated[cls, Tag(name)] for name, cls in self.members.items())],
                         Discriminator(tag)]

    def fields(self, cls: type[Section]) -> list[str]:
        return [f.alias or n for n, f in cls.model_fields.items() if n != self.key]

    def all_fields(self) -> list[str]:
        return list(dict.fromkeys(f for cls in self.members.values() for f in self.fields(cls)))


_UNIONS = {u.section: u for u in (_Union("model", "name", MODELS, "mlp", registry_key),
                                   _Union("sparsity", "method", SPARSITY_METHODS, "none"))}


class Config(Section):
    """The full, validated configuration of one run."""
    experiment: str = Field("", description="Registered experiment name (set by the registry).")
    workdir: Optional[str] = Field(None, description="Run directory; default runs/<experiment>.")
    seed: StrictInt = Field(0, ge=0, le=2 ** 32 - 1, description="Derives init, data order, dropout and augmentation keys (0 to 2^32-1).")
    data: DataConfig = DataConfig()
    model: _UNIONS["model"].annotation() = Field(default_factory=MLPConfig, description="Which model.")
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    parallel: ParallelConfig = ParallelConfig()
    distributed: DistributedConfig = DistributedConfig()
    init: InitConfig = InitConfig()
    sparsity: _UNIONS["sparsity"].annotation() = Field(default_factory=NoSparsity, description="Which sparsity method.")
    precision: PrecisionConfig = PrecisionConfig()
    quant: QuantConfig = QuantConfig()
    lowrank: LowRankConfig = LowRankConfig()

    @pydantic.model_validator(mode="after")
    def _lowrank_fits_model(self) -> "Config":
        from jaxaccel.lowrank import check_config, from_start_model  # it imports this module's sections
        check_config(self)
        if self.lowrank.from_start:
            # The factorized model is the model trained: config.json, checkpoints and the export name it.
            # Set in place (assignment would validate again); idempotent when a saved config is read back.
            self.__dict__["model"] = from_start_model(self.model, self.lowrank)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict with the public key names (``init.from``, not ``init.from_``)."""
        return self.model_dump(by_alias=True, mode="json")


def model_config(fields: dict[str, Any] | None = None, /, **kw: Any) -> ModelConfig:
    """The config object of one model from its fields (``{"name": "mlp", "features": [64]}``);
    ConfigError naming the key on a bad field."""
    return _member("model", {**(fields or {}), **kw})


def sparsity_config(fields: dict[str, Any] | None = None, /, **kw: Any) -> SparsityConfig:
    """The sparsity section of one method from its fields (``method="magnitude", target=0.9``)."""
    return _member("sparsity", {**(fields or {}), **kw})


# Keys renamed since earlier versions wrote them into files (exports' model.json).
_RENAMED = {"quant": {"start_step": "start"}, "optim": {"warmup_steps": "warmup"},
            "sparsity": {"start_step": "start", "end_step": "end", "threshold_step": "threshold_at"}}


def from_saved(section: str, fields: dict[str, Any]) -> Section:
    """The ``section`` (model, precision, quant, ...) from a dict a run wrote to a file, also by an
    earlier version: renamed keys are mapped (a null meant the default) and, for a model, the
    fields it does not read are dropped (earlier versions stored every model field)."""
    fields = dict(fields)
    for old, new in _RENAMED.get(section, {}).items():
        if old in fields:
            value = fields.pop(old)
            if value is not None:
                fields[new] = value
    if section in _UNIONS:
        union = _UNIONS[section]
        chosen = union.member(fields.get(union.key, union.default))
        if chosen is not None:
            fields = {k: v for k, v in fields.items() if k == union.key or k in union.fields(chosen)}
        return _member(section, fields)
    cls = Config.model_fields[section].annotation
    try:
        return cls.model_validate(fields)
    except pydantic.ValidationError as e:
        raise ConfigError("; ".join(_describe_all(e.errors()))) from None


class _One(BaseModel):
    model: _UNIONS["model"].annotation() = Field(default_factory=MLPConfig)
    sparsity: _UNIONS["sparsity"].annotation() = Field(default_factory=NoSparsity)


def _member(section: str, fields: dict[str, Any]) -> Any:
    try:
        return getattr(_One.model_validate({section: fields}), section)
    except pydantic.ValidationError as e:
        raise ConfigError("; ".join(_describe_all(e.errors()))) from None


# ---------------------------------------------------------------------------------------------
# Overrides.

class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; accept it as a float like YAML 1.2 and OmegaConf do."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """Parse one override value as a YAML scalar or list (`true`, `3`, `1e-3`, `[2,4]`, `null`)."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value {text!r} as YAML: {str(e).splitlines()[0]}") from None


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=c", ...]`` -> ``[("a.b", parsed c), ...]``."""
    pairs = []
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"expected key=value, got {arg!r} (e.g. train.epochs=3)")
        pairs.append((key, parse_value(text)))
    return pairs


def _keys_of(model: type[BaseModel], prefix: str) -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        sub = field.annotation
        if key in _UNIONS:
            union = _UNIONS[key]
            keys += [f"{key}.{union.key}"] + [f"{key}.{f}" for f in union.all_fields()]
        elif isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += _keys_of(sub, key + ".")
        else:
            keys.append(key)
    return keys


def valid_keys() -> list[str]:
    """Every dotted leaf key the schema accepts, e.g. ``train.epochs`` (for ``model`` and
    ``sparsity``: the fields of every model and method)."""
    return _keys_of(Config, "")


def field_info(key: str) -> Any:
    """The pydantic FieldInfo of a dotted key (of the first model or method that has it), or None."""
    section, _, rest = key.partition(".")
    if section in _UNIONS and rest:
        union = _UNIONS[section]
        for cls in union.members.values():
            for name, field in cls.model_fields.items():
                if (field.alias or name) == rest:
                    return field
        return None
    model: Any = Config
    field = None
    for part in key.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return None
        model = field.annotation
    return field


def _closest(key: str) -> str:
    keys = valid_keys()
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
    # A wrong section with a right leaf (trian.epochs) or a right section with a typo'd leaf.
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) == 1:
        return same_leaf[0]
    # An abbreviation by initials: optim.lr -> optim.learning_rate.
    section = key.rsplit(".", 1)[0] if "." in key else ""
    initials = [k for k in keys if k.rsplit(".", 1)[0] == section and "_" in k
                and "".join(w[0] for w in k.rsplit(".", 1)[-1].split("_")) == leaf]
    return initials[0] if len(initials) == 1 else match[0]


def apply_overrides(tree: dict[str, Any], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); validation happens in :func:`build_config`.

    Switching ``model.name`` or ``sparsity.method`` drops the fields of that section which the
    new model or method does not read, unless they are among ``pairs`` (those are then refused
    by validation): ``exp=mnist_mlp model.name=cnn`` leaves mnist_mlp's ``features`` behind."""
    tree = copy.deepcopy(tree)
    keys = valid_keys()
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    for key, value in pairs:
        if key not in keys and key not in sections:
            raise ConfigError(f"unknown config key {key!r}; did you mean {_closest(key)}?")
        node = tree
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(f"unknown config key {key!r}: {prefix!r} is a value, not a section; "
                                  f"did you mean {_closest(key)}?")
            node = child
        node[parts[-1]] = value
    for union in _UNIONS.values():
        node = tree.get(union.section)
        chosen = union.member(node.get(union.key)) if isinstance(node, dict) else None
        if chosen is None or all(k != f"{union.section}.{union.key}" for k, _ in pairs):
            continue
        given = {k.split(".", 2)[1] for k, _ in pairs if k.startswith(union.section + ".")}
        keep = set(union.fields(chosen)) | given | {union.key}
        for name in [n for n in node if n not in keep]:
            del node[name]
    return tree


def _split(loc: tuple[Any, ...]) -> tuple[str, str | None]:
    """The dotted key of an error location (list entries as ``key[i]``), and the union member it
    is in (None outside unions)."""
    parts = list(loc)
    member = None
    if len(parts) > 1 and parts[0] in _UNIONS and parts[1] in _UNIONS[parts[0]].members:
        member = parts.pop(1)
    key = ""
    for part in parts:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key, member


def _describe_all(errors: list[dict[str, Any]]) -> list[str]:
    """One message per error; a union member's unknown fields are grouped into one message."""
    out, unread = [], {}
    for error in errors:
        key, member = _split(error["loc"])
        section, _, leaf = key.partition(".")
        if error["type"] == "extra_forbidden" and member and leaf in _UNIONS[section].all_fields():
            unread.setdefault((section, member), []).append(key)
            continue
        out.append(_describe(error, key))
    for (section, member), keys in unread.items():
        union = _UNIONS[section]
        reads = sorted(union.fields(union.members[member]))
        out.append(f"{', '.join(keys)} {'does' if len(keys) == 1 else 'do'} nothing for {section}.{union.key}={member} "
                   f"(it reads {', '.join(reads) if reads else 'nothing else'}): remove "
                   f"{'it' if len(keys) == 1 else 'them'} or choose another {section}.{union.key}")
    return out


def _describe(error: dict[str, Any], key: str) -> str:
    if error["type"] == "extra_forbidden":
        return f"unknown config key {key!r}; did you mean {_closest(key)}?"
    if error["type"] == "union_tag_invalid":
        union = _UNIONS[key]
        tag = error["ctx"]["tag"]
        close = difflib.get_close_matches(str(tag), list(union.members), n=1)
        return (f"{key}.{union.key}={tag!r} is invalid: choose one of {', '.join(union.members)}"
                + (f" (did you mean {close[0]}?)" if close else ""))
    if error["type"] == "value_error":  # a section's cross-field check: its message says it all
        message = error["msg"].removeprefix("Value error, ")
        return f"{key}: {message}" if key else message  # no key: a check across sections
    return f"{key}={error['input']!r} is invalid: {error['msg']} (see `python -m jaxaccel.run --help`)"


def build_config(tree: dict[str, Any]) -> Config:
    """Validate a nested dict into a :class:`Config`, or raise :class:`ConfigError` naming the key."""
    try:
        return Config.model_validate(tree)
    except pydantic.ValidationError as e:
        raise ConfigError("; ".join(_describe_all(e.errors()))) from None


def field_help() -> str:
    """One line per key with its default and description, for ``--help``; the ``model`` and
    ``sparsity`` keys grouped by the model or method that reads them."""
    lines = []

    def line(key: str, value: Any, field: Any, indent: str = "  ") -> None:
        desc = f"  {field.description}" if field.description else ""
        lines.append(f"{indent}{key}={value!r}{desc}")

    def walk(model: type[BaseModel], instance: BaseModel, prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = prefix + (field.alias or name)
            value = getattr(instance, name)
            if key in _UNIONS:
                union(_UNIONS[key], value)
            elif isinstance(value, BaseModel):
                walk(type(value), value, key + ".")
            else:
                line(key, value, field)

    def union(u: _Union, default: BaseModel) -> None:
        by_class: dict[type, list[str]] = {}
        for name, cls in u.members.items():
            by_class.setdefault(cls, []).append(name)
        common = [f for f in u.fields(type(default)) if all(f in u.fields(cls) for cls in by_class)]
        lines.append(f"  {u.section}.{u.key}={getattr(default, u.key)!r}  one of {', '.join(u.members)}; "
                     + ("every one reads:" if common else "each reads its own fields:"))
        for field in common:
            name = next(n for n, f in type(default).model_fields.items() if (f.alias or n) == field)
            line(f"{u.section}.{field}", getattr(default, name), type(default).model_fields[name], "      ")
        for cls, names in by_class.items():
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            lines.append(f"    {u.section}.{u.key}={'|'.join(names)}: {doc}")
            for name, field in cls.model_fields.items():
                public = field.alias or name
                if name != u.key and public not in common:
                    line(f"{u.section}.{public}", field.get_default(call_default_factory=True), field, "      ")

    walk(Config, Config(), "")
    return "\n".join(lines)

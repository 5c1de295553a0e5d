"""The typed configuration schema and dotted ``key=value`` overrides.

Every run is described by one :class:`Config`. Experiments (``experiments/*.py``) give a nested dict
of the fields they change; the command line adds ``a.b=c`` overrides. Both go through
:func:`build_config`, so a typo in an experiment file and a typo on the command line get the same
error. Validation is pydantic's (unknown keys forbidden, types checked); this module only turns its
errors into one line that names the key, the value, what was expected and the closest valid key.
"""
from __future__ import annotations

import copy
import difflib
import re
from typing import Any, Literal, Optional

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt

__all__ = [
    "Config", "ConfigError", "build_config", "parse_overrides", "apply_overrides", "valid_keys",
]


class ConfigError(ValueError):
    """A config or command-line problem the user can fix; the CLI prints it and exits 2."""


class _Section(BaseModel):
    # extra="forbid": an unknown key is an error, never silently ignored.
    # coerce_numbers_to_str: `workdir=2024` is a string, as the user meant.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              coerce_numbers_to_str=True)


class DataConfig(_Section):
    name: str = Field("mnist", description="TFDS dataset name (mnist, fashion_mnist, cifar10, ag_news_subset, "
                                           "imdb_reviews, speech_commands).")
    dir: Optional[str] = Field(None, description="TFDS data dir; default $TFDS_DATA_DIR, else TFDS's default.")
    cache_dir: Optional[str] = Field(
        None, description="Where decoded arrays are cached; default $JAXACCEL_CACHE_DIR or ~/.cache/jaxaccel.")
    max_length: Optional[StrictInt] = Field(
        None, ge=1, description="Text: tokens per example (default 128); audio: samples per example "
                                "(default 16000, 1 s at 16 kHz). Longer inputs are cut, shorter padded with 0.")
    # The input pipeline (jaxaccel.streaming, jaxaccel.feed).
    pipeline: Literal["auto", "resident", "stream"] = Field(
        "auto", description="resident: the decoded splits cached on disk and held on every device (fastest when "
                            "they fit); stream: records read and decoded on the fly by Grain, each process only its "
                            "rows of every batch; auto: resident when the decoded splits fit "
                            "data.device_budget_bytes, else stream. Both give the same losses and parameters.")
    device_budget_bytes: Optional[StrictInt] = Field(
        None, ge=1, description="Device memory a resident dataset may take (per device); null = a per-backend "
                                "default (40% of an accelerator's memory; a quarter of host RAM over the CPU devices).")
    workers: Optional[StrictInt] = Field(
        None, ge=1, description="stream: decoding threads per process (Grain ReadOptions); null = the CPU count, at most 16.")
    worker_processes: StrictInt = Field(
        0, ge=0, description="stream: Grain worker processes per process (each with data.workers threads); 0 = "
                             "threads in the training process only.")


class ModelConfig(_Section):
    name: Literal["mlp", "cnn", "small_cnn", "resnet", "text_cnn", "kws_cnn"] = Field(
        "mlp", description="Architecture: mlp (LeNet-300-100 style), cnn (flax example CNN), small_cnn "
                           "(3x3 convs of `channels` widths, each relu + 2x2 pool, then dense layers), resnet "
                           "(CIFAR ResNet-6n+2), text_cnn (token conv encoder), kws_cnn (log-mel + conv, keyword spotting).")
    features: list[StrictInt] = Field([300, 100], description="Hidden dense widths of the MLP and of small_cnn.")
    channels: list[StrictInt] = Field([16, 32], min_length=1, description="Conv widths of small_cnn.")
    pool: Literal["avg", "max"] = Field("avg", description="2x2 pooling after each conv of small_cnn.")
    crop: Optional[StrictInt] = Field(
        None, ge=1, description="small_cnn: the central crop x crop pixels of each image are its input (part of "
                                "the model, so it still takes full images; MNIST digits lie in the central ~20x20).")
    conv: Literal["auto", "im2col", "xla"] = Field(
        "auto", description="How convolutions of cnn/small_cnn are lowered: im2col (patches as shifted slices + "
                            "one dot; measured fastest on XLA:CPU, also inside a device loop), xla (lax.conv: "
                            "cuDNN/MXU convolutions on accelerators) or auto (im2col on CPU, xla elsewhere).")
    width: StrictInt = Field(16, ge=1, description="resnet/text_cnn/kws_cnn: channels of the first stage.")
    depth: StrictInt = Field(3, ge=1, description="resnet: residual blocks per stage (3: ResNet-20); "
                                                  "text_cnn/kws_cnn: conv layers.")
    vocab_size: StrictInt = Field(32768, ge=16, description="text: hashed word vocabulary of the tokenizer "
                                                            "(the embedding's rows).")

    @pydantic.model_validator(mode="after")
    def _fields_of_this_model(self) -> "ModelConfig":
        """A field the chosen architecture does not read may not differ from its default: it would
        silently do nothing."""
        unused = [f for f in type(self).model_fields if f != "name" and f not in _MODEL_FIELDS[self.name]
                  and getattr(self, f) != type(self).model_fields[f].default]
        if unused:
            raise ValueError(f"{', '.join(f'model.{f}' for f in unused)} {'does' if len(unused) == 1 else 'do'} "
                             f"nothing for model.name={self.name} "
                             f"(it reads {', '.join(sorted(_MODEL_FIELDS[self.name]))}): remove it or choose "
                             f"another model")
        return self


# The ModelConfig fields each architecture reads (models.build_model).
_MODEL_FIELDS = {
    "mlp": {"features"}, "cnn": {"conv"}, "small_cnn": {"channels", "features", "pool", "crop", "conv"},
    "resnet": {"width", "depth"}, "text_cnn": {"width", "depth", "vocab_size"}, "kws_cnn": {"width", "depth"},
}


class TrainConfig(_Section):
    epochs: StrictInt = Field(10, ge=1, description="Training length in epochs (ignored when steps is set).")
    steps: Optional[StrictInt] = Field(None, ge=1, description="Training length in steps; overrides epochs.")
    batch_size: StrictInt = Field(128, ge=1, description="Global batch size.")
    eval_batch_size: StrictInt = Field(1000, ge=1, description="Batch size for evaluation.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the cross-entropy targets.")
    steps_per_call: Optional[StrictInt] = Field(
        None, ge=1, description="Training steps per compiled call; null = the measured default for model and backend.")
    loop: Literal["auto", "device_loop", "unroll"] = Field(
        "auto", description="How steps_per_call steps are compiled: a device loop (lax.fori_loop) or unrolled; auto = the measured default for model and backend.")
    log_every_steps: StrictInt = Field(100, ge=1, description="Period of training lines in metrics.jsonl.")
    tensorboard: Optional[bool] = Field(
        None, description="TensorBoard event files beside metrics.jsonl: null = when tensorboardX is installed, true = required, false = never.")


class OptimConfig(_Section):
    name: Literal["sgd", "momentum", "nesterov", "adam", "adamw"] = "adam"
    learning_rate: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    schedule: Literal["constant", "cosine", "warmup_cosine", "onecycle"] = "constant"
    warmup_steps: StrictInt = Field(0, ge=0, description="Linear warm-up steps (warmup_cosine).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Momentum of momentum/nesterov.")
    b1: float = Field(0.9, ge=0.0, lt=1.0)
    b2: float = Field(0.999, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled (adamw) or L2-added (others) weight decay.")
    grad_clip_norm: Optional[float] = Field(None, gt=0.0, description="Clip gradients to this global norm.")


class AugmentConfig(_Section):
    """Random image augmentation inside the compiled train step (off by default)."""
    crop_padding: StrictInt = Field(0, ge=0, description="Pad by this many zero pixels, then crop back at a random offset.")
    flip: bool = Field(False, description="Flip left-right with probability 1/2.")
    rotate_degrees: float = Field(0.0, ge=0.0, le=180.0, description="Rotate by a uniform angle in [-d, d] degrees.")
    scale: float = Field(0.0, ge=0.0, lt=1.0, description="Zoom by a uniform factor in [1-s, 1+s].")

    @property
    def enabled(self) -> bool:
        return bool(self.crop_padding or self.flip or self.rotate_degrees or self.scale)


class CheckpointConfig(_Section):
    every_steps: StrictInt = Field(1000, ge=1, description="Checkpoint period in steps (and one at the end).")
    max_to_keep: StrictInt = Field(2, ge=1)
    fallback: bool = Field(False, description="If the latest checkpoint cannot be read, restore the previous one (and say so).")


class ParallelConfig(_Section):
    mode: Literal["jit", "pmap"] = Field(
        "jit", description="jit: Mesh + NamedSharding; pmap: explicit collectives (jax.shard_map), replicated state.")
    fsdp: bool = Field(False, description="jit only: shard parameters and optimizer state over the data axis too (FSDP).")
    fsdp_size: Optional[StrictInt] = Field(
        None, ge=1, description="Devices each FSDP-sharded leaf is split over (the mesh's fsdp axis); the rest form "
                                "the data axis. Default: one TPU slice or one host, so data parallelism runs across "
                                "slices/hosts; all devices when there is one.")
    check_replicas: bool = Field(
        True, description="At each evaluation, check that replicated state (masks, loss scale, params) is bit-identical on every device and process.")

    @pydantic.model_validator(mode="after")
    def _fsdp_needs_jit(self) -> "ParallelConfig":
        if self.fsdp and self.mode != "jit":
            raise ValueError("fsdp=true shards state over a Mesh: use parallel.mode=jit (pmap keeps a full copy per device)")
        return self


class DistributedConfig(_Section):
    coordinator: Optional[str] = Field(None, description="host:port of process 0, as jax.distributed.initialize takes it.")
    num_processes: Optional[StrictInt] = Field(None, ge=1)
    process_id: Optional[StrictInt] = Field(None, ge=0)
    init_timeout_seconds: Optional[StrictInt] = Field(
        None, ge=1, description="Give up (with an error) if the peers are not all up by then; default: JAX's (300 s).")
    heartbeat_timeout_seconds: Optional[StrictInt] = Field(
        None, ge=1, description="A peer silent this long is dead: the others stop with an error; default: JAX's (100 s).")


class InitConfig(_Section):
    from_: Optional[str] = Field(None, alias="from", description="Run dir, checkpoint or export to start from (fine-tuning).")
    include: list[str] = Field([".*"], description="Regexes over '/'-joined param paths loaded from init.from; the rest is re-initialized.")
    freeze: list[str] = Field([], description="Regexes over param paths that get zero updates (left bit-identical by training).")
    pretrain: Optional[str] = Field(
        None, description="When init.from is unset: 'EXPERIMENT [key=value ...]' trained first into <workdir>/pretrained, then started from.")

    @pydantic.field_validator("include", "freeze")
    @classmethod
    def _regexes(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression ({e})") from None
        return patterns

    @pydantic.model_validator(mode="after")
    def _needs_source(self) -> "InitConfig":
        if self.include != [".*"] and self.from_ is None and self.pretrain is None:
            raise ValueError("include chooses what init.from loads: set init.from (or init.pretrain)")
        return self


_DTYPE = Literal["float32", "bfloat16", "float16"]


class SparsityConfig(_Section):
    method: Literal["none", "magnitude", "random", "saliency", "set", "rigl"] = Field(
        "none", description="How masks are chosen: |w|, random, |w*g|, or dynamic sparse training (SET/RigL).")
    scope: Literal["layer", "global"] = Field("layer", description="magnitude: rank per layer or across all prunable layers.")
    structure: Literal["unstructured", "nm", "block", "channel"] = Field(
        "unstructured", description="nm: N of every M along the contracting (input) axis; block: h x w blocks; channel: whole output units.")
    target: float = Field(0.0, ge=0.0, lt=1.0, description="Final fraction of zeros over the prunable weights (unstructured/block/channel).")
    n: StrictInt = Field(2, ge=1, description="N of N:M (kept weights per group).")
    m: StrictInt = Field(4, ge=2, description="M of N:M (group size).")
    block: list[StrictInt] = Field([4, 4], description="Block shape h x w for structure=block.")
    distribution: Literal["uniform", "erk"] = Field("uniform", description="Per-layer sparsity: uniform or Erdos-Renyi-Kernel.")
    schedule: Literal["one_shot", "polynomial", "periodic"] = Field(
        "polynomial", description="one_shot at start_step; polynomial (Zhu & Gupta cubic) from start_step to end_step; periodic re-pruning.")
    start_step: StrictInt = Field(0, ge=0)
    end_step: Optional[StrictInt] = Field(None, ge=0, description="null: 75% of the training steps.")
    update_every: StrictInt = Field(100, ge=1, description="Steps between mask updates.")
    power: float = Field(3.0, gt=0.0, description="Exponent of the polynomial schedule.")
    drop_fraction: float = Field(0.3, ge=0.0, le=1.0, description="SET/RigL: fraction dropped and regrown, cosine-decayed to 0 at end_step.")
    include: list[str] = Field([r"kernel$"], description="Regexes over '/'-joined param paths that may be pruned.")
    exclude: list[str] = Field([], description="Regexes excluded from pruning.")
    penalty: Literal["none", "l1", "group_lasso"] = Field("none", description="Sparsity-inducing loss term.")
    penalty_weight: float = Field(0.0, ge=0.0)
    group: Literal["row", "channel", "nm"] = Field("row", description="Groups of the group lasso.")
    threshold: float = Field(0.0, ge=0.0, description="After the penalty: |w| below this becomes an exact, frozen zero.")
    threshold_step: Optional[StrictInt] = Field(None, ge=0, description="Step of the threshold; null: 90% of training.")

    @pydantic.model_validator(mode="after")
    def _compatible(self) -> "SparsityConfig":
        """Combinations that have no meaning are refused here, at config time (exit 2)."""
        if self.method in ("set", "rigl") and (self.structure != "unstructured" or self.scope != "layer"):
            raise ValueError(f"method={self.method} trains unstructured per-layer masks: "
                             "use structure=unstructured and scope=layer")
        if self.scope == "global" and (self.structure != "unstructured" or self.distribution != "uniform"):
            raise ValueError("scope=global ranks single weights across all layers: it needs "
                             "structure=unstructured and distribution=uniform")
        if self.structure == "nm" and not 0 < self.n < self.m:
            raise ValueError(f"N:M needs 0 < n < m, got n={self.n}, m={self.m}")
        if len(self.block) != 2 or min(self.block) < 1:
            raise ValueError(f"block must be two positive sizes [h, w], got {self.block}")
        if self.method != "none" and self.structure != "nm" and self.target == 0.0:
            raise ValueError(f"method={self.method} with target=0 prunes nothing: set sparsity.target")
        return self


class PrecisionConfig(_Section):
    params: _DTYPE = Field("float32", description="Dtype parameters are cast to for compute (master weights stay float32).")
    compute: _DTYPE = Field("float32", description="Dtype of activations and matmul inputs.")
    output: _DTYPE = Field("float32", description="Dtype of the logits (loss and softmax are always float32).")
    accumulation: _DTYPE = Field("float32", description="Dot/conv accumulation dtype (preferred_element_type).")
    include: list[str] = Field([".*"], description="Regexes over param paths that get the low-precision treatment.")
    loss_scale: Literal["auto", "none", "static", "dynamic"] = Field("auto", description="auto: dynamic for float16, none otherwise.")
    loss_scale_init: float = Field(2.0 ** 15, gt=0.0)
    loss_scale_min: float = Field(1.0, gt=0.0)
    loss_scale_max: float = Field(2.0 ** 24, gt=0.0)
    loss_scale_period: StrictInt = Field(2000, ge=1, description="Finite steps before the dynamic scale grows.")
    loss_scale_factor: float = Field(2.0, gt=1.0)
    max_nonfinite_steps: StrictInt = Field(10, ge=1, description="Stop after this many consecutive non-finite steps.")
    guard: Literal["auto", "step", "rollback"] = Field(
        "auto", description="How non-finite steps are skipped. step: every step tests its gradients and a "
        "non-finite one leaves the state untouched. rollback: the same steps skipped, faster: a step group runs "
        "untested from a copy of its start state and is rerun with the per-step test only if it met a "
        "non-finite loss or state (one extra copy of the state in memory, one host read per group). auto: "
        "rollback on CPU without loss scaling (where the per-step selects cost copies), step otherwise.")


class QuantConfig(_Section):
    mode: Literal["none", "qat", "ptq"] = Field("none", description="qat: fake-quant training (STE); ptq: quantize after training.")
    bits: StrictInt = Field(8, ge=2, le=8)
    weights: Literal["per_channel", "per_tensor"] = Field("per_channel", description="Weight scale granularity (symmetric absmax).")
    activations: Literal["per_tensor", "none"] = Field("per_tensor", description="Activation scale granularity.")
    include: list[str] = Field([r".*"], description="Regexes over layer paths to quantize.")
    start_step: StrictInt = Field(0, ge=0, description="QAT: step from which fake quantization is on.")


class Config(_Section):
    """The full, validated configuration of one run."""
    experiment: str = Field("", description="Registered experiment name (set by the registry).")
    workdir: Optional[str] = Field(None, description="Run directory; default runs/<experiment>.")
    seed: StrictInt = Field(0, description="Derives init, data order, dropout and augmentation keys.")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    parallel: ParallelConfig = ParallelConfig()
    distributed: DistributedConfig = DistributedConfig()
    init: InitConfig = InitConfig()
    sparsity: SparsityConfig = SparsityConfig()
    precision: PrecisionConfig = PrecisionConfig()
    quant: QuantConfig = QuantConfig()

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict with the public key names (``init.from``, not ``init.from_``)."""
        return self.model_dump(by_alias=True, mode="json")


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


def valid_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key the schema accepts, e.g. ``train.epochs``."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += valid_keys(sub, key + ".")
        else:
            keys.append(key)
    return keys


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
    """Set dotted keys in a nested dict (a copy); validation happens in :func:`build_config`."""
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
    return tree


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown config key {key!r}; did you mean {_closest(key)}?"
    if error["type"] == "value_error":  # a section's cross-field check: its message says it all
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"
    return f"{key}={error['input']!r} is invalid: {error['msg']} (see `python -m jaxaccel.run --help`)"


def build_config(tree: dict[str, Any]) -> Config:
    """Validate a nested dict into a :class:`Config`, or raise :class:`ConfigError` naming the key."""
    try:
        return Config.model_validate(tree)
    except pydantic.ValidationError as e:
        raise ConfigError("; ".join(_describe(err) for err in e.errors())) from None


def field_help() -> str:
    """One line per key with its default and description, for ``--help``."""
    lines = []

    def walk(model: type[BaseModel], instance: BaseModel, prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = prefix + (field.alias or name)
            value = getattr(instance, name)
            if isinstance(value, BaseModel):
                walk(type(value), value, key + ".")
            else:
                desc = f"  {field.description}" if field.description else ""
                lines.append(f"  {key}={value!r}{desc}")

    walk(Config, Config(), "")
    return "\n".join(lines)

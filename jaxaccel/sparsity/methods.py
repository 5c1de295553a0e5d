"""The ``sparsity`` config section: one class per kind of method, keyed on ``sparsity.method``.

    method                        class          reads, besides the fields every method reads
    none                          NoSparsity     (penalties and the threshold step only)
    magnitude, random, saliency   Pruning        target, structure, schedule, importance ... (masks.py,
                                                 schedules.py; schedule=early_bird: transform.py)
    set, rigl                     DynamicSparse  target, drop_fraction ... (dst.py)

Every method reads the fields of :class:`SparsityConfig`: which parameters (``include``,
``exclude``), the penalty and the threshold step. A field the chosen method does not read is an
unknown key for it (``sparsity.target`` with ``method=none`` is refused, naming what it reads), and
a field that the chosen structure or penalty ignores may not differ from its default. Points in
the run are :mod:`jaxaccel.durations` (steps, epochs or a fraction of the run); ``check_run``
refuses a schedule that cannot happen within the run, naming its keys.
"""
from __future__ import annotations

import typing
from typing import Any, Literal

import pydantic
from pydantic import Field, StrictInt

from jaxaccel.durations import Duration, describe, same_unit_order
from jaxaccel.schema import ConfigError, PositiveInt, Regexes, Section

__all__ = ["SparsityConfig", "NoSparsity", "Pruning", "DynamicSparse", "METHODS"]


def _does_nothing(section: Section, fields: list[str], why: str) -> None:
    """Refuse ``fields`` of ``section`` that differ from their defaults but do nothing ``why``."""
    fields = section.differs_from_default(*fields)
    if fields:
        defaults = ", ".join(f"{f}={type(section).model_fields[f].default!r}" for f in fields)
        raise ValueError(f"{', '.join(fields)} {'does' if len(fields) == 1 else 'do'} nothing {why}: leave "
                         f"{'it' if len(fields) == 1 else 'them'} at the default ({defaults})")


class SparsityConfig(Section):
    """The fields every ``sparsity.method`` reads."""
    method: str
    include: Regexes = Field([r"kernel$"], description="Regexes over parameter names (jaxaccel.paths) that may be pruned.")
    exclude: Regexes = Field([], description="Regexes excluded from pruning.")
    penalty: Literal["none", "l1", "group_lasso"] = Field("none", description="Sparsity-inducing loss term.")
    penalty_weight: float = Field(0.0, ge=0.0, description="Weight of the penalty in the loss.")
    group: Literal["row", "channel", "nm"] = Field("row", description="Groups of the group lasso.")
    group_size: StrictInt = Field(4, ge=2, description="group=nm: entries per group (M) along the contracting axis.")
    threshold: float = Field(0.0, ge=0.0, description="After the penalty: |w| below this becomes an exact, frozen zero.")
    threshold_at: Duration = Field("90%", description="When the threshold step happens (a duration).")

    def __init__(self, **data: Any) -> None:
        if type(self) is SparsityConfig:
            raise TypeError("SparsityConfig is the base of the sparsity methods' classes: build one with "
                            "jaxaccel.config.sparsity_config(method=..., ...)")
        super().__init__(**data)

    @pydantic.model_validator(mode="after")
    def _penalty_and_threshold(self) -> "SparsityConfig":
        if self.penalty == "none":
            _does_nothing(self, ["penalty_weight", "group", "group_size"], "without a penalty")
        elif self.penalty_weight == 0.0:
            raise ValueError(f"penalty={self.penalty} with penalty_weight=0 adds nothing: set penalty_weight")
        elif self.penalty == "l1":
            _does_nothing(self, ["group", "group_size"], "for penalty=l1 (no groups)")
        elif self.group != "nm":
            _does_nothing(self, ["group_size"], f"for group={self.group}")
        if self.threshold == 0.0:
            _does_nothing(self, ["threshold_at"], "without a threshold")
        return self

    def check_run(self, total_steps: int, given: "SparsityConfig") -> None:
        """Refuse (ConfigError) what cannot happen in a run of ``total_steps`` (durations resolved)."""
        if self.threshold > 0.0 and self.threshold_at > total_steps - 1:
            raise ConfigError(f"{describe('sparsity.threshold_at', given.threshold_at, self.threshold_at)} is past the "
                              f"last step ({total_steps - 1}) of this {total_steps}-step run: the threshold would "
                              "never apply; use a fraction such as '90%'")


class NoSparsity(SparsityConfig):
    """No masks: dense training (a penalty and the threshold step may still make zeros)."""
    method: Literal["none"] = "none"


class _Scheduled(SparsityConfig):
    """Fields of the methods whose masks follow a schedule towards a target."""
    target: float = Field(0.0, ge=0.0, lt=1.0, description="Final fraction of zeros over the prunable weights.")
    distribution: Literal["uniform", "erk"] = Field("uniform", description="Per-layer sparsity: uniform or Erdos-Renyi-Kernel.")
    start: Duration = Field(0, description="First mask update (a duration).")
    end: Duration = Field("75%", description="Last mask update (a duration).")
    update_every: Duration = Field(100, description="Period of the mask updates (a duration, at least 1 step).")

    @pydantic.model_validator(mode="after")
    def _order(self) -> "_Scheduled":
        if self.target == 0.0 and getattr(self, "structure", None) != "nm":
            raise ValueError(f"method={self.method} with target=0 prunes nothing: set target")
        if self.update_every == 0:
            raise ValueError("update_every=0: mask updates need a period of at least 1 step")
        if "end" in self._uses() and (order := same_unit_order(self.start, self.end)) and order[1] < order[0]:
            raise ValueError(f"end={self.end!r} is before start={self.start!r}: the end of the schedule must "
                             "come after its start")
        return self

    def _uses(self) -> tuple[str, ...]:
        return ("start", "end", "update_every")

    def _check_start(self, total_steps: int, given: "_Scheduled") -> None:
        if self.start > total_steps - 1:
            raise ConfigError(f"{describe('sparsity.start', given.start, self.start)} is at or after the end of this "
                              f"{total_steps}-step run: the masks would never change. Start earlier (a fraction "
                              "such as '10%' scales with the run) or train longer")
        if "update_every" in self._uses() and self.update_every < 1:
            raise ConfigError(f"{describe('sparsity.update_every', given.update_every, self.update_every)} is less "
                              "than one step in this run: use a longer period")

    def _check_end(self, total_steps: int, given: "_Scheduled", last: int) -> None:
        start, end = describe("sparsity.start", given.start, self.start), describe("sparsity.end", given.end, self.end)
        if self.end < self.start:
            raise ConfigError(f"{end} is before {start}: the schedule must end after it starts")
        if self.end > last:
            raise ConfigError(f"{end} is past the last step ({total_steps - 1}) of this {total_steps}-step run: the "
                              "target would not be reached. End earlier (e.g. '75%') or train longer")


class Pruning(_Scheduled):
    """Masks recomputed from scores (|w|, random, |w*g|) at the schedule's steps."""
    method: Literal["magnitude", "random", "saliency"]
    scope: Literal["layer", "global"] = Field("layer", description="Rank scores per layer or across all prunable layers.")
    structure: Literal["unstructured", "nm", "block", "channel"] = Field(
        "unstructured", description="nm: N of every M along the contracting (input) axis; block: h x w blocks; "
                                    "channel: whole output units.")
    n: StrictInt = Field(2, ge=1, description="structure=nm: kept weights per group.")
    m: StrictInt = Field(4, ge=2, description="structure=nm: group size.")
    block: list[PositiveInt] = Field([4, 4], description="structure=block: block shape [h, w].")
    schedule: Literal["one_shot", "polynomial", "periodic", "early_bird"] = Field(
        "polynomial", description="one_shot at start; polynomial (Zhu & Gupta cubic) from start to end; "
                                  "periodic re-pruning every update_every from start on; early_bird (structure="
                                  "channel): every update_every from start, the channel masks at target are "
                                  "computed and compared with the previous check's; once their distance stays "
                                  "below early_bird_epsilon for early_bird_window checks (at end at the latest) "
                                  "they are drawn as the ticket and pruned once (You et al. 2020).")
    power: float = Field(3.0, gt=0.0, description="schedule=polynomial: exponent.")
    importance: Literal["weight_norm", "norm_scale"] = Field(
        "weight_norm", description="structure=channel: what ranks a unit. weight_norm: the L2 norm of its "
                                   "filter; norm_scale: |scale| of the normalization after its layer (network "
                                   "slimming, Liu et al. 2017; the model's unit_norms), and penalty=l1 then "
                                   "penalises those scales, not the kernels (Liu et al.: penalty_weight "
                                   "1e-4 .. 1e-5).")
    early_bird_epsilon: float = Field(0.1, gt=0.0, le=1.0, description="schedule=early_bird: the normalized "
                                      "Hamming distance between consecutive checks' masks under which they count "
                                      "as settled.")
    early_bird_window: PositiveInt = Field(5, description="schedule=early_bird: consecutive distances below "
                                                          "early_bird_epsilon that draw the ticket.")
    shrink: bool = Field(False, description="structure=channel: remove the pruned units from the model (and the "
                                            "matching inputs of the next layer) when they are pruned, so the "
                                            "rest of the run trains a narrower dense model (jaxaccel.sparsity.shrink).")
    min_width: PositiveInt = Field(1, description="shrink: units every shrunk layer keeps at least, so no "
                                                  "layer vanishes.")

    def _uses(self) -> tuple[str, ...]:
        return {"one_shot": ("start",), "periodic": ("start", "update_every")}.get(self.schedule, super()._uses())

    @pydantic.model_validator(mode="after")
    def _compatible(self) -> "Pruning":
        """Combinations that have no meaning are refused here, at config time (exit 2)."""
        if self.scope == "global" and (self.structure != "unstructured" or self.distribution != "uniform"):
            raise ValueError("scope=global ranks single weights across all layers: it needs "
                             "structure=unstructured and distribution=uniform")
        if self.structure == "nm" and not 0 < self.n < self.m:
            raise ValueError(f"N:M needs 0 < n < m, got n={self.n}, m={self.m}")
        if len(self.block) != 2:
            raise ValueError(f"block must be two positive sizes [h, w], got {self.block}")
        if self.structure != "nm":
            _does_nothing(self, ["n", "m"], f"for structure={self.structure}")
        else:
            _does_nothing(self, ["target"], "for structure=nm (its sparsity is 1 - n/m)")
        if self.structure != "block":
            _does_nothing(self, ["block"], f"for structure={self.structure}")
        self._check_slimming()
        self._check_shrink()
        return self

    def _check_slimming(self) -> None:
        """importance=norm_scale and schedule=early_bird: channel pruning only."""
        if self.importance == "norm_scale":
            if self.structure != "channel":
                raise ValueError(f"importance=norm_scale ranks whole units by their normalization's scale: it needs "
                                 f"structure=channel, not structure={self.structure}")
            if self.method != "magnitude":
                raise ValueError(f"importance=norm_scale is the score of method=magnitude; method={self.method} "
                                 "has its own scores")
        if self.schedule != "early_bird":
            _does_nothing(self, ["early_bird_epsilon", "early_bird_window"], f"for schedule={self.schedule}")
            return
        if self.structure != "channel":
            raise ValueError(f"schedule=early_bird draws a ticket of whole units: it needs structure=channel, not "
                             f"structure={self.structure}")
        if self.method == "random":
            raise ValueError("schedule=early_bird with method=random: fixed random scores give the same masks at "
                             "every check, so the ticket says nothing; use method=magnitude")

    def _check_shrink(self) -> None:
        if not self.shrink:
            _does_nothing(self, ["min_width"], "without shrink")
            return
        if self.structure != "channel":
            raise ValueError(f"shrink removes whole output units: it needs structure=channel, not "
                             f"structure={self.structure}")
        if self.schedule not in ("one_shot", "early_bird") and self.distribution != "uniform":
            # Each update after the first prunes a fraction of the layer the last shrink left (the
            # transformation's cut_fraction); ERK's per-layer fractions depend on the shapes, which change.
            raise ValueError(f"shrink with schedule={self.schedule} needs distribution=uniform (ERK's per-layer "
                             "sparsities change with the shrunk shapes); use schedule=one_shot or early_bird for erk")
        if self.threshold > 0.0:
            raise ValueError("shrink with a threshold: the threshold makes single zeros, which shrinking cannot "
                             "remove; leave threshold at 0")

    def check_run(self, total_steps: int, given: "Pruning") -> None:
        super().check_run(total_steps, given)
        self._check_start(total_steps, given)
        if self.schedule == "early_bird":
            self._check_early_bird(total_steps, given)
        if self.schedule in ("polynomial", "early_bird"):
            self._check_end(total_steps, given, last=total_steps - 1)
            if self.end > self.start and self.update_every > self.end - self.start:
                raise ConfigError(
                    f"{describe('sparsity.update_every', given.update_every, self.update_every)} is longer than the "
                    f"schedule from sparsity.start to sparsity.end (steps {self.start}..{self.end}): no gradual "
                    "update in between. Use a shorter period or schedule=one_shot")
        if self.schedule == "periodic" and self.start + self.update_every > total_steps - 1:
            raise ConfigError(f"{describe('sparsity.update_every', given.update_every, self.update_every)} from step "
                              f"{self.start} is longer than the rest of this {total_steps}-step run: it would prune "
                              "once. Use a shorter period or schedule=one_shot")

    def _check_early_bird(self, total_steps: int, given: "Pruning") -> None:
        # Checks at start, start + every, ... <= end, and at end: the window needs window + 1 of them
        # (a distance compares two), else the ticket could only be drawn at end.
        checks = (self.end - self.start) // self.update_every + 1 + ((self.end - self.start) % self.update_every > 0)
        if self.end >= self.start and checks < self.early_bird_window + 1:
            raise ConfigError(
                f"schedule=early_bird checks {checks} time(s) from "
                f"{describe('sparsity.start', given.start, self.start)} to "
                f"{describe('sparsity.end', given.end, self.end)} every "
                f"{describe('sparsity.update_every', given.update_every, self.update_every)}, but "
                f"sparsity.early_bird_window={self.early_bird_window} needs {self.early_bird_window + 1} (each "
                "distance compares two checks): use a shorter update_every, a later end or a smaller window")


class DynamicSparse(_Scheduled):
    """Dynamic sparse training at a constant sparsity: drop and regrow (SET: random, RigL: |gradient|)."""
    method: Literal["set", "rigl"]
    drop_fraction: float = Field(0.3, ge=0.0, le=1.0,
                                 description="Fraction dropped and regrown, cosine-decayed to 0 at end.")

    def check_run(self, total_steps: int, given: "DynamicSparse") -> None:
        super().check_run(total_steps, given)
        self._check_start(total_steps, given)
        self._check_end(total_steps, given, last=total_steps)
        first = self.start if self.start > 0 else self.update_every  # step 0 only draws the first masks
        if first >= self.end:
            raise ConfigError(f"no drop-and-grow step falls between sparsity.start and sparsity.end (steps "
                              f"{self.start}..{self.end}) with "
                              f"{describe('sparsity.update_every', given.update_every, self.update_every)}: "
                              "use a shorter period or a later end")


# sparsity.method -> its class.
METHODS: dict[str, type[SparsityConfig]] = {
    method: cls for cls in (NoSparsity, Pruning, DynamicSparse)
    for method in typing.get_args(cls.model_fields["method"].annotation)}


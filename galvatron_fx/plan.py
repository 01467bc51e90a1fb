"""The plan: per-layer parallel strategies plus the global pipeline fields, as a plain value.

A `Plan` is made by the search (or by hand), saved as JSON with a schema version and the
fingerprint of the model it was made for, printed as a table, and loaded to run the exact same
parallelisation later. Validation errors name the layer and the field.

Pure data: imports neither torch.fx nor the passes. Facts about the graph that validation
needs (unit names, heads, widths) come in as `LayerShape` values from the caller.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from galvatron_fx.jsonio import fields_of, read_json

__all__ = [
    "SCHEMA_VERSION",
    "DPMode",
    "LayerShape",
    "LayerStrategy",
    "PipelineConfig",
    "Plan",
    "PlanError",
    "Recompute",
    "Schedule",
    "check_ulysses",
    "check_vocab",
    "save_json",
]

SCHEMA_VERSION = 1
"""Bumped whenever a field changes meaning; loading another version is refused."""


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model or the world size."""


class DPMode(str, Enum):
    """How the data-parallel replicas of a layer share work and state."""

    ALLREDUCE = "allreduce"  # plain DP: gradients all-reduced, everything replicated
    ZERO1 = "zero1"  # optimizer states sharded
    ZERO2 = "zero2"  # optimizer states and gradients sharded (reduce-scatter)
    ZERO3 = "zero3"  # parameters sharded too, gathered around each use (FSDP)


class Recompute(str, Enum):
    NONE = "none"
    SELECTIVE = "selective"  # the attention core only (Korthikanti et al. 2022)
    FULL = "full"  # the whole layer


class Schedule(str, Enum):
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED_1F1B = "interleaved-1f1b"
    INTERLEAVED_ZB = "interleaved-zb"
    """torch's ScheduleInterleavedZeroBubble: backward split into input and weight gradients,
    the weight half filling the bubble. Composes with tp / sp / recomputation inside stages,
    not with dp or ZeRO (their gradient buckets and gathered weights)."""


@dataclass(frozen=True)
class LayerStrategy:
    """How one layer or segment runs on the devices of its pipeline stage."""

    tp: int = 1
    """Size of the layer's model-parallel group: the tensor-parallel degree (Megatron
    column/row split), or the Ulysses degree when `ulysses`."""
    sp: bool = False
    """Megatron sequence parallelism inside the TP group (needs tp > 1)."""
    dp: int = 1
    """Data-parallel degree: the stage's devices / tp."""
    dp_mode: DPMode = DPMode.ALLREDUCE
    recompute: Recompute = Recompute.NONE
    tp_consecutive: bool = True
    """TP groups on consecutive ranks (inside a node) rather than strided."""
    vocab_parallel: bool = False
    """Segments only: split the vocabulary of the embedding, the output head and the
    cross-entropy across the TP group instead of running them replicated."""
    ulysses: bool = False
    """Layers with attention only: the group of `tp` ranks runs Ulysses sequence parallelism
    (DeepSpeed-Ulysses, Jacobs et al. 2023) instead of tensor parallelism: weights whole,
    activations split on the sequence, an all-to-all before attention that reshards to heads
    and one after it back. The weights' data parallelism (gradient sync, `dp_mode`'s ZeRO
    sharding) spans the group too: `state_dp` ranks, so ZeRO applies even at dp = 1."""

    def __post_init__(self) -> None:
        for name in ("tp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"LayerStrategy.{name} must be an integer >= 1, got {value!r}")
        object.__setattr__(self, "dp_mode", _enum(DPMode, self.dp_mode, "dp_mode"))
        object.__setattr__(self, "recompute", _enum(Recompute, self.recompute, "recompute"))
        if self.vocab_parallel and self.tp == 1:
            raise PlanError("LayerStrategy.vocab_parallel needs tp > 1: it splits the TP group")
        if self.sp and self.tp == 1:
            raise PlanError(
                "LayerStrategy.sp needs tp > 1: sequence parallelism splits the TP group"
            )
        if self.ulysses and (self.tp == 1 or self.sp or self.vocab_parallel):
            raise PlanError(
                "LayerStrategy.ulysses needs tp > 1 (the Ulysses group's size) and neither sp "
                "nor vocab_parallel: the group splits the sequence instead of the weights"
            )

    @property
    def devices(self) -> int:
        return self.tp * self.dp

    @property
    def state_dp(self) -> int:
        """The ranks the layer's trained state is data-parallel over: `dp`, or all of the
        stage's `tp x dp` under Ulysses (its weights are whole on every rank of the group,
        so their gradients are summed, and ZeRO shards them, over all of them, as
        DeepSpeed-Ulysses does)."""
        return self.dp * self.tp if self.ulysses else self.dp

    @property
    def seq_split(self) -> int:
        """How many ways the residual stream's sequence is split between layers (Megatron-SP
        and Ulysses split it across the group; plain TP keeps it whole)."""
        return self.tp if self.sp or self.ulysses else 1

    def short(self) -> str:
        """Compact form for tables: `tp2+sp dp4/zero3 rc=full`, `usp2 dp4` for Ulysses."""
        sp, vp = "+sp" if self.sp else "", "+vocab" if self.vocab_parallel else ""
        kind = "usp" if self.ulysses else "tp"
        tp = f"{kind}{self.tp}{sp}{vp}{'' if self.tp_consecutive else '(strided)'}"
        mode = f"/{self.dp_mode.value}" if self.state_dp > 1 else ""
        dp = f"dp{self.dp}{mode}"
        rc = "" if self.recompute is Recompute.NONE else f" rc={self.recompute.value}"
        return f"{tp} {dp}{rc}"


@dataclass(frozen=True)
class PipelineConfig:
    """Global pipeline fields (degree 1 means no pipeline)."""

    degree: int = 1
    stage_starts: tuple[str, ...] = ()
    """The first unit of every stage after the first (degree - 1 names, in order)."""
    micro_batches: int = 1
    schedule: Schedule = Schedule.ONE_F_ONE_B
    virtual_stages: int = 1
    """Model chunks per rank (> 1 only with the interleaved schedule)."""

    def __post_init__(self) -> None:
        for name in ("degree", "micro_batches", "virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"PipelineConfig.{name} must be an integer >= 1, got {value!r}")
        object.__setattr__(self, "schedule", _enum(Schedule, self.schedule, "schedule"))
        object.__setattr__(self, "stage_starts", tuple(self.stage_starts))
        if len(self.stage_starts) != self.degree * self.virtual_stages - 1:
            raise PlanError(
                f"PipelineConfig: {self.degree * self.virtual_stages} stages need "
                f"{self.degree * self.virtual_stages - 1} stage_starts, got {len(self.stage_starts)}"
            )
        interleaved = (Schedule.INTERLEAVED_1F1B, Schedule.INTERLEAVED_ZB)
        if self.virtual_stages > 1 and self.schedule not in interleaved:
            raise PlanError(
                "PipelineConfig: virtual_stages > 1 needs schedule 'interleaved-1f1b' or "
                "'interleaved-zb'"
            )
        rounds = max(1, self.micro_batches // self.degree)  # torch runs interleaved ones so
        if self.schedule in interleaved and self.micro_batches % rounds:
            raise PlanError(
                f"PipelineConfig: schedule {self.schedule.value!r} runs the micro-batches in "
                f"{rounds} rounds (micro_batches // degree), so micro_batches={self.micro_batches} "
                f"must be a multiple of {rounds}; use a multiple of degree={self.degree}"
            )


@dataclass(frozen=True)
class LayerShape:
    """What validation must know of a layer's graph, extracted by the caller."""

    heads: tuple[int, ...] = ()
    """Query head counts of the layer's attention: what tensor parallelism splits."""
    tp_split_dims: tuple[tuple[str, int], ...] = ()
    """(parameter name, size) of every weight dimension tensor parallelism would split."""
    seq_lens: tuple[int, ...] = ()
    """Sequence lengths of the layer's attention (queries and keys): what Ulysses splits."""
    kv_heads: tuple[int, ...] = ()
    """Key/value head counts before grouped-query attention repeats them. A tp that does not
    divide them runs the key/value projections whole on every TP rank, as Megatron keeps
    each shared head on every rank that needs it; Ulysses' all-to-all must split them."""
    vocab_split_dims: tuple[tuple[str, int], ...] = ()
    """(parameter name, size) of every weight dimension a vocab-parallel segment splits (the
    vocabulary: embedding rows, logits columns)."""


@dataclass(frozen=True)
class Plan:
    """Per-unit strategies (in execution order) and the pipeline, for one model."""

    world_size: int
    strategies: tuple[tuple[str, LayerStrategy], ...]
    model_fingerprint: str
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategies", tuple((str(u), s) for u, s in self.strategies))
        names = [u for u, _ in self.strategies]
        if len(set(names)) != len(names):
            raise PlanError(f"Plan: a unit is listed twice in {names}")
        self.validate()

    @classmethod
    def uniform(
        cls,
        units: Sequence[str],
        strategy: LayerStrategy,
        *,
        world_size: int,
        model_fingerprint: str,
        pipeline: PipelineConfig | None = None,
    ) -> Plan:
        """The same strategy for every unit."""
        return cls(
            world_size,
            tuple((u, strategy) for u in units),
            model_fingerprint,
            pipeline or PipelineConfig(),
        )

    def strategy(self, unit: str) -> LayerStrategy:
        for name, s in self.strategies:
            if name == unit:
                return s
        raise PlanError(f"Plan has no strategy for unit {unit!r}")

    def with_strategy(self, unit: str, strategy: LayerStrategy) -> Plan:
        """A copy with one unit's strategy replaced (validated like any plan)."""
        self.strategy(unit)
        return replace(
            self, strategies=tuple((u, strategy if u == unit else s) for u, s in self.strategies)
        )

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(u for u, _ in self.strategies)

    def validate(self) -> None:
        """Degrees multiply to the world size; pipeline stage starts name known units; the
        schedule composes with the strategies."""
        if self.world_size < 1:
            raise PlanError(f"Plan.world_size must be >= 1, got {self.world_size}")
        pp = self.pipeline.degree
        for unit, s in self.strategies:
            if s.tp * s.dp * pp != self.world_size:
                raise PlanError(
                    f"layer {unit!r}: tp={s.tp} x dp={s.dp} x pp={pp} = {s.tp * s.dp * pp} "
                    f"devices, but world_size is {self.world_size}"
                )
        with_dp = [u for u, s in self.strategies if s.state_dp > 1]  # Ulysses' too
        if self.pipeline.schedule is Schedule.INTERLEAVED_ZB and with_dp:
            raise PlanError(
                "schedule 'interleaved-zb' does not compose with data parallelism inside stages "
                f"(unit {with_dp[0]!r} {_why_synced(self.strategy(with_dp[0]))}): its "
                "weight-gradient pass runs after the gradient buckets and ZeRO gathers; use "
                "'interleaved-1f1b' or tp-only stages"
            )
        order = {u: i for i, u in enumerate(self.units)}
        starts = [order.get(u, -1) for u in self.pipeline.stage_starts]
        for name, pos in zip(self.pipeline.stage_starts, starts, strict=True):
            if pos <= 0:
                raise PlanError(f"pipeline stage start {name!r} is not a unit after the first")
        if starts != sorted(set(starts)):
            raise PlanError(f"pipeline stage starts {self.pipeline.stage_starts} are not in order")

    def check_model(
        self, model_fingerprint: str, shapes: Mapping[str, LayerShape], *, source: str = "plan"
    ) -> None:
        """Refuse a plan made for another model, or whose tp does not divide the heads and
        widths it splits. `shapes` maps every unit of the model, in order, to its facts."""
        if list(shapes) != list(self.units):
            missing = [u for u in shapes if u not in self.units]
            extra = [u for u in self.units if u not in shapes]
            raise PlanError(
                f"{source} does not match this model's layers (missing {missing[:4]}, "
                f"unknown {extra[:4]}); it was made for another model"
            )
        if model_fingerprint != self.model_fingerprint:
            raise PlanError(
                f"{source} was made for model {self.model_fingerprint}, this model is "
                f"{model_fingerprint}: same layer names, different shapes or ops"
            )
        for unit, s in self.strategies:
            if s.ulysses:
                check_ulysses(unit, s.tp, shapes[unit])
            else:
                _check_divisible(unit, s.tp, shapes[unit])
            if s.vocab_parallel:
                check_vocab(unit, s.tp, shapes[unit])

    # JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "world_size": self.world_size,
            "model_fingerprint": self.model_fingerprint,
            "pipeline": _plain(asdict(self.pipeline)),
            "strategies": [{"unit": u, **_plain(asdict(s))} for u, s in self.strategies],
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str = "plan", path: str = "") -> Plan:
        """Check `data` field by field; a PlanError names the field path (`strategies[2].tp`)
        under `path`, where the plan sits in `source`."""
        where = f"{source}: {path}" if path else source
        if not isinstance(data, Mapping):
            raise PlanError(f"{where}: expected a plan object {{...}}, got {type(data).__name__}")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise PlanError(
                f"{where}: schema_version {data.get('schema_version')!r} is not "
                f"{SCHEMA_VERSION}; re-run the search to make a plan for this release"
            )
        top = fields_of(_PlanFile, data, source, path, error=PlanError)
        strategies = []
        for i, item in enumerate(top["strategies"]):
            at = f"{path}.strategies[{i}]" if path else f"strategies[{i}]"
            if not isinstance(item, Mapping) or not isinstance(item.get("unit"), str):
                raise PlanError(f'{source}: {at}: expected an object with a "unit" name')
            at += f" (unit {item['unit']!r})"
            rest = {k: v for k, v in item.items() if k != "unit"}
            strategies.append((item["unit"], _build(LayerStrategy, rest, source, at)))
        at = f"{path}.pipeline" if path else "pipeline"
        pipeline = _build(PipelineConfig, top["pipeline"], source, at)
        return cls(top["world_size"], tuple(strategies), top["model_fingerprint"], pipeline)

    def save(self, path: str | Path) -> None:
        save_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        data = read_json(path, error=PlanError)
        if isinstance(data, dict) and "plan" in data:  # a search result: the plan inside
            return cls.from_json(data["plan"], source=str(path), path="plan")
        return cls.from_json(data, source=str(path))

    # Table -----------------------------------------------------------------------------

    def table(self) -> str:
        """One row per unit, runs of equal strategies folded together."""
        p = self.pipeline
        head = [f"plan for {self.world_size} devices  (model {self.model_fingerprint})"]
        if p.degree > 1:
            head.append(
                f"pipeline: {p.degree} stages x {p.virtual_stages} chunk(s), "
                f"{p.micro_batches} micro-batches, {p.schedule.value}"
            )
        rows: list[tuple[str, str]] = []
        for unit, s in self.strategies:
            label = s.short()
            if unit in p.stage_starts:
                rows.append(("-- stage boundary --", ""))
            if rows and rows[-1][1] == label and rows[-1][0] != "-- stage boundary --":
                first = rows[-1][0].split(" .. ")[0]
                rows[-1] = (f"{first} .. {unit}", label)
            else:
                rows.append((unit, label))
        width = max(len(u) for u, _ in rows)
        return "\n".join([*head, *(f"  {u.ljust(width)}  {label}".rstrip() for u, label in rows)])


def save_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically: a crash leaves the previous file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _why_synced(s: LayerStrategy) -> str:
    if s.dp > 1:
        return "has dp > 1"
    return "is Ulysses: its whole weights are synced over its group"


def _enum(kind: type[Enum], value: Any, name: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in kind)
        raise PlanError(f"{name} must be one of {allowed}, got {value!r}") from None


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v)
        for k, v in d.items()
    }


@dataclass(frozen=True)
class _PlanFile:
    """The top level of a plan's JSON, for `fields_of`; strategies are checked one by one."""

    schema_version: int
    world_size: int
    model_fingerprint: str
    strategies: tuple[Any, ...]
    pipeline: Mapping[str, Any] = field(default_factory=dict)


def _build(kind: type[Any], data: Any, source: str, path: str) -> Any:
    kwargs = fields_of(kind, data, source, path, error=PlanError)
    try:
        return kind(**kwargs)
    except PlanError as err:
        raise PlanError(f"{source}: {path}: {err}") from None


def _check_divisible(unit: str, tp: int, shape: LayerShape) -> None:
    if tp == 1:
        return
    for heads in shape.heads:
        if heads % tp:
            raise PlanError(
                f"layer {unit!r}: {heads} attention heads are not divisible by tp={tp}; "
                f"use a tp that divides them ({', '.join(map(str, _divisors(heads)))})"
            )
    for name, size in shape.tp_split_dims:
        if size % tp:
            raise PlanError(
                f"layer {unit!r}: {name} has size {size}, not divisible by tp={tp}; "
                f"use a tp that divides it ({', '.join(map(str, _divisors(size)))})"
            )


def check_vocab(unit: str, tp: int, shape: LayerShape) -> None:
    """A vocab-parallel segment gives every TP rank an equal share of the vocabulary."""
    for name, size in shape.vocab_split_dims:
        if size % tp:
            raise PlanError(
                f"unit {unit!r}: vocab_parallel splits {name} of size {size}, not divisible by "
                f"tp={tp}; use a tp that divides it ({', '.join(map(str, _divisors(size)))}) "
                "or vocab_parallel=false"
            )


def check_ulysses(unit: str, degree: int, shape: LayerShape) -> None:
    """Ulysses splits the attention's heads after its all-to-all and its sequence before."""
    if not shape.heads:
        raise PlanError(
            f"unit {unit!r}: ulysses needs attention (scaled_dot_product_attention) in the "
            "unit, and it has none; give it tp with ulysses=false"
        )
    heads = (*shape.heads, *shape.kv_heads)
    for what, sizes in (("attention heads", heads), ("sequence positions", shape.seq_lens)):
        for size in sizes:
            if size % degree:
                raise PlanError(
                    f"layer {unit!r}: {size} {what} are not divisible by the Ulysses degree "
                    f"tp={degree}; use one that divides them "
                    f"({', '.join(map(str, _divisors(size)))})"
                )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]

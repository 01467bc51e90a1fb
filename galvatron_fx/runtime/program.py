"""What one rank runs: its rewritten graph, how each parameter lives on it, its stages.

The lowering (`galvatron_fx.lowering.lower`) produces a `RankProgram`; the runtime assembles
it into a trainable model (`runtime.assemble`) and pricing reads it (`galvatron_fx.planning`).
The types sit here, below both, so that neither reaches up into the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from galvatron_fx.plan import Plan
from galvatron_fx.runtime.collectives import GroupRef

__all__ = ["ParamSpec", "RankProgram", "StageSplit", "get_attr", "set_attr"]


@dataclass(frozen=True)
class ParamSpec:
    """How one parameter lives on this rank."""

    name: str
    """Dotted attribute path on the module (`blocks.0.attn.qkv.weight`)."""
    unit: str
    global_shape: tuple[int, ...]
    tp_dim: int | None = None
    """Dim split across the TP group (None: replicated)."""
    blocks: tuple[int, ...] = ()
    """Split block by block (fused qkv): `tp_dim` cut into blocks of these sizes, each split."""
    tp_group: GroupRef = field(default_factory=lambda: GroupRef((0,)))
    dp_group: GroupRef = field(default_factory=lambda: GroupRef((0,)))
    grad_sum_tp: bool = False
    """The gradient is a partial sum over the TP group (sequence-parallel norms, biases)."""
    alias_of: str | None = None
    """A tied parameter: the same object as the parameter named here (synced once)."""
    zero3_shape: tuple[int, ...] | None = None
    """ZeRO-3: the shape of the parameter's TP piece (stored in the unit's flat shard)."""
    zero3_flat: str = ""
    """ZeRO-3: the module attribute holding the unit's flat shard."""
    zero3_offset: int = 0
    """ZeRO-3: where the parameter starts in the unit's flattened (unsharded) buffer."""


def get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(gm: nn.Module, target: str, value: Any) -> None:
    *path, last = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, last, value)


@dataclass(frozen=True)
class StageSplit:
    graph_module: fx.GraphModule
    """Runs the stages in order: the same outputs as the graph it was cut from. It takes the
    graph's placeholders flat, in order (the export's pytree calling convention is not
    carried over by `split_by_tags`)."""
    stages: tuple[str, ...]
    """Submodule names, in order (`stage_0`, ...)."""
    param_names: tuple[dict[str, str], ...]
    """Per stage: its parameter names -> the model's."""

    def stage(self, k: int) -> fx.GraphModule:
        module = getattr(self.graph_module, self.stages[k])
        assert isinstance(module, fx.GraphModule)
        return module


@dataclass
class RankProgram:
    """One rank's lowered program: what `lower()` returns."""

    graph_module: fx.GraphModule
    """The rewritten graph (collectives, local shapes, this rank's parameter pieces)."""
    params: dict[str, ParamSpec]
    """How every parameter of the graph lives on this rank, by attribute path."""
    plan: Plan
    """The plan the graph was lowered under (for a pipeline: one stage's, world = its ranks)."""
    rank: int
    """This rank's position among the ranks the plan spans."""
    stages: StageSplit | None = None
    """With pipeline stages: the graph cut into one submodule per stage."""
    rank_offset: int = 0
    """With pipeline stages: the first global rank of this rank's stage (`rank` is local)."""

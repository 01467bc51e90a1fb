"""The compiler's node-meta keys and their typed helpers.

PyTorch's own keys (`val`, `nn_module_stack`, ...) are read-only to us. Ours start with `gfx_`
and are read and written only through the `MetaKey` objects below. Values are frozen
dataclasses because FX utilities copy `node.meta` shallowly: a mutable value would be shared
between the copies.

A user pass can declare a key of its own with `MetaKey("gfx_mine", MyFrozenDataclass)`; the
pass runner then checks it like the built-in ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from torch import fx

__all__ = [
    "COST",
    "LAYER",
    "PLACEMENT",
    "REGISTRY",
    "LayerTag",
    "MetaKey",
    "NodeCost",
    "NodePlacement",
    "node_label",
]

T = TypeVar("T")

REGISTRY: dict[str, MetaKey[Any]] = {}
"""Every declared `gfx_` key by name; the pass runner rejects undeclared ones."""


class MetaKey(Generic[T]):
    """A typed node-meta key. `get` fails with the node's name when the key is missing."""

    name: str
    value_type: type[T]
    doc: str

    def __init__(self, name: str, value_type: type[T], doc: str = "") -> None:
        if not name.startswith("gfx_"):
            raise ValueError(f"meta key {name!r}: compiler keys must start with 'gfx_'")
        if not (dataclasses.is_dataclass(value_type) and value_type.__dataclass_params__.frozen):  # type: ignore[attr-defined]
            raise ValueError(
                f"meta key {name!r}: value type {value_type!r} must be a frozen dataclass"
            )
        if name in REGISTRY and REGISTRY[name].value_type is not value_type:
            raise ValueError(f"meta key {name!r} is already declared with another type")
        self.name = name
        self.value_type = value_type
        self.doc = doc
        REGISTRY[name] = self

    def has(self, node: fx.Node) -> bool:
        return self.name in node.meta

    def get(self, node: fx.Node) -> T:
        try:
            return node.meta[self.name]
        except KeyError:
            raise KeyError(
                f"node {node_label(node)} has no {self.name!r}; run the pass that writes it first"
            ) from None

    def set(self, node: fx.Node, value: T) -> None:
        if not isinstance(value, self.value_type):
            raise TypeError(
                f"{self.name} on node {node.name!r} must be {self.value_type.__name__}, "
                f"got {type(value).__name__}"
            )
        node.meta[self.name] = value

    def __repr__(self) -> str:
        return f"MetaKey({self.name!r}, {self.value_type.__name__})"


def node_label(node: fx.Node) -> str:
    """`name (target)` with the innermost module path, for error messages."""
    stack = node.meta.get("nn_module_stack") or {}
    where = f" in {list(stack.values())[-1][0] or '<root>'}" if stack else ""
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name!r} ({node.op} {target}{where})"


@dataclass(frozen=True)
class LayerTag:
    """Which layer (an instance of a repeated block) or segment a node belongs to."""

    name: str
    """Layer: the module path (`transformer.h.3`). Segment: `embedding`, `head`, `loss` or
    `glue_<i>` for nodes between two stacks."""
    kind: Literal["layer", "segment"]
    group: str
    """Layer: the stack's module path (`transformer.h`). Segment: its own name."""
    index: int
    """Position of the unit in execution order (layers and segments numbered together)."""
    fingerprint: str
    """Hash of the unit's structure: equal fingerprints mean equal costs."""


@dataclass(frozen=True)
class NodeCost:
    """Analytic cost of one node for one forward and backward at the captured shapes."""

    fwd_flops: int = 0
    """FLOPs of the forward, from `torch.utils.flop_counter`'s formulas."""
    bwd_flops: int = 0
    """FLOPs of the ops autograd runs for this node's backward."""
    fwd_bytes: int = 0
    """Bytes read and written by the forward: inputs plus outputs (roofline memory traffic)."""
    bwd_bytes: int = 0
    """Bytes read and written by the ops autograd runs for this node's backward."""
    bwd_kernels: int = 0
    """How many ops (kernels) that backward runs, views excluded."""
    param_bytes: int = 0
    """Bytes of the parameter this `get_attr` node holds (0 for a repeated tied parameter)."""
    params: int = 0
    """Elements of that parameter: sums to `sum(p.numel())` over the graph."""
    saved_bytes: int = 0
    """Activation bytes autograd saves for backward while running this node (parameters and
    buffers excluded, each storage counted once)."""
    saved: tuple[tuple[str, int, bool], ...] = ()
    """The storages in `saved_bytes`: (name of the node that produced it, or "" for a tensor
    the op made itself; bytes; whether another node of the unit saves it too)."""


LAYER: MetaKey[LayerTag] = MetaKey("gfx_layer", LayerTag, "the layer or segment of a node")
COST: MetaKey[NodeCost] = MetaKey("gfx_cost", NodeCost, "analytic FLOPs, bytes and memory")


@dataclass(frozen=True)
class NodePlacement:
    """How a node's value is laid out on its layer's (dp, tp) device mesh, and what the
    rewrite must do before the op runs. Placements are DTensor's `Replicate()`,
    `Shard(dim)` and `Partial(op)`; a tuple for ops with several outputs."""

    dp: Any
    """Placement across the data-parallel replicas (activations: `Shard(0)` on the batch)."""
    tp: Any
    """Placement across the tensor-parallel group."""
    kind: str = ""
    """What the rules chose, "+"-joined over the axes: `column`, `row`, `fallback` (inputs
    gathered), `global_mean`, `vocab` (vocab-parallel embedding), `vocab_ce`, or empty."""
    needs: tuple[tuple[str, str, Any], ...] = ()
    """(input node name, axis `dp`/`tp`, placement) to redistribute before the op runs; axis
    `switch` means the input crosses from a unit on another mesh (placement: (dp, tp))."""
    blocks: tuple[int, ...] = ()
    """A column-parallel linear whose output dim is cut into blocks of these (global) sizes
    by its readers (a fused qkv's q, k and v): each block is split across the TP group."""
    batch: bool = False
    """The value carries the batch on dim 0 (it derives from the batch inputs through ops
    that keep it there): a data-parallel unit must run it split."""

    @property
    def kinds(self) -> tuple[str, ...]:
        """`kind` split on "+" (an op can be, say, batch-split and vocab-parallel at once)."""
        return tuple(k for k in self.kind.split("+") if k)


PLACEMENT: MetaKey[NodePlacement] = MetaKey(
    "gfx_placement", NodePlacement, "placements on the layer's mesh and redistributions"
)

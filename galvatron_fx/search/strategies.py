"""Candidate strategies for one layer: Galvatron's decision tree, its pruning rules, dominance.

A stage of `devices` is split into tensor parallelism (tp, a power of two: a TP group lies
inside a node, whose device count it divides), and plain data parallelism (dp) or sharded
data parallelism (sdp, ZeRO) of any degree for the rest (`tp x dp = devices`). Galvatron
splits level by level, a factor of two per level; for a power-of-two stage this is the same
tree (its runs of levels are these degrees). Galvatron's rules, as implemented here:

- pipeline first, across device islands: the outer search gives each stage `world / pp`
  devices for any pp dividing the world, whole nodes or within one node
  (`pipeline_degrees`, `stages_fit_nodes`);
- each of tp / dp / sdp forms one contiguous run of levels, so a tree is an ordering of at most
  two kinds with their degrees; which kind takes the innermost levels gets consecutive ranks
  (`tp_consecutive`);
- a tree mixing plain and sharded data parallelism is pruned;
- a TP group that would leave a node is pruned.

Every surviving split then takes the flags the runtime offers: sequence parallelism (tp > 1,
layers: a segment's input is gathered by a layout switch instead) as Megatron-SP inside the
TP group or as Ulysses (the group splits the sequence instead of the weights), the ZeRO stage of its
sharded data parallelism (1, 2 or 3), recomputation (layers: none, selective, full), and for
segments the vocabulary split; a Ulysses group without data-parallel levels may still take
a ZeRO stage (its whole weights are sharded over the group itself). Dominance pruning (`dominated`) removes, per
layer, a candidate that is no faster and no smaller than another of the same layout.
Pure: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from galvatron_fx.plan import DPMode, LayerStrategy, Recompute

__all__ = [
    "StorageLayout",
    "candidates",
    "decision_tree",
    "divisors",
    "dominated",
    "layout_key",
    "pipeline_degrees",
    "same_as_consecutive",
    "stages_fit_nodes",
    "storage_layout",
    "tp_degrees",
    "tp_inside_node",
    "world_splits",
]


def divisors(n: int) -> list[int]:
    """Every divisor of n >= 1, ascending."""
    if n < 1:
        raise ValueError(f"divisors: expected a count >= 1, got {n}")
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def tp_degrees(n: int) -> list[int]:
    """The powers of two dividing n >= 1 (1, 2, 4, ...): the TP degrees a group of n
    devices can take."""
    if n < 1:
        raise ValueError(f"tp_degrees: expected a device count >= 1, got {n}")
    return [1 << k for k in range((n & -n).bit_length())]


@dataclass(frozen=True)
class Split:
    """One leaf of the decision tree: how a stage's devices divide, before the flags."""

    tp: int
    dp: int
    sharded: bool
    """The data-parallel levels are sdp (ZeRO) rather than plain dp."""
    tp_consecutive: bool


def decision_tree(devices: int) -> list[Split]:
    """Every ordering of tp (a power of two dividing `devices`) and one kind of data
    parallelism (the rest) (mixed dp/sdp trees never generated: they are pruned by
    construction)."""
    leaves: list[Split] = []
    for tp in tp_degrees(devices):
        dp = devices // tp
        for sharded in (False, True):
            if dp == 1 and sharded:
                continue  # no data-parallel levels: sdp and dp are the same tree
            orders = (True, False) if tp > 1 and dp > 1 else (True,)
            leaves.extend(Split(tp, dp, sharded, inner) for inner in orders)
    return leaves


def tp_inside_node(split: Split, devices_per_node: int) -> bool:
    """Every TP group of `split` lies inside one node. The group's degree divides the node
    (stages start at multiples of their size, so consecutive groups never straddle a node
    boundary), and its span, strided by the data-parallel degree, fits in a node."""
    stride = 1 if split.tp_consecutive else split.dp
    return devices_per_node % split.tp == 0 and (split.tp - 1) * stride + 1 <= devices_per_node


def same_as_consecutive(split: Split, devices_per_node: int) -> bool:
    """A strided TP group inside one node: the same links as the consecutive tree (and the
    data-parallel group then spans no more nodes), so it is the same candidate."""
    return not split.tp_consecutive and split.tp * split.dp <= devices_per_node


def candidates(
    devices: int,
    devices_per_node: int,
    *,
    segment: bool = False,
    zero_stages: Sequence[DPMode] = (DPMode.ZERO1, DPMode.ZERO2, DPMode.ZERO3),
) -> list[LayerStrategy]:
    """The pruned tree's leaves with every flag, in a fixed order (simplest first: the
    search breaks ties by this order)."""
    out: list[LayerStrategy] = []
    for split in decision_tree(devices):
        if not tp_inside_node(split, devices_per_node):
            continue
        if same_as_consecutive(split, devices_per_node):
            continue
        modes = zero_stages if split.sharded else (DPMode.ALLREDUCE,)
        # (Megatron-SP, Ulysses) per candidate: layers with a group may take either
        sps = (
            ((False, False), (True, False), (False, True))
            if split.tp > 1 and not segment
            else ((False, False),)
        )
        recomputes = (Recompute.NONE,) if segment else tuple(Recompute)
        vocabs = (False, True) if segment and split.tp > 1 else (False,)
        for sp, ulysses in sps:
            # a Ulysses group with no dp levels still shards its whole weights over itself
            own = (DPMode.ALLREDUCE, *zero_stages) if ulysses and split.dp == 1 else modes
            for mode in own:
                for vocab in vocabs:
                    for rc in recomputes:
                        out.append(
                            LayerStrategy(
                                tp=split.tp,
                                sp=sp,
                                ulysses=ulysses,
                                dp=split.dp,
                                dp_mode=mode,
                                recompute=rc,
                                tp_consecutive=split.tp_consecutive,
                                vocab_parallel=vocab,
                            )
                        )
    return out


def layout_key(s: LayerStrategy) -> tuple[int, int, bool]:
    """What the residual stream between two units looks like under `s`: batch split dp ways,
    sequence split tp ways under sp or Ulysses, and which ranks form the groups. Equal keys:
    no layout switch between adjacent units."""
    return (s.dp, s.seq_split, s.tp_consecutive or s.tp == 1 or s.dp == 1)


StorageLayout = tuple[int, int, bool, bool]


def storage_layout(s: LayerStrategy) -> StorageLayout:
    """How a unit stores its weights: tp, dp, TP rank order (only with tp, dp > 1), vocab.
    Units sharing a weight (tied embeddings) must agree on it: the one definition that the
    search imposes and `plan_checks` enforces."""
    return (s.tp, s.dp, s.tp_consecutive or s.tp == 1 or s.dp == 1, s.vocab_parallel)


def stages_fit_nodes(world: int, stage_devices: int, devices_per_node: int) -> bool:
    """Whether every pipeline stage of `stage_devices` consecutive ranks (out of `world`)
    lies inside one node or is made of whole nodes. A stage that shares a node with the
    next one and also reaches into another (6-device stages on nodes of 8) would be priced
    as inside a node while some of its groups cross one: such a pipeline degree is not
    offered. One stage of the whole world always fits (the world is what it is)."""
    if stage_devices == world:
        return True
    if stage_devices % devices_per_node == 0:
        return True
    return all(
        start // devices_per_node == (start + stage_devices - 1) // devices_per_node
        for start in range(0, world, stage_devices)
    )


def pipeline_degrees(world: int, units: int, devices_per_node: int) -> list[int]:
    """Pipeline degrees to try: every divisor of the world, at most one unit a stage, whose
    stages fit the nodes (`stages_fit_nodes`)."""
    return [
        p
        for p in divisors(world)
        if p <= units and stages_fit_nodes(world, world // p, devices_per_node)
    ]


def world_splits(
    world: int,
    units: int,
    devices_per_node: int,
    tps: Sequence[int],
    global_batch: int,
    max_pipeline: int | None = None,
) -> list[tuple[int, int, int]]:
    """Every (pp, tp, dp) with pp x tp x dp = `world` that some plan can take: pp one of
    `pipeline_degrees` (at most `max_pipeline`), tp one of `tps` (the degrees the model
    allows) inside a node, and dp dividing the global batch."""
    out = []
    for p in pipeline_degrees(world, units, devices_per_node):
        if max_pipeline is not None and p > max_pipeline:
            continue
        d = world // p
        for tp in tps:
            if d % tp == 0 and devices_per_node % tp == 0 and global_batch % (d // tp) == 0:
                out.append((p, tp, d // tp))
    return out


def dominated(costs: np.ndarray, layouts: Sequence[object]) -> np.ndarray:
    """Mask of candidates to drop: another candidate of the same layout is no worse in every
    column of `costs` (candidates x terms: time, memory terms, ...) and better in one, or
    equal in all and earlier. Within one layout only: a slower, larger candidate of another
    layout may still win by saving a layout switch."""
    n = len(costs)
    drop = np.zeros(n, dtype=bool)
    for i in range(n):
        same = np.array([layouts[j] == layouts[i] for j in range(n)])
        no_worse = np.all(costs <= costs[i], axis=1) & same
        better = np.any(costs < costs[i], axis=1)
        earlier_equal = np.arange(n) < i
        no_worse[i] = False
        if np.any(no_worse & (better | earlier_equal) & ~drop):
            drop[i] = True
    return drop

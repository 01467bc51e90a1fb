"""The search space in numbers: candidate counts before and after each pruning rule.

Galvatron (VLDB'23) counts its decision tree over all pipeline degrees: for 8 GPUs, 34
strategies (pp first, then tp, dp and sdp each at most once, in any order, power-of-two
degrees) and 22 once trees mixing dp and sdp are pruned. `space_counts` counts the same tree
the same way, for any world: pipeline degrees dividing it whose stages fit the nodes
(`strategies.pipeline_degrees`), tp degrees powers of two, dp and sdp degrees any divisor
(on a power-of-two world, exactly Galvatron's tree), then applies this compiler's rules one at a time (`strategies.candidates` is
their result), then the flags every surviving split takes. Dominance pruning depends on the
model and the batch: `dominance_counts` prices one layer's candidates and counts what
survives. Pure counting, no torch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from galvatron_fx.plan import LayerStrategy
from galvatron_fx.search.strategies import (
    Split,
    candidates,
    divisors,
    dominated,
    layout_key,
    pipeline_degrees,
    same_as_consecutive,
    tp_degrees,
    tp_inside_node,
)

__all__ = ["GALVATRON_8_GPUS", "SpaceRow", "dominance_counts", "space_counts", "trees"]

GALVATRON_8_GPUS = (34, 22)
"""Galvatron's published counts for 8 GPUs: the tree, and after the dp/sdp-mix rule."""


@dataclass(frozen=True)
class Tree:
    """One leaf of the unpruned tree: a pipeline degree and an ordered run of (kind,
    degree) levels, outermost first (kinds: t = tp, d = dp, s = sdp)."""

    pipeline: int
    levels: tuple[tuple[str, int], ...]

    @property
    def mixes_dp_and_sdp(self) -> bool:
        kinds = {k for k, _ in self.levels}
        return {"d", "s"} <= kinds

    def split(self) -> Split:
        degree = dict(self.levels)
        kinds = [k for k, _ in self.levels]
        tp = degree.get("t", 1)
        dp = degree.get("d", 1) * degree.get("s", 1)
        consecutive = not kinds or kinds[-1] == "t" or tp == 1
        return Split(tp, dp, "s" in degree, consecutive)


def _ordered(devices: int) -> Iterator[tuple[tuple[str, int], ...]]:
    """Every ordered run of distinct kinds whose degrees (>= 2) multiply to `devices`: tp's
    a power of two, dp's and sdp's any divisor."""
    if devices == 1:
        yield ()
        return
    degrees = {
        "t": [d for d in tp_degrees(devices) if d > 1],
        "d": [d for d in divisors(devices) if d > 1],
        "s": [d for d in divisors(devices) if d > 1],
    }
    for count in (1, 2, 3):
        for kinds in itertools.permutations("tds", count):
            for ds in itertools.product(*(degrees[k] for k in kinds)):
                if math.prod(ds) == devices:
                    yield tuple(zip(kinds, ds, strict=True))


def trees(world: int, devices_per_node: int) -> list[Tree]:
    """The unpruned tree over every pipeline degree (stages of world / pp devices that fit
    the nodes)."""
    return [
        Tree(p, levels)
        for p in pipeline_degrees(world, world, devices_per_node)
        for levels in _ordered(world // p)
    ]


@dataclass(frozen=True)
class SpaceRow:
    rule: str
    count: int
    """Candidates left after this rule, summed over the pipeline degrees."""


def space_counts(world: int, devices_per_node: int) -> list[SpaceRow]:
    """Counts after each rule, in the order the rules apply."""
    dpn = min(devices_per_node, world)
    left = trees(world, dpn)
    rows = [SpaceRow("decision tree: pp first, then tp / dp / sdp once each", len(left))]
    rules: list[tuple[str, Callable[[Tree], bool]]] = [
        ("no tree mixing dp and sdp", lambda t: not t.mixes_dp_and_sdp),
        ("TP groups inside a node", lambda t: tp_inside_node(t.split(), dpn)),
        (
            "strided TP inside one node = consecutive",
            lambda t: not same_as_consecutive(t.split(), dpn),
        ),
    ]
    for name, keep in rules:
        left = [t for t in left if keep(t)]
        rows.append(SpaceRow(name, len(left)))
    flagged = sum(len(candidates(world // p, dpn)) for p in pipeline_degrees(world, world, dpn))
    rows.append(
        SpaceRow("x flags: sp (none / Megatron / Ulysses), ZeRO 1-3, recomputation", flagged)
    )
    return rows


def dominance_counts(
    price: Callable[[LayerStrategy], tuple[float, ...] | None], world: int, devices_per_node: int
) -> tuple[int, int]:
    """(candidates priced, left after dominance) for one layer over every pipeline degree;
    `price(strategy)` gives its cost row, None where it cannot run."""
    total = kept = 0
    dpn = min(devices_per_node, world)
    for p in pipeline_degrees(world, world, dpn):
        rows, keys = [], []
        for s in candidates(world // p, dpn):
            row = price(s)
            if row is not None:
                rows.append(row)
                keys.append(layout_key(s))
        if rows:
            total += len(rows)
            kept += int(np.sum(~dominated(np.array(rows), keys)))
    return total, kept

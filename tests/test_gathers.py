"""`galvatron_fx.gathers`: the ops that would gather under tp or dp, found by the real
sharding propagation before anything runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_GPT, build
from torch import nn

import galvatron_fx as gfx
from galvatron_fx.gathers import (
    Gather,
    find_gathers,
    format_gathers,
    largest_tp,
    representative_plan,
)
from galvatron_fx.meta import PLACEMENT
from galvatron_fx.plan import LayerShape, LayerStrategy

HIDDEN, VOCAB, SEQ = 32, 64, 8


class _CumsumBlock(nn.Module):
    """A block that sums (cumsum: its rule gathers) and flips (no rule) along the hidden
    dim, which tp splits after `fc`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.proj = nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return x + self.proj(torch.cumsum(h, dim=-1) + torch.flip(h, dims=[-1]))


class CumsumModel(nn.Module):
    """Two cumsum blocks, and a head that sums along the batch, which dp splits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(_CumsumBlock() for _ in range(2))
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.head(torch.cumsum(x, dim=0))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _cumsum_graph(batch: int = 16) -> torch.fx.GraphModule:
    with torch.device("meta"):
        model = CumsumModel()
        idx, targets = torch.randint(0, VOCAB, (2, batch, SEQ))
    return gfx.analyze(model, (idx, targets)).graph_module


def test_ops_without_a_rule_or_whose_rule_gathers_are_listed_per_layer_and_axis():
    gm = _cumsum_graph()
    check = find_gathers(gm)
    cumsum, flip = str(torch.ops.aten.cumsum.default), str(torch.ops.aten.flip.default)
    assert [(g.unit, g.op, g.axis, g.fallback) for g in check.gathers] == [
        ("blocks.0", cumsum, "tp", False),
        ("blocks.0", flip, "dp", True),  # no rule: gathered on both axes, the batch too
        ("blocks.0", flip, "tp", True),
        ("blocks.1", cumsum, "tp", False),
        ("blocks.1", flip, "dp", True),
        ("blocks.1", flip, "tp", True),
        ("head", cumsum, "dp", False),
        ("loss", str(torch.ops.aten.cross_entropy_loss.default), "dp", True),  # targets
    ]
    assert check.gathers[0] == Gather("blocks.0", cumsum, "cumsum", "tp", ("linear",), False)
    # the pass warns once per op and axis where no rule applied, naming the layers
    assert len(check.warnings) == 3
    assert "aten.flip.default (tp axis)" in check.warnings[1] and "blocks.1" in check.warnings[1]
    text = format_gathers(check)
    assert "layers tp8 dp2; segments dp16" in text
    rows = [line.split() for line in text.splitlines()[1:]]
    assert rows[0] == ["unit", "op", "axis", "why", "nodes"]
    assert ["blocks.1", flip, "tp", "no", "rule", "flip_1"] in rows
    assert ["head", cumsum, "dp", "by", "rule", "cumsum_2"] in rows
    assert not any(PLACEMENT.has(n) for n in gm.graph.nodes), "the analysed graph is untouched"


def test_the_tiny_gpt_gathers_nothing():
    model, args, kwargs = build(TINY_GPT, "meta", batch=8)
    check = find_gathers(gfx.analyze(model, args, kwargs).graph_module)
    assert check.gathers == () and check.warnings == ()
    assert "none: every op keeps its inputs split" in format_gathers(check)


def test_the_representative_plan_takes_the_largest_tp_the_heads_and_widths_allow():
    assert largest_tp(LayerShape(heads=(12,), tp_split_dims=(("w[0]", 768),)), 8) == 6
    assert largest_tp(LayerShape(heads=(4,), tp_split_dims=(("w[0]", 6),)), 8) == 2
    assert largest_tp(LayerShape(), 8) == 8  # nothing to split evenly: any degree
    model, args, kwargs = build(TINY_GPT, "meta", batch=8)  # 4 heads
    plan = representative_plan(gfx.analyze(model, args, kwargs).graph_module)
    assert plan.world_size == 8
    assert {(s.tp, s.dp) for u, s in plan.strategies if u.startswith("blocks.")} == {(4, 2)}
    assert plan.strategy("embedding") == LayerStrategy(dp=8)


def test_a_batch_the_plan_cannot_split_is_refused_with_the_batch_to_use():
    with pytest.raises(ValueError, match="capture with a batch of 16"):
        find_gathers(_cumsum_graph(batch=2))

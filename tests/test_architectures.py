"""Architectures the reference models do not cover, written here as plain `nn.Module`s, each
compiled on gloo ranks and compared with the unmodified model in one process
(`tests/exactness.py`: loss, every gradient, parameters after AdamW steps).

- Modules registered out of data-flow order: a GPT whose final norm and head are attributes
  set before its embedding and blocks. Export places parameter reads in registration order;
  the units must still run embedding -> blocks -> head -> loss, and ZeRO-3's gathers (chained
  from one unit to the next) must follow that order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from distributed import run_ranks
from exactness import BATCH, SEQ, adamw, check, reference_of, run_steps
from torch import nn

from galvatron_fx import parallelize
from galvatron_fx.lowering import analyze
from galvatron_fx.meta import LAYER
from galvatron_fx.plan import DPMode, LayerStrategy

WORLD = 4
VOCAB, HIDDEN, HEADS, LAYERS = 64, 32, 4, 2

Built = tuple[nn.Module, tuple[torch.Tensor, ...]]


def _run_uniform(rank: int, world: int, make: Callable[[], Built], s: LayerStrategy) -> Any:
    model, args = make()
    analysis = analyze(model, args)
    plan = analysis.plan(s, world_size=world)
    return run_steps(parallelize(analysis, plan=plan, optimizer=adamw), args, {})


# --- modules registered out of data-flow order ------------------------------------------


class _Block(nn.Module):
    """Pre-norm causal self-attention and MLP (nanoGPT's block, sdpa attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(HIDDEN)
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.ln_2 = nn.LayerNorm(HIDDEN)
        self.fc = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.fc_out = nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(HIDDEN, dim=-1)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class HeadFirstGPT(nn.Module):
    """A GPT whose final norm and head are registered before its embedding and blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        self.wpe = nn.Embedding(SEQ, HIDDEN)
        self.blocks = nn.ModuleList(_Block() for _ in range(LAYERS))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def make_head_first_gpt() -> Built:
    torch.manual_seed(0)
    idx, targets = torch.randint(0, VOCAB, (2, BATCH, SEQ))
    return HeadFirstGPT(), (idx, targets)


def test_head_registered_before_blocks_units_in_data_flow_order() -> None:
    model, args = make_head_first_gpt()
    analysis = analyze(model, args)
    blocks = [f"blocks.{i}" for i in range(LAYERS)]
    assert analysis.units == ["embedding", *blocks, "head", "loss"]
    index = {LAYER.get(n).name: LAYER.get(n).index for n in analysis.graph.nodes}
    assert [index[u] for u in analysis.units] == list(range(len(analysis.units)))
    reads = [LAYER.get(n).index for n in analysis.graph.nodes if n.op == "get_attr"]
    assert reads == sorted(reads), "parameter reads must follow the units' order"


@pytest.mark.parametrize(
    "strategy",
    [LayerStrategy(dp=WORLD, dp_mode=DPMode.ZERO3), LayerStrategy(dp=WORLD)],
    ids=["zero3", "dp"],
)
def test_head_registered_before_blocks_matches_one_process(strategy: LayerStrategy) -> None:
    got = run_ranks(_run_uniform, WORLD, make_head_first_gpt, strategy)
    ref = reference_of(lambda: (*make_head_first_gpt(), {}))
    for rank, result in enumerate(got):
        check(ref, result, f"rank {rank}, {strategy}")

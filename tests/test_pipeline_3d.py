"""3D plans: pipeline stages with tensor, data and ZeRO parallelism inside them, on 4 gloo
ranks, give the single-process loss and gradients."""

from __future__ import annotations

import pytest
from conftest import build
from test_split_stages import SPEC, check_against_one_process

from galvatron_fx.compile import analyze
from galvatron_fx.plan import LayerStrategy, PipelineConfig, Plan

TP2 = LayerStrategy(tp=2)
TP2_SP = LayerStrategy(tp=2, sp=True)
ZERO3 = LayerStrategy(dp=2, dp_mode="zero3")
ZERO1_RC = LayerStrategy(dp=2, dp_mode="zero1", recompute="full")
DP2 = LayerStrategy(dp=2)


def _mixed(unit: str) -> LayerStrategy:
    """Every kind once: embeddings in plain DP, blocks alternating TP+SP, ZeRO-3,
    ZeRO-1 with recomputation and TP, the head vocabulary-parallel."""
    by_unit = {
        "blocks.0": TP2_SP,
        "blocks.1": ZERO3,
        "blocks.2": ZERO1_RC,
        "blocks.3": TP2,
        "head": LayerStrategy(tp=2, vocab_parallel=True),
    }
    return by_unit.get(unit, DP2)


PLANS = {
    "pp2xtp2": lambda unit: TP2,
    "pp2xzero3": lambda unit: ZERO3,
    "pp2xmixed": _mixed,
}


def _plan(analysis, kind: str, schedule: str) -> Plan:
    chunks = 2 if schedule == "interleaved-1f1b" else 1
    starts = ("blocks.2",) if chunks == 1 else ("blocks.1", "blocks.2", "blocks.3")
    fingerprint = analysis.plan(LayerStrategy(), world_size=1).model_fingerprint
    pipeline = PipelineConfig(
        degree=2, stage_starts=starts, micro_batches=4, schedule=schedule, virtual_stages=chunks
    )
    strategies = tuple((u, PLANS[kind](u)) for u in analysis.units)
    return Plan(4, strategies, fingerprint, pipeline)


@pytest.mark.parametrize(
    ("kind", "schedule"),
    [
        ("pp2xtp2", "1f1b"),
        ("pp2xzero3", "1f1b"),
        ("pp2xmixed", "1f1b"),
        ("pp2xmixed", "interleaved-1f1b"),
    ],
    ids=str,
)
def test_3d_plans_match_one_process(kind, schedule):
    model, args, kwargs = build(SPEC, batch=8, seq=16)
    check_against_one_process(_plan(analyze(model, args, kwargs), kind, schedule))

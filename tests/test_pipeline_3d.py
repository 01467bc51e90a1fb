"""3D plans: pipeline stages with tensor, data and ZeRO parallelism inside them, on 4 gloo
ranks, train like the unmodified model in one process (`tests/exactness.py`: the loss and
every gradient after one AdamW step, every parameter after three)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import build
from exactness import BATCH, SEQ, adamw, check, reference, run_steps
from test_split_stages import SPEC, check_against_one_process

from galvatron_fx.lowering import analyze
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
    chunks = 2 if schedule.startswith("interleaved") else 1
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
        ("pp2xtp2", "interleaved-zb"),
    ],
    ids=str,
)
def test_3d_plans_match_one_process(kind, schedule):
    model, args, kwargs = build(SPEC, batch=BATCH, seq=SEQ)
    check_against_one_process(_plan(analyze(model, args, kwargs), kind, schedule))


def _searched(rank: int, world: int) -> dict[str, Any]:
    import galvatron_fx as gfx

    model, args, kwargs = build(SPEC, batch=BATCH, seq=SEQ)
    compiled = gfx.compile(
        model, args, kwargs, cluster="a100-80gb-sxm", memory_budget_gb=0.002, optimizer=adamw
    )
    return {"plan": compiled.plan, **run_steps(compiled, args, kwargs)}


def test_compile_searches_a_3d_plan_and_trains_it():
    """A budget too small for data parallelism: the search (rank 0, broadcast) picks
    pipeline stages (on the A100 preset every kernel of this toy model is under its launch
    floor and a collective costs more than the compute it would split, so whole layers go
    to stages: 4 of them, one micro-batch); three AdamW steps give every rank the unmodified
    model's losses, gradients and weights. Given 3-D plans are the tests above."""
    from distributed import run_ranks

    ref = reference(SPEC)
    results = run_ranks(_searched, 4)
    plan = results[0]["plan"]
    assert plan.pipeline.degree >= 2
    assert {s.tp * s.dp for _, s in plan.strategies} == {4 // plan.pipeline.degree}
    assert all(r["plan"] == plan for r in results)
    for rank, got in enumerate(results):
        check(ref, got, f"rank {rank}, searched plan:\n{plan.table()}")


def test_zero_bubble_with_data_parallel_stages_is_refused():
    """Plan validation refuses it, whoever builds the plan (compile, a JSON file)."""
    from galvatron_fx.plan import PlanError

    model, args, kwargs = build(SPEC, batch=BATCH, seq=SEQ)
    analysis = analyze(model, args, kwargs)
    with pytest.raises(
        PlanError, match=r"'interleaved-zb' does not compose .*\(unit 'embedding' has dp > 1\)"
    ):
        _plan(analysis, "pp2xzero3", "interleaved-zb")

"""`gfx.price` and `galvatron-fx cost`: a whole plan (strategies, pipeline stages, micro-batches,
schedule, chunks) priced as the search prices it.

A plan the search returned is priced at the step time the search predicted; a hand-built
pipelined plan at the step time worked out by hand from its units' option costs (the
schedule's bubble, the stage boundary's send, the micro-batches each stage holds); `cost`
prints the search's number for a strategy, and `price_plan`'s collectives and activations
are at the trained width, as the search's.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import build

import galvatron_fx as gfx
from galvatron_fx.cli import main
from galvatron_fx.cost_models.hardware import load_cluster
from galvatron_fx.lowering import analyze
from galvatron_fx.plan import LayerStrategy, PipelineConfig, PlanError, Schedule
from galvatron_fx.plan_checks import shared_weights
from galvatron_fx.planning.model_terms import model_terms
from galvatron_fx.planning.price import price_plan
from galvatron_fx.planning.search_step import search_analysis
from galvatron_fx.search.dp import evaluate
from galvatron_fx.search.planner import Config, SearchSpace, solve_config

GPT4 = "gpt:layers=4,hidden=128,heads=4,vocab=256,seq=64"
TIED = GPT4 + ",tied=1"
BATCH, SEQ, HIDDEN = 8, 32, 128
A100 = "a100-80gb-sxm"


@pytest.fixture(scope="module")
def analysis():
    model, args, kwargs = build(GPT4, device="meta", batch=BATCH, seq=SEQ)
    return analyze(model, args, kwargs)


@pytest.fixture(scope="module")
def tied():
    model, args, kwargs = build(TIED, device="meta", batch=BATCH, seq=SEQ)
    return analyze(model, args, kwargs)


@pytest.mark.parametrize("budget_gb", [80.0, 0.006], ids=["one stage", "pipelined"])
def test_price_of_a_searched_plan_is_the_searchs_prediction(tied, budget_gb):
    """6 MB a device cannot hold the tied GPT's states on one stage of 4 devices: the
    search pipelines it, and each later stage holds a copy of the tied embedding."""
    cluster = load_cluster(A100)
    found = search_analysis(
        tied,
        cluster=cluster,
        memory_budget_gb=budget_gb,
        global_batch=BATCH,
        world_size=4,
        baselines=False,
    )
    assert (found.plan.pipeline.degree > 1) == (budget_gb < 1), found.plan.table()
    priced = gfx.price(tied, found.plan, cluster, memory_budget_gb=budget_gb)
    assert priced.step_time_s == pytest.approx(found.predicted["step_time_s"], rel=1e-9)
    assert priced.samples_per_s == pytest.approx(BATCH / priced.step_time_s)
    # the search charges memory rounded up to its buckets: never less than the exact sum
    for exact, bucketed in zip(
        priced.peak_memory_bytes, found.predicted["peak_memory_bytes"], strict=True
    ):
        assert 0 < exact <= bucketed <= budget_gb * 2**30


def _interleaved(tied):
    """The DP's best plan for the tied GPT on 4 devices as 2 stages x 2 chunks, 4
    micro-batches, strategies and cut chosen freely."""
    cluster = load_cluster(A100)
    terms = model_terms(tied, cluster, [1, 2])
    (shared,) = shared_weights(tied.graph_module)
    space = SearchSpace(
        terms,
        cluster,
        4,
        BATCH,
        2**30,
        "mixed",
        ties=(shared.units,),
        copies={"head": shared.numel},
    )
    config = Config(2, 4, Schedule.INTERLEAVED_1F1B, 2)
    found = solve_config(space, config, space.problem(config))
    return found.plan(terms, 4), found.solution


def test_price_of_an_interleaved_plan_is_the_dps(tied):
    plan, solution = _interleaved(tied)
    assert plan.pipeline.virtual_stages == 2 and len(plan.pipeline.stage_starts) == 3
    priced = gfx.price(tied, plan, A100)
    assert priced.step_time_s == pytest.approx(solution.time_s, rel=1e-9)
    assert priced.stage_time_s == pytest.approx(solution.stage_time_s, rel=1e-9)
    assert len(priced.peak_memory_bytes) == 2  # per device, each running 2 of the 4 stages
    by_device = [priced.stage_memory_bytes[d] + priced.stage_memory_bytes[d + 2] for d in (0, 1)]
    assert priced.peak_memory_bytes == pytest.approx(by_device)


def test_cost_prices_a_pipelined_plan_file_as_the_search(tied, tmp_path, capsys):
    """`galvatron-fx cost --plan` on an interleaved plan: the DP's step time."""
    plan, solution = _interleaved(tied)
    path, out = tmp_path / "plan.json", tmp_path / "cost.json"
    plan.save(path)
    argv = ["cost", TIED, "--batch", str(BATCH), "--seq", str(SEQ), "--plan", str(path)]
    assert main([*argv, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["total"]["step_time_s"] == pytest.approx(solution.time_s, rel=1e-9)
    assert "interleaved-1f1b" in capsys.readouterr().out
    assert main([*argv, "--pp", "2"]) == 2
    assert "--plan: the plan file gives the strategies" in capsys.readouterr().err


def test_price_of_a_pipelined_plan_is_hand_arithmetic(analysis):
    """2 stages of dp=2 (world 4), 4 micro-batches of 2 samples, 1F1B, cut before
    blocks.2. Each stage's time per micro-batch is its units' (work per micro-batch plus a
    quarter of the once-a-step work); the second stage also receives the boundary: a
    micro-batch's 2 x 32 x 128 activations in bf16, each dp rank sending its half, forward
    and (gradients) backward. The step: both stages once, then 3 more micro-batches at the
    slower one. Stage 0 holds 2 micro-batches in flight, stage 1 one."""
    cluster = load_cluster(A100)
    s = LayerStrategy(dp=2)
    m = 4
    pipeline = PipelineConfig(2, ("blocks.2",), m, Schedule.ONE_F_ONE_B)
    plan = analysis.plan(s, world_size=4, pipeline=pipeline)
    priced = gfx.price(analysis, plan, cluster)
    space = SearchSpace(model_terms(analysis, cluster, [1]), cluster, 4, BATCH, 2**30, "mixed")
    costs = {u: space.cost(u, s, BATCH / (m * 2), pipelined=True) for u in analysis.units}
    stage0, stage1 = analysis.units[:3], analysis.units[3:]
    link = cluster.link("p2p", 2, False)
    half = (BATCH // m) * SEQ * HIDDEN * 2 / 2
    p2p = 2 * (link.latency_s + half / link.bus_bandwidth_bytes_per_s)
    f0 = sum(costs[u].time_mb_s + costs[u].step_s / m for u in stage0)
    f1 = sum(costs[u].time_mb_s + costs[u].step_s / m for u in stage1) + p2p
    assert priced.stage_time_s == pytest.approx((f0, f1), rel=1e-12)
    assert priced.step_time_s == pytest.approx(f0 + f1 + (m - 1) * max(f0, f1), rel=1e-12)
    for units, held, got in zip((stage0, stage1), (2, 1), priced.peak_memory_bytes, strict=True):
        c = [costs[u] for u in units]
        mem = sum(x.state_bytes + held * x.act_bytes for x in c) + max(x.transient_bytes for x in c)
        assert got == pytest.approx(mem, rel=1e-12)
    assert [u.stage for u in priced.units] == [0, 0, 0, 1, 1, 1, 1]
    assert priced.units[3].boundary_s == pytest.approx(p2p)


def test_price_refuses_what_does_not_fit(analysis, tied):
    cluster = load_cluster(A100)
    plan = analysis.plan(LayerStrategy(dp=4), world_size=4)
    with pytest.raises(PlanError, match="was made for model"):
        gfx.price(tied, dataclasses.replace(plan, model_fingerprint="0" * 16), cluster)
    big = analysis.plan(
        LayerStrategy(dp=8), world_size=16, pipeline=PipelineConfig(2, ("blocks.2",))
    )
    with pytest.raises(PlanError, match=r"uses 16 devices but cluster .* has 8.*nodes=2"):
        gfx.price(analysis, big, cluster)
    with pytest.raises(PlanError, match="batch of 6 does not split into 1 micro-batch"):
        gfx.price(analysis, plan, cluster, global_batch=6)
    sp = LayerStrategy(tp=2, sp=True, dp=2)
    segments_sp = analysis.plan(sp, world_size=4)
    with pytest.raises(PlanError, match=r"unit 'embedding'.*segments without sequence parallel"):
        gfx.price(analysis, segments_sp, cluster)
    with pytest.raises(PlanError, match=r"does not fit 0.001 GB per device: stage 0 needs"):
        gfx.price(analysis, plan, cluster, memory_budget_gb=0.001)


def test_cost_prices_a_strategy_as_the_search_does(analysis, tmp_path):
    """`cost --strategy` and the search's price of the same uniform plan (one stage, one
    micro-batch) are one number (cause 9: cost listed collectives at the captured fp32)."""
    out = tmp_path / "cost.json"
    argv = ["cost", GPT4, "--batch", str(BATCH), "--seq", str(SEQ), "--strategy", "tp=2,dp=2"]
    assert main([*argv, "--json", str(out)]) == 0
    cluster = load_cluster(A100)
    space = SearchSpace(
        model_terms(analysis, cluster, [1, 2, 4]), cluster, 4, BATCH, 80 * 2**30, "mixed"
    )
    problem = space.problem(Config(1, 1, Schedule.ONE_F_ONE_B), prune=False)
    s = LayerStrategy(tp=2, dp=2)
    choice = [options.strategies.index(s) for options in problem.units]
    searched = evaluate(problem, (0,), choice).time_s
    assert json.loads(out.read_text())["total"]["step_time_s"] == pytest.approx(searched, rel=1e-6)


def test_price_plan_moves_and_keeps_values_at_the_trained_width(analysis):
    """A GPT built on meta is captured in fp32 and trained in mixed precision: a tp=2
    block's all-reduces move 8 x 32 x 128 bf16 values (65536 bytes, not fp32's 131072),
    and it keeps half the bytes its fp32 graph saves."""
    cluster = load_cluster(A100)
    plan = analysis.plan(LayerStrategy(tp=2), world_size=2)
    mixed = {c.unit: c for c in price_plan(analysis, plan, cluster, precision="mixed")}
    fp32 = {c.unit: c for c in price_plan(analysis, plan, cluster, precision="fp32")}
    tp_sums = [c for c in mixed["blocks.1"].collectives if c.source in ("tp_reduce", "tp_copy")]
    assert len(tp_sums) == 4
    assert all(c.size_bytes == BATCH * SEQ * HIDDEN * 2 for c in tp_sums)
    assert mixed["blocks.1"].activation_bytes == fp32["blocks.1"].activation_bytes / 2

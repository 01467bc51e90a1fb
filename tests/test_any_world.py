"""Any world: world = pp x tp x dp with tp a power of two inside a node and pp, dp, the
micro-batch count and the virtual stages any divisors that fit. Expectations are worked out
by hand in each test (divisors, stages against node boundaries, tree counts)."""

from __future__ import annotations

import pytest
from conftest import build

import galvatron_fx as gfx
from galvatron_fx.lowering import analyze
from galvatron_fx.plan import PlanError, Schedule
from galvatron_fx.search.planner import Config, configs
from galvatron_fx.search.space import space_counts
from galvatron_fx.search.strategies import (
    divisors,
    pipeline_degrees,
    stages_fit_nodes,
    tp_degrees,
)

GPT4 = "gpt:layers=4,hidden=128,heads=4,vocab=256,seq=64"
"""Units: embedding, blocks.0-3, head, loss (7)."""


@pytest.fixture(scope="module")
def gpt4():
    model, args, kwargs = build(GPT4, device="meta", batch=8, seq=32)
    return analyze(model, args, kwargs)


def test_degrees_by_hand():
    assert divisors(24) == [1, 2, 3, 4, 6, 8, 12, 24]
    assert divisors(1536)[-5:] == [256, 384, 512, 768, 1536]
    assert len(divisors(1536)) == 10 * 2  # 1536 = 2^9 x 3: (9 + 1) x (1 + 1) divisors
    assert tp_degrees(24) == [1, 2, 4, 8]  # 24 = 2^3 x 3
    assert tp_degrees(12) == [1, 2, 4] and tp_degrees(35) == [1]
    # 24 devices on nodes of 8: stages of 12 are ranks 0-11 and 12-23, each half of a node
    # and a whole one (neither inside one node nor whole nodes); 6: ranks 6-11 cross rank
    # 8; 3: ranks 6-8 cross it; 24, 8, 4, 2 and 1 fit
    assert not stages_fit_nodes(24, 12, 8) and not stages_fit_nodes(24, 6, 8)
    assert not stages_fit_nodes(24, 3, 8)
    assert pipeline_degrees(24, 100, 8) == [1, 3, 6, 12, 24]
    # 35 = 5 x 7 on nodes of 8: stages of 7 (ranks 7-13) and of 5 (ranks 5-9) cross rank
    # 8; one stage of all 35, or 35 of one device, fit
    assert pipeline_degrees(35, 100, 8) == [1, 35]
    # 280 = 35 nodes of 8: whole nodes for every divisor of 35, and 4, 2 or 1 device a
    # stage (140 of 2 > 40 units); 40 units cap the degree
    assert pipeline_degrees(280, 40, 8) == [1, 5, 7, 35]
    assert pipeline_degrees(280, 140, 8) == [1, 5, 7, 35, 70, 140]


def test_the_tree_on_24_devices_counted_by_hand():
    """Galvatron's tree over 24 devices (3 nodes of 8), pp over [1, 3, 6, 12, 24] (stages of
    24, 8, 4, 2, 1 devices), then each rule:

    ordered runs of distinct kinds (t: a power of two; d, s: any degree >= 2) per stage:
      1 device: 1 (nothing to split); 2: t2, d2, s2 = 3;
      4: 3 single + 2x2 over 6 ordered kind pairs = 9;
      8: 3 single + (2,4) and (4,2) over 6 pairs + 2x2x2 over 6 orders = 21;
      24: single d24, s24 = 2; pairs with t (t in 2, 4, 8; 4 ordered pairs) 12, d x s
          (6 degree splits, 2 orders) 12; triples t x d x s (t2: d x s = 12, 4 ways; t4:
          6, 2 ways) 6 x 6 orders = 36; 62.  Tree: 62 + 21 + 9 + 3 + 1 = 96.
    no dp/sdp mix: 24 drops 12 + 36 -> 14; 8 drops 4 + 6 -> 11; 4 drops 2 -> 7: 36.
    TP inside a node: on 24 the TP-outer trees stride tp over dp (t2 d12 spans 13 > 8,
      t4 d6 19, t8 d3 22), 6 of them: 30.
    strided TP inside one node = consecutive: t outer on 8 (t2/t4 over d or s) 4, on 4
      (t2 over d2 or s2) 2: 24.
    flags (x 3 recomputation), per split tp1 x dp>1: 4, tp1 x dp1: 1, tp>1 x dp>1: 12,
      tp>1 x dp1: 6: 24: 4 + 3 x 12 = 40; 8: 4 + 12 + 12 + 6 = 34; 4: 22; 2: 10; 1: 1;
      107 x 3 = 321."""
    assert [row.count for row in space_counts(24, 8)] == [96, 36, 30, 24, 321]


def test_configs_take_any_pipeline_degree_and_three_chunks():
    """6 devices, 7 units, a batch of 6: pp in the divisors of 6 (1, 2, 3, 6), m in those
    of the batch (1, 2, 3, 6); interleaving needs m % pp == 0 and pp x v <= 7: pp 2 with m in (2, 6),
    v in (2, 3); pp 3 with m in (3, 6), v = 2; pp 6: v = 2 is 12 stages, none."""
    got = configs(6, 7, 6)
    assert sorted({c.pipeline for c in got}) == [1, 2, 3, 6]
    interleaved = {
        (c.pipeline, c.micro_batches, c.chunks)
        for c in got
        if c.schedule is Schedule.INTERLEAVED_1F1B
    }
    assert interleaved == {(2, 2, 2), (2, 2, 3), (2, 6, 2), (2, 6, 3), (3, 3, 2), (3, 6, 2)}
    # each (pp > 1, m) has its 1F1B and GPipe configuration: pp 2, 3, 6 x m 1, 2, 3, 6
    assert len(got) == 4 + 3 * 4 * 2 + len(interleaved)
    assert Config(3, 6, Schedule.ONE_F_ONE_B) in got
    # 4 devices, 7 units: pp 2 takes v = 3 (6 stages), not v = 4 (8 > 7); pp 4 none
    assert {c.chunks for c in configs(4, 7, 8)} == {1, 2, 3}


@pytest.mark.parametrize(("world", "nodes"), [(1536, 192), (3072, 384)])
def test_search_plans_1536_and_3072_devices(gpt4, world, nodes):
    """1536 = 2^9 x 3 and 3072 = 2^10 x 3 devices, a batch of one sample each: tp is a
    power of two, so the factor 3 goes to the pipeline or to data parallelism."""
    result = gfx.search(
        gpt4, cluster=f"a100-80gb-sxm:nodes={nodes}", memory_budget_gb=1, global_batch=world,
        world_size=world, baselines=False,
    )  # fmt: skip
    plan = result.plan
    assert plan.world_size == world
    pp = plan.pipeline.degree
    for unit, s in plan.strategies:
        assert pp * s.tp * s.dp == world, unit
        assert (pp * s.dp) % 3 == 0 and s.tp & (s.tp - 1) == 0, unit
        assert world % (s.dp * plan.pipeline.micro_batches) == 0, unit


def test_35_devices_take_35_stages():
    """35 devices (of 5 nodes of 8), a 35-layer GPT (38 units), a batch of 8: 35 = 5 x 7,
    so pp is 1, 5, 7 or 35 and tp 1. Stages of 7 devices (pp 5: ranks 7-13) and of 5 (pp 7:
    ranks 5-9) cross a node boundary; pp 1 needs dp = 35, which 8 samples do not divide.
    Only pp = 35 stages of one device remain: every unit tp = dp = 1."""
    model, args, kwargs = build(
        "gpt:layers=35,hidden=32,heads=2,vocab=64,seq=16", device="meta", batch=8, seq=16
    )
    analysis = analyze(model, args, kwargs)
    assert len(analysis.units) == 38
    result = gfx.search(
        analysis, cluster="a100-80gb-sxm:nodes=5", memory_budget_gb=1, global_batch=8,
        world_size=35, baselines=False,
    )  # fmt: skip
    assert result.plan.pipeline.degree == 35
    assert {(s.tp, s.dp) for _, s in result.plan.strategies} == {(1, 1)}
    assert len(result.plan.pipeline.stage_starts) == 34


def test_a_world_that_cannot_split_names_what_would(gpt4):
    """11 devices (of 2 nodes of 8), 7 units, 4 heads, a batch of 8: pp divides 11 and is at
    most 7 units, so pp = 1, tp = 1 (11 is odd) and dp = 11 does not divide 8. Nearest below,
    10: pp 1 needs dp 10 or 5, pp 2 has stages of 5 (ranks 5-9 cross rank 8), pp 5 stages
    of 2 with dp 2 fit. Above, 12: pp 1 needs dp 12, 6 or 3, pp 2 stages of 6 (ranks 6-11)
    cross, pp 3 stages of 4 with dp 4 fit. Or keep 11 with a batch that 11 divides."""
    with pytest.raises(PlanError) as err:
        gfx.search(
            gpt4, cluster="a100-80gb-sxm:nodes=2", memory_budget_gb=1, global_batch=8,
            world_size=11,
        )  # fmt: skip
    text = str(err.value)
    assert "11 devices do not factor for this model and a global batch of 8" in text
    assert "attention heads (4)" in text
    assert (
        "Search for 10 devices (pp=5 tp=1 dp=2) or 12 devices (pp=3 tp=1 dp=4); "
        "or a global batch that 11 divides (pp=1 tp=1 dp=11)" in text
    )

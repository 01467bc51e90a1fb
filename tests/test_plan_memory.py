"""Peak memory per rank: the three-moment model by hand, and predicted against the memory
probe on real gloo ranks."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
from conftest import build

from galvatron_fx import parallelize
from galvatron_fx.cost_models.hardware import PRESETS
from galvatron_fx.cost_models.peak_memory import UnitMemory, peak_memory, runtime_state
from galvatron_fx.lowering import analyze
from galvatron_fx.plan import DPMode, LayerStrategy, Plan
from galvatron_fx.planning.plan_memory import UnitMemoryInputs, plan_peak_memory, unit_memory
from galvatron_fx.planning.price import plan_peak, price_plan
from galvatron_fx.runtime.launch import fork_ranks
from galvatron_fx.runtime.memory_probe import measure_step_memory

GPT = "gpt:layers=2,hidden=128,heads=4,vocab=512,seq=64"
PSI = 1000


@pytest.mark.parametrize(
    ("mode", "dp", "want"),
    [
        # fp32 Adam: 4 B parameters, 4 B gradients, 8 B moments (+ a 4 B master shard for
        # ZeRO-1/2); a bucketed gradient lives twice until the sync ends; ZeRO-3 holds only
        # the reduce-scattered shard until then (its whole gradient is `zero3_live`'s and
        # `zero3_in_flight`'s)
        (DPMode.ALLREDUCE, 1, (12 * PSI, 4 * PSI, 4 * PSI)),
        (DPMode.ALLREDUCE, 4, (12 * PSI, 8 * PSI, 4 * PSI)),
        (DPMode.ZERO1, 4, (4 * PSI + 12 * PSI / 4, 8 * PSI, PSI)),
        (DPMode.ZERO2, 4, (4 * PSI + 12 * PSI / 4, 8 * PSI + PSI, PSI)),
        (DPMode.ZERO3, 4, (12 * PSI / 4, PSI, PSI)),
    ],
)
def test_runtime_state_by_zero_stage(mode, dp, want):
    assert runtime_state(PSI, dp, mode, "fp32", bucketed=dp > 1) == pytest.approx(want)


def test_peak_is_the_largest_of_three_moments():
    a = UnitMemory(state_bytes=10, kept_bytes=5, live_bytes=6, grad_bytes=2, steady_grad_bytes=1)
    b = UnitMemory(state_bytes=10, kept_bytes=7, live_bytes=9, grad_bytes=3, steady_grad_bytes=1)
    # b's backward: a's kept 5 + b's live 9 = 14; a's backward: 6 + b's grad 3 = 9; end 5
    got = peak_memory([("a", a), ("b", b)], end_extra_bytes=0, step_extra_bytes=0)
    assert (got.peak_bytes, got.phase, got.unit) == (20 + 14, "backward", "b")
    late = peak_memory([("a", a), ("b", b)], end_extra_bytes=10, step_extra_bytes=0)
    assert (late.peak_bytes, late.phase) == (20 + 15, "end of backward")
    step = peak_memory([("a", a), ("b", b)], end_extra_bytes=0, step_extra_bytes=20)
    assert (step.peak_bytes, step.phase) == (20 + 22, "optimizer step")


@pytest.mark.parametrize(("gloo", "want"), [(False, 47_000), (True, 45_500)])
def test_zero3_peak_holds_shards_and_one_gradient_in_flight(gloo, want):
    """8 equal ZeRO-3 layers of P = 1000 local parameters on dp = 4, mixed precision
    (2 B parameters and gradients, 12 B optimizer states), each saving 1000 B for backward.

    Kept all step: the shards' states, 8 x (2 + 12) x 1000 / 4 = 28000. Layer u's backward
    (live 10500, the first layer's 8500, as it has no earlier layer to prefetch):
    - its gradient three times over (summed, padded, gloo's staging), 6 x 1000, with its
      500 B shard, above the 1000 B it saved: 6500; its gathered parameters, 2000, and the
      previous layer's, 2000;
    - the earlier layers' 1000 B each and the later layers' shards, 500 B each;
    - on NCCL the whole gradient (2000) of the layer after it, whose reduce-scatter the
      runtime has not waited for yet: one, not every later layer's.
    NCCL: the 7th layer's backward, 6 x 1000 + 10500 + 500 + 2000 = 19000 (the others:
    16000 + 500 u, and the last 7000 + 10500 = 17500). Gloo waits at once: 17500."""
    n, params = 4, 1000
    s = LayerStrategy(dp=n, dp_mode=DPMode.ZERO3)
    names = [f"l{i}" for i in range(8)]
    plan = Plan.uniform(names, s, world_size=n, model_fingerprint="hand")
    inputs = UnitMemoryInputs(1000.0, 1000.0, 1000.0, params, params // 2)
    units = [
        (u, unit_memory(inputs, s, "mixed", params if i else 0, gloo=gloo), inputs)
        for i, u in enumerate(names)
    ]
    got = plan_peak_memory(plan, units, "mixed", gloo=gloo)
    assert got.state_bytes == 28_000
    assert (got.peak_bytes, got.phase, got.unit) == (want, "backward", "l6" if not gloo else "l7")


def _measured(rank: int, world: int, strategy: LayerStrategy) -> int:
    model, args, kwargs = build(GPT, batch=8, seq=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze(model, args, kwargs)
        compiled = parallelize(analysis, plan=analysis.plan(strategy, world_size=world))
    return measure_step_memory(compiled, *args, **kwargs).peak_bytes


@pytest.mark.parametrize(
    "strategy",
    [
        LayerStrategy(dp=2),
        LayerStrategy(tp=2, sp=True, recompute="full"),
        LayerStrategy(dp=2, dp_mode="zero2"),
        LayerStrategy(tp=2, sp=True, vocab_parallel=True),
        # the checkpoint keeps its gathered parameters as a recipe, not the buffer
        LayerStrategy(dp=2, dp_mode="zero3", recompute="full"),
    ],
    ids=["dp2", "tp2-sp-full", "zero2", "tp2-sp-vocab", "zero3-full"],
)
def test_predicted_peak_matches_the_probe_within_5_percent(strategy):
    measured = fork_ranks(_measured, 2, strategy)
    model, args, kwargs = build(GPT, batch=8, seq=64)
    analysis = analyze(model, args, kwargs)
    plan = analysis.plan(strategy, world_size=strategy.devices)
    local = replace(PRESETS["a100-80gb-sxm"], name="local")  # collectives on gloo
    for rank, got in enumerate(measured):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            costs = price_plan(analysis, plan, local, rank=rank, dtype="fp32")
        assert plan_peak(costs, plan, local).peak_bytes == pytest.approx(got, rel=0.05)

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
from galvatron_fx.plan import DPMode, LayerStrategy
from galvatron_fx.planning.price import plan_peak, price_plan
from galvatron_fx.runtime.launch import fork_ranks
from galvatron_fx.runtime.memory_probe import measure_step_memory

GPT = "gpt:layers=2,hidden=128,heads=4,vocab=512,seq=64"
PSI = 1000


@pytest.mark.parametrize(
    ("mode", "dp", "want"),
    [
        # fp32 Adam: 4 B parameters, 4 B gradients, 8 B moments (+ a 4 B master shard for
        # ZeRO-1/2); a bucketed gradient lives twice until the sync ends
        (DPMode.ALLREDUCE, 1, (12 * PSI, 4 * PSI, 4 * PSI)),
        (DPMode.ALLREDUCE, 4, (12 * PSI, 8 * PSI, 4 * PSI)),
        (DPMode.ZERO1, 4, (4 * PSI + 12 * PSI / 4, 8 * PSI, PSI)),
        (DPMode.ZERO2, 4, (4 * PSI + 12 * PSI / 4, 8 * PSI + PSI, PSI)),
        (DPMode.ZERO3, 4, (12 * PSI / 4, 4 * PSI + PSI, PSI)),
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
    ],
    ids=["dp2", "tp2-sp-full", "zero2", "tp2-sp-vocab"],
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

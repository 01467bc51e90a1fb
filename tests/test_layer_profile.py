"""Layer timings: the timer cuts a real step into units, the profiler keys them by fingerprint
and strategy, and `price_plan` takes measured times over the roofline where it has them.

No test here compares one duration with another: how closely the unit times add up to a
timed step is a measurement, reported by `bench/layer_timing.py`."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.utils.checkpoint
from conftest import TINY_GPT, build
from exactness import BATCH, SEQ, adamw, check, reference, run_steps

from galvatron_fx import parallelize
from galvatron_fx.cost_models.hardware import PRESETS
from galvatron_fx.cost_models.layer_times import LayerTime, LayerTimes, load_layer_times, timing_key
from galvatron_fx.lowering import Analysis, analyze
from galvatron_fx.meta import LAYER
from galvatron_fx.plan import DPMode, LayerStrategy, Plan, Recompute
from galvatron_fx.planning.layer_profile import profile_layers
from galvatron_fx.planning.price import price_plan, stepped_elems
from galvatron_fx.runtime.layer_timer import instrument, time_units

MID_GPT = "gpt:layers=2,hidden=128,heads=4,vocab=256,seq=64"
UNITS = ["embedding", "blocks.0", "blocks.1", "head", "loss"]
HELD = {
    "embedding": ("wte.", "wpe."),
    "blocks.0": ("blocks.0.",),
    "blocks.1": ("blocks.1.",),
    "head": ("ln_f.", "lm_head."),
    "loss": (),
}
"""The parameters each unit of the reference GPT holds, by their names in the unmodified model."""
MIXED = {
    "embedding": Recompute.NONE,
    "blocks.0": Recompute.SELECTIVE,
    "blocks.1": Recompute.FULL,
    "head": Recompute.NONE,
    "loss": Recompute.NONE,
}
"""Every recomputation mode in one plan, so that time charged to the wrong unit shows."""


def _mixed(batch: int, seq: int) -> tuple[Analysis, Plan, tuple, dict]:
    model, args, kwargs = build(TINY_GPT, batch=batch, seq=seq)
    analysis = analyze(model, args, kwargs)
    plan = analysis.plan({u: LayerStrategy(recompute=r) for u, r in MIXED.items()}, world_size=1)
    return analysis, plan, args, kwargs


def test_instrumented_program_trains_as_the_unmodified_model():
    """The ticks and `_Enter` marks change no value: the first loss, every gradient and the
    parameters after the steps are the unmodified model's, run in this process."""
    analysis, plan, args, kwargs = _mixed(BATCH, SEQ)
    compiled = parallelize(analysis, plan=plan, optimizer=adamw)
    assert instrument(compiled.module) == UNITS  # the units, in forward order
    check(reference(TINY_GPT), run_steps(compiled, args, kwargs), "instrumented")


def test_unit_times_land_on_the_units_that_did_the_work():
    """What the timer charges where, checked against the plan and the unmodified model (no
    duration is compared with another: that agreement is `bench/layer_timing.py`'s):

    - an entry per unit, in forward order;
    - recomputation exactly in the units where the lowered program has a checkpoint call,
      which are the ones the plan asks to recompute: under full the whole forward is the
      checkpoint call, under selective part of it (the attention core), elsewhere none;
    - a backward piece for every unit that does not recompute (each one's `_Enter` fired);
    - the optimizer step shared by the elements each unit holds, counted from the unmodified
      model's parameter names (the loss holds none)."""
    analysis, plan, args, kwargs = _mixed(batch=4, seq=16)
    compiled = parallelize(analysis, plan=plan)
    checkpointed = {
        LAYER.get(n).name
        for n in compiled.module.graph.nodes
        if n.target is torch.utils.checkpoint.checkpoint
    }
    assert checkpointed == {u for u, r in MIXED.items() if r is not Recompute.NONE}
    elems = stepped_elems(compiled.params, plan)
    times = time_units(compiled, args, kwargs, elems, warmup=1, repeats=3)
    assert list(times) == UNITS
    for unit, mode in MIXED.items():
        t = times[unit]
        if mode is Recompute.FULL:
            assert t.recompute_s == t.fwd_s > 0, (unit, t)
        elif mode is Recompute.SELECTIVE:
            assert 0 < t.recompute_s < t.fwd_s, (unit, t)
        else:
            assert t.recompute_s == 0 and t.fwd_s > 0 and t.bwd_s > 0, (unit, t)
    named = dict(build(TINY_GPT)[0].named_parameters())
    held = {u: sum(p.numel() for n, p in named.items() if n.startswith(pre)) for u, pre in HELD.items()}  # fmt: skip
    assert sum(held.values()) == sum(p.numel() for p in named.values())  # HELD names them all
    step_s = sum(t.step_s for t in times.values())
    assert step_s > 0
    for unit, n in held.items():
        share = step_s * n / sum(held.values())
        assert times[unit].step_s == pytest.approx(share, rel=1e-9, abs=0), unit


def test_timing_keys_share_plain_dp_and_scale_the_step():
    s = LayerStrategy(dp=4, dp_mode=DPMode.ZERO2)
    key, step = timing_key("abc", s)
    assert key == timing_key("abc", LayerStrategy(dp=4))[0] and step == 0.25
    assert timing_key("abc", LayerStrategy(dp=4, dp_mode=DPMode.ZERO3))[0] != key
    table = LayerTimes(2, {key: LayerTime(1.0, 2.0, 0.0, 0.4)})
    assert table.lookup("abc", s) == LayerTime(1.0, 2.0, 0.0, 0.1)
    assert table.lookup("abd", s) is None


def test_layer_times_json_merges_at_one_concurrency(tmp_path):
    path = tmp_path / "layers.json"
    LayerTimes(2, {"a/x": LayerTime(1.0, 2.0, 0.0, 0.5)}).save(path)
    LayerTimes(2, {"b/x": LayerTime(3.0, 4.0, 0.0, 0.5)}).save(path)
    assert set(load_layer_times(path).entries) == {"a/x", "b/x"}
    LayerTimes(4, {"c/x": LayerTime(3.0, 4.0, 0.0, 0.5)}).save(path)  # other machine use
    assert set(load_layer_times(path).entries) == {"c/x"}
    assert load_layer_times(tmp_path / "none.json") is None
    bad = {"fwd_s": "slow", "bwd_s": 1.0, "recompute_s": 0.0, "step_s": 0.0}
    path.write_text(json.dumps({"concurrency": 2, "entries": {"a/x": bad}}))
    with pytest.raises(ValueError, match=r"layers\.json: entries\['a/x'\]\.fwd_s: expected a"):
        load_layer_times(path)


def test_profiled_layers_feed_plan_costs():
    """The table has an entry for every distinct unit (by fingerprint) under every profiled
    strategy, keyed `<fingerprint>/<strategy>`; `price_plan` marks every unit of a profiled
    strategy measured and takes the entry's four numbers as they are (ZeRO-1 over 2 reads
    plain dp=2's entry, stepping half the elements); a strategy not profiled is priced by the
    roofline."""
    model, args, kwargs = build(TINY_GPT, batch=4, seq=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze(model, args, kwargs)
        strategies = [LayerStrategy(dp=2), LayerStrategy(tp=2, sp=True, recompute="full")]
        table = profile_layers(analysis, args, kwargs, strategies, concurrency=2, repeats=2)
    fingerprints = {u.name: u.fingerprint for u in analysis.layers}
    assert list(fingerprints) == UNITS and len(set(fingerprints.values())) == 4  # blocks: one
    keys = {f"{f}/{s.short()}" for f in fingerprints.values() for s in strategies}
    assert set(table.entries) == keys and table.concurrency == 2
    zero1 = LayerStrategy(dp=2, dp_mode="zero1")
    for s, profiled, step in ((zero1, strategies[0], 0.5), (strategies[1], strategies[1], 1.0)):
        plan = analysis.plan(s, world_size=s.devices)
        costs = price_plan(analysis, plan, PRESETS["a100-80gb-sxm"], layer_times=table)
        assert [c.unit for c in costs] == UNITS
        for c in costs:
            e = table.entries[f"{fingerprints[c.unit]}/{profiled.short()}"]
            want = (e.fwd_s, e.bwd_s, e.recompute_s, e.step_s * step)
            assert c.measured and (c.fwd_s, c.bwd_s, c.recompute_s, c.step_s) == want, c
    tp2 = analysis.plan(LayerStrategy(tp=2), world_size=2)
    roofline = price_plan(analysis, tp2, PRESETS["a100-80gb-sxm"], layer_times=table)
    assert not any(c.measured for c in roofline)  # not profiled: the roofline


def test_a_strategy_the_model_refuses_is_named():
    model, args, kwargs = build(TINY_GPT, batch=4, seq=32)
    analysis = analyze(model, args, kwargs)
    with pytest.raises(ValueError, match="'tp3 dp1' does not fit"):
        profile_layers(analysis, args, kwargs, [LayerStrategy(tp=3)], concurrency=1)


def test_profile_and_cost_commands_use_measured_layers(tmp_path, capsys):
    from galvatron_fx.cli import main

    cluster, layers = tmp_path / "local.json", tmp_path / "layers.json"
    profile = ["profile", "--quick", "--out", str(cluster), "--layers", str(layers)]
    model = ["--model", TINY_GPT, "--batch", "4", "--strategies", "tp=2,sp=1;dp=2"]
    assert main([*profile, *model]) == 0
    assert len(load_layer_times(layers).entries) == 8
    cost = ["cost", TINY_GPT, "--batch", "4", "--strategy", "tp=2,sp=1", "--dtype", "fp32"]
    assert main([*cost, "--cluster", str(cluster), "--layers", str(layers)]) == 0
    assert "* compute measured" in capsys.readouterr().out
    assert main([*cost, "--cluster", "a100-80gb-sxm", "--layers", str(layers)]) == 2


def test_fingerprints_do_not_depend_on_the_device():
    from galvatron_fx.meta import LAYER

    prints = []
    for device in ("cpu", "meta"):
        model, args, kwargs = build(MID_GPT, device=device, batch=2, seq=16)
        gm = analyze(model, args, kwargs).graph_module
        prints.append({LAYER.get(n).name: LAYER.get(n).fingerprint for n in gm.graph.nodes if LAYER.has(n)})  # fmt: skip
    assert prints[0] == prints[1]


def test_measured_efficiency_is_the_roofline_over_the_profiled_layers():
    """The search's compute efficiency read off a layer table: the roofline's forward and
    backward seconds over the measured ones, for the units the table holds."""
    import dataclasses

    from galvatron_fx.cost_models.hardware import load_cluster
    from galvatron_fx.cost_models.layer_times import LayerTime, LayerTimes, timing_key
    from galvatron_fx.plan import LayerStrategy
    from galvatron_fx.planning.price import measured_efficiency, price_plan

    model, args, kwargs = build(TINY_GPT, batch=4, seq=16)
    analysis = analyze(model, args, kwargs)
    cluster = load_cluster("a100-80gb-sxm")
    s = LayerStrategy(dp=2)
    roof = price_plan(analysis, analysis.plan(s, world_size=2), cluster, dtype="fp32")
    # every unit measured 4x slower than its roofline: an efficiency of 1/4
    entries = {}
    for unit, cost in zip(analysis.layers, roof, strict=True):
        key, _ = timing_key(unit.fingerprint, s)
        entries[key] = LayerTime(4 * cost.fwd_s, 4 * cost.bwd_s, 0.0, cost.step_s)
    table = LayerTimes(concurrency=1, entries=entries)
    assert measured_efficiency(analysis, cluster, table, 2) == pytest.approx(0.25, rel=1e-6)
    empty = dataclasses.replace(table, entries={})
    assert measured_efficiency(analysis, cluster, empty, 2) is None

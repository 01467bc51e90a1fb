"""Layer timings: the timer cuts a real step into units, the profiler keys them by fingerprint
and strategy, and `price_plan` takes measured times over the roofline where it has them."""

from __future__ import annotations

import json
import statistics
import time
import warnings

import pytest
from conftest import TINY_GPT, build

from galvatron_fx import parallelize
from galvatron_fx.cost_models.hardware import PRESETS
from galvatron_fx.cost_models.layer_times import LayerTime, LayerTimes, load_layer_times, timing_key
from galvatron_fx.lowering import analyze
from galvatron_fx.plan import DPMode, LayerStrategy, Recompute
from galvatron_fx.planning.layer_profile import profile_layers
from galvatron_fx.planning.price import price_plan, stepped_elems
from galvatron_fx.runtime.layer_timer import instrument, time_units

MID_GPT = "gpt:layers=2,hidden=128,heads=4,vocab=256,seq=64"


def _timed_step(compiled, args, kwargs) -> tuple[float, float]:
    compiled.sync.zero_grad()
    start = time.perf_counter()
    loss = compiled.forward_loss(*args, **kwargs)
    middle = time.perf_counter()
    loss.backward()
    return middle - start, time.perf_counter() - middle


@pytest.mark.parametrize("recompute", [Recompute.NONE, Recompute.FULL])
def test_unit_times_add_up_to_the_step_and_land_on_the_blocks(recompute):
    model, args, kwargs = build(MID_GPT, batch=4, seq=64)
    analysis = analyze(model, args, kwargs)
    plan = analysis.plan(LayerStrategy(recompute=recompute), world_size=1)
    compiled = parallelize(analysis, plan=plan)
    reference = [_timed_step(compiled, args, kwargs) for _ in range(5)]
    compiled.sync.zero_grad()
    before = compiled.forward_loss(*args, **kwargs).item()
    times = time_units(compiled, args, kwargs, stepped_elems(compiled.params, plan), repeats=5)
    # reference steps on both sides of the unit timing: the machine's speed drifts over a
    # test (measured: the reference 1.6x the units' sum once, on a loaded 2-core machine)
    reference += [_timed_step(compiled, args, kwargs) for _ in range(5)]
    assert list(times) == ["embedding", "blocks.0", "blocks.1", "head", "loss"]
    fresh, _, _ = build(MID_GPT, batch=4, seq=64)  # same seed, same parameters
    marked = parallelize(analyze(fresh, args, kwargs), plan=plan)
    instrument(marked.module)  # the ticks and marks change no value
    assert marked.forward_loss(*args, **kwargs).item() == pytest.approx(before, rel=1e-6)
    fwd = sum(t.fwd_s for t in times.values())
    bwd = sum(t.bwd_s + t.recompute_s for t in times.values())
    ref_fwd = statistics.median(f for f, _ in reference)
    ref_bwd = statistics.median(b for _, b in reference)
    assert fwd == pytest.approx(ref_fwd, rel=0.35) and bwd == pytest.approx(ref_bwd, rel=0.35)
    blocks = [times["blocks.0"], times["blocks.1"]]
    assert all(b.fwd_s > times["embedding"].fwd_s and b.bwd_s > 0 for b in blocks)
    assert all(b.step_s > 0 for b in blocks) and times["loss"].step_s == 0  # no parameters
    if recompute is Recompute.FULL:  # the recomputation repeats the block's forward
        assert all(0.3 * b.fwd_s < b.recompute_s <= b.fwd_s for b in blocks)
    else:
        assert all(b.recompute_s == 0 for b in blocks)


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
    model, args, kwargs = build(TINY_GPT, batch=4, seq=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze(model, args, kwargs)
        strategies = [LayerStrategy(dp=2), LayerStrategy(tp=2, sp=True, recompute="full")]
        table = profile_layers(analysis, args, kwargs, strategies, concurrency=2, repeats=2)
    # 5 units, the two blocks one fingerprint: 4 entries per strategy
    assert len(table.entries) == 8 and table.concurrency == 2
    for s in (LayerStrategy(dp=2, dp_mode="zero1"), strategies[1]):
        plan = analysis.plan(s, world_size=s.devices)
        costs = price_plan(analysis, plan, PRESETS["a100-80gb-sxm"], layer_times=table)
        assert all(c.measured for c in costs)
        block = next(c for c in costs if c.unit == "blocks.1")
        measured = table.lookup(
            next(u.fingerprint for u in analysis.layers if u.name == "blocks.1"), s
        )
        assert (block.fwd_s, block.recompute_s) == (measured.fwd_s, measured.recompute_s)
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

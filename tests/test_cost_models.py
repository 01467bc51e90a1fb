"""The cost models' formulas against hand-computed numbers (issue 4, first part)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import build

from galvatron_fx.cost_models.communication import (
    collective_time_s,
    collectives_time,
    explain,
    group_spans_nodes,
)
from galvatron_fx.cost_models.compute import UnitFlops, roofline_time_s, training_flops
from galvatron_fx.cost_models.hardware import PRESETS, ClusterSpec, Link, load_cluster
from galvatron_fx.cost_models.memory import model_state_bytes
from galvatron_fx.cost_models.traffic import Collective
from galvatron_fx.lowering import analyze
from galvatron_fx.plan import Recompute
from galvatron_fx.unit_graph.units import unit_flops

LINK = Link("all_reduce", "intra", latency_s=1e-5, bus_bandwidth_bytes_per_s=100e9)


@pytest.mark.parametrize(
    ("kind", "factor"),
    [("all_reduce", 2 * 7 / 8), ("all_gather", 7 / 8), ("reduce_scatter", 7 / 8), ("p2p", 1.0)],
)
def test_bus_bandwidth_factors_of_nccl_tests(kind, factor):
    size = 256 * 2**20
    want = 1e-5 + size * factor / 100e9
    assert collective_time_s(kind, size, 8, LINK) == pytest.approx(want, rel=1e-12)


def test_collective_time_broadcasts_and_is_free_on_one_rank():
    sizes = np.array([2**10, 2**20, 2**30])
    groups = np.array([1, 2, 4])
    t = collective_time_s("all_reduce", sizes, groups, LINK)
    assert t[0] == 0.0
    assert t[1] == pytest.approx(1e-5 + 2**20 * 1.0 / 100e9)
    assert t[2] == pytest.approx(1e-5 + 2**30 * 1.5 / 100e9)


def test_explain_substitutes_the_numbers():
    text = explain("all_gather", 1e6, 4, LINK)
    assert "latency_s + size_bytes" in text and "3/4" in text and text.endswith(" s")


def test_overlap_hides_only_overlappable_collectives():
    cluster = PRESETS["a100-80gb-sxm"]
    inline = Collective("all_reduce", 2**24, 8, "forward", False, "blocks.0", "tp_reduce")
    bucket = Collective("all_reduce", 2**24, 8, "backward", True, "blocks.0", "grad_sync")
    one = float(collective_time_s("all_reduce", 2**24, 8, cluster.link("all_reduce", 8, False)))
    t = collectives_time([inline, bucket], cluster, lambda size: False, {"backward": 1.0})
    assert t.total_s == pytest.approx(2 * one)
    assert t.exposed_s == pytest.approx(one)  # the bucket hides under a second of backward
    # no compute beside it: nothing hides
    bare = collectives_time([inline, bucket], cluster, lambda size: False)
    assert bare.exposed_s == pytest.approx(2 * one)


def test_overlap_is_bounded_by_the_compute_beside_it():
    """Cause 5 of issue 20: ZeRO-3 on many devices hid 0.25 s of communication behind 0.1 s
    of compute at a fixed 80%. Communication hides behind at most the compute of its phase."""
    link = Link("all_gather", "inter", latency_s=0.0, bus_bandwidth_bytes_per_s=1e9)
    cluster = dataclasses.replace(
        PRESETS["a100-80gb-sxm"], links=(link, dataclasses.replace(link, scope="intra"))
    )
    # 250 MB whole on 1,000 ranks (factor 999/1000): 0.24975 s at 1 GB/s
    gather = Collective("all_gather", 250e6, 1000, "forward", True, "blocks.0", "zero3_issue")
    t = collectives_time([gather], cluster, lambda size: True, {"forward": 0.1})
    assert t.total_s == pytest.approx(0.24975)
    assert t.exposed_s == pytest.approx(0.24975 - 0.1)  # was 0.24975 * (1 - 0.8) = 0.04995
    # compute in another phase hides nothing; a measured overlap fraction scales the hiding
    assert collectives_time([gather], cluster, lambda s: True, {"backward": 5.0}).exposed_s == (
        pytest.approx(0.24975)
    )
    half = dataclasses.replace(cluster, overlap=0.5)
    assert collectives_time([gather], half, lambda s: True, {"forward": 0.1}).exposed_s == (
        pytest.approx(0.24975 - 0.05)
    )


def test_groups_leave_a_node_only_past_its_devices():
    assert not group_spans_nodes(8, 1, 8)  # tp 8, consecutive
    assert group_spans_nodes(2, 8, 8)  # dp 2 over tp 8: the next node
    assert not group_spans_nodes(4, 2, 8)


@pytest.mark.parametrize(
    ("mode", "per_device_gb"),
    # ZeRO paper, Figure 1: Psi = 7.5B, N = 64, K = 12
    [("allreduce", 120.0), ("zero1", 31.4), ("zero2", 16.6), ("zero3", 1.9)],
)
def test_zero_model_states_of_the_zero_paper(mode, per_device_gb):
    states = model_state_bytes(7.5e9, 64, mode)
    assert states.total_bytes / 1e9 == pytest.approx(per_device_gb, abs=0.05)


def test_model_states_hand_computed():
    psi, n = 1_000_000, 4
    assert model_state_bytes(psi, n, "allreduce").total_bytes == (2 + 2 + 12) * psi
    assert model_state_bytes(psi, n, "zero1").total_bytes == 2 * psi + 2 * psi + 12 * psi / n
    assert model_state_bytes(psi, n, "zero2").total_bytes == 2 * psi + (2 + 12) * psi / n
    assert model_state_bytes(psi, n, "zero3").total_bytes == (2 + 2 + 12) * psi / n
    assert model_state_bytes(psi, n, "allreduce", "fp32").total_bytes == 16 * psi
    with pytest.raises(ValueError, match="precision"):
        model_state_bytes(psi, n, "zero1", "fp8")  # type: ignore[arg-type]


def test_megatron_flops_per_iteration_with_full_recomputation():
    """96 B s l h^2 (1 + s/6h + V/16lh) for a GPT, every layer recomputed. Dropout makes
    attention take the math path, whose backward is 2x its forward, as the formula assumes."""
    B, s, L, h, V = 2, 32, 3, 64, 256
    model, args, kwargs = build(
        f"gpt:layers={L},hidden={h},heads=4,vocab={V},seq={s},dropout=0.1", batch=B, seq=s
    )
    flops = unit_flops(analyze(model, args, kwargs).graph_module)
    total = sum(
        training_flops(f, Recompute.FULL if "." in unit else Recompute.NONE)
        for unit, f in flops.items()
    )
    megatron = 96 * B * s * L * h**2 * (1 + s / (6 * h) + V / (16 * L * h))
    assert total == pytest.approx(megatron, rel=1e-12)  # exact up to float rounding


def test_selective_recomputation_repeats_only_the_attention_core():
    unit = UnitFlops(fwd_flops=100.0, bwd_flops=200.0, attention_fwd_flops=10.0)
    assert training_flops(unit) == 300.0
    assert training_flops(unit, "selective") == 310.0
    assert training_flops(unit, "full") == 400.0


def test_roofline_takes_the_slower_of_compute_and_memory():
    a100 = PRESETS["a100-80gb-sxm"]
    assert roofline_time_s(312e12, 0, a100) == pytest.approx(1.0)
    assert roofline_time_s(0, 2039e9, a100) == pytest.approx(1.0)
    assert roofline_time_s(312e12, 0, a100, efficiency=0.5) == pytest.approx(2.0)


def test_cluster_presets_options_and_json(tmp_path):
    spec = load_cluster("a100-80gb-sxm:nodes=8")
    assert spec.world_size == 64 and spec.link("all_reduce", 16, True).scope == "inter"
    for preset in PRESETS.values():
        assert preset.source and preset.peak_flops and preset.links
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(spec.to_json()))
    assert load_cluster(str(path)) == spec
    with pytest.raises(ValueError, match="unknown cluster 'a200'"):
        load_cluster("a200")
    with pytest.raises(ValueError, match="unknown option 'gpus'"):
        load_cluster("h100-80gb-sxm:gpus=4")
    with pytest.raises(ValueError, match="unknown field"):
        ClusterSpec.from_json({**spec.to_json(), "tflops": 1})
    with pytest.raises(ValueError, match="no profile"):
        load_cluster("local", local_profile=tmp_path / "missing.json")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d["links"][3].update(latency_s="fast"),
            r"links\[3\]\.latency_s: expected a number",
        ),
        (lambda d: d["links"][0].update(scope="rack"), r"links\[0\]\.scope: expected one of"),
        (lambda d: d["peak_flops"].update(bf16=None), r"peak_flops\['bf16'\]: expected a number"),
        (lambda d: d.update(nodes=1.5), r"c\.json: nodes: expected an integer, got 1\.5"),
        (lambda d: d.pop("memory_bytes"), r"c\.json: missing field\(s\) \['memory_bytes'\]"),
        (lambda d: d.update(links={}), r"c\.json: links: expected a list"),
    ],
)
def test_malformed_cluster_json_names_the_field_path(tmp_path, edit, message):
    data = PRESETS["a100-80gb-sxm"].to_json()
    edit(data)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_cluster(str(path))
    path.write_text(json.dumps(data)[:-5])
    with pytest.raises(ValueError, match=r"c\.json: not valid JSON: .* at line 1, column"):
        load_cluster(str(path))


def test_alpha_beta_fit_recovers_latency_and_bandwidth():
    from galvatron_fx.cost_models.fit import fit_alpha_beta

    sizes = [2**k for k in range(10, 28, 2)]
    times = [20e-6 + s * 2 * 3 / 4 / 5e9 for s in sizes]  # all-reduce on 4 ranks
    fit = fit_alpha_beta("all_reduce", 4, sizes, times)
    assert fit.latency_s == pytest.approx(20e-6, rel=1e-6)
    assert fit.bus_bandwidth_bytes_per_s == pytest.approx(5e9, rel=1e-6)
    assert fit.relative_error < 1e-6


def test_profile_command_writes_a_local_cluster(tmp_path):
    from galvatron_fx.cli import main

    out = tmp_path / "local.json"
    assert main(["profile", "--quick", "--out", str(out)]) == 0
    spec = load_cluster("local", local_profile=out)
    assert spec.peak_flops["fp32"] > 0 and spec.memory_bandwidth_bytes_per_s > 0
    link = spec.link("all_reduce", 2, False)
    assert link.group_size == 2 and link.bus_bandwidth_bytes_per_s > 0
    assert spec.link("all_gather", 8, False).group_size == 0  # unmeasured size: the default


@pytest.mark.parametrize(("stages", "micro", "want"), [(4, 8, 3 / 8), (8, 32, 7 / 32), (1, 4, 0.0)])
def test_pipeline_bubble(stages, micro, want):
    from galvatron_fx.cost_models.pipeline import bubble_fraction

    assert bubble_fraction(stages, micro, "1f1b") == pytest.approx(want)
    assert bubble_fraction(stages, micro, "gpipe") == pytest.approx(want)
    if stages > 1:
        assert bubble_fraction(stages, micro, "interleaved-1f1b", chunks=2) == pytest.approx(
            want / 2
        )


def test_micro_batches_in_flight():
    from galvatron_fx.cost_models.pipeline import in_flight_micro_batches

    assert in_flight_micro_batches(0, 4, 8, "gpipe") == 8
    assert [in_flight_micro_batches(s, 4, 8, "1f1b") for s in range(4)] == [4, 3, 2, 1]
    assert in_flight_micro_batches(0, 4, 2, "1f1b") == 2  # fewer micro-batches than stages


@pytest.fixture(scope="module")
def small_gpt():
    model, args, kwargs = build(
        "gpt:layers=2,hidden=256,heads=8,vocab=1024,seq=128", batch=8, seq=128
    )
    return analyze(model, args, kwargs)


def _block(analysis, strategy, world):
    """The plain roofline (no kernel floor, no GEMM quantisation): work splits exactly."""
    from galvatron_fx.cost_models.efficiency import KernelEfficiency
    from galvatron_fx.planning.price import price_plan

    roofline = dataclasses.replace(PRESETS["a100-80gb-sxm"], efficiency=KernelEfficiency())
    costs = price_plan(analysis, analysis.plan(strategy, world_size=world), roofline)
    return next(c for c in costs if c.unit == "blocks.0")


def test_plan_costs_follow_the_strategy(small_gpt):
    from galvatron_fx.plan import LayerStrategy

    one = _block(small_gpt, LayerStrategy(), 1)
    dp = _block(small_gpt, LayerStrategy(dp=2), 2)
    zero3 = _block(small_gpt, LayerStrategy(dp=2, dp_mode="zero3"), 2)
    full = _block(small_gpt, LayerStrategy(dp=2, recompute="full"), 2)
    selective = _block(small_gpt, LayerStrategy(dp=2, recompute="selective"), 2)
    tp = _block(small_gpt, LayerStrategy(tp=2), 2)
    assert one.comm_total_s == 0.0 and dp.comm_total_s > 0.0
    assert dp.fwd_s == pytest.approx(one.fwd_s / 2) and dp.activation_bytes == pytest.approx(
        one.activation_bytes / 2
    )
    # a block: 12h^2 + 13h parameters, fp32 Adam by default (16 bytes each), over dp for ZeRO-3
    params = 12 * 256**2 + 13 * 256
    assert dp.model_state_bytes == 16 * params and zero3.model_state_bytes == 16 * params / 2
    assert tp.model_state_bytes == 16 * ((12 * 256**2 + 7 * 256) / 2 + 6 * 256)
    assert (
        full.recompute_s == pytest.approx(full.fwd_s)
        and full.activation_bytes < selective.activation_bytes
    )
    assert (
        0 < selective.recompute_s < full.recompute_s
        and selective.activation_bytes < dp.activation_bytes
    )
    assert zero3.comm_total_s > dp.comm_total_s  # gather, gather again, reduce-scatter


def test_cost_command_prints_and_writes_json(tmp_path):
    from galvatron_fx.cli import main

    out = tmp_path / "cost.json"
    model = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32"
    strategy = "tp=2,dp=2,sp=1,zero=3,ckpt=full"
    argv = ["cost", model, "--batch", "4", "--strategy", strategy, "--json", str(out)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["total"]["step_time_s"] > 0 and data["total"]["peak_memory_bytes"] > 0
    assert [e["unit"] for e in data["layers"]][:2] == ["embedding", "blocks.0"]
    assert main([*argv[:4], "--strategy", "tp=2,pp=2"]) == 2  # unknown key, named
    # one Ulysses strategy: the layers run it, the segments the same group as plain tp;
    # the layers' whole weights are sharded over all 4 ranks, a tp-2 block's over dp's 2
    ulysses = ["cost", model, "--batch", "4", "--json", str(out)]
    assert main([*ulysses, "--strategy", "tp=2,dp=2,ulysses=1,zero=3"]) == 0
    states = {e["unit"]: e["model_state_bytes"] for e in json.loads(out.read_text())["layers"]}
    assert main([*ulysses, "--strategy", "tp=2,dp=2,zero=3"]) == 0
    tp_states = {e["unit"]: e["model_state_bytes"] for e in json.loads(out.read_text())["layers"]}
    assert states["blocks.0"] == pytest.approx(tp_states["blocks.0"], rel=0.05)


def test_cost_explain_prints_formulas_with_numbers(capsys):
    from galvatron_fx.cli import main

    model = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32"
    argv = ["cost", model, "--batch", "4", "--strategy", "tp=2,dp=2,zero=3"]
    assert main([*argv, "--explain", "blocks.0"]) == 0
    out = capsys.readouterr().out
    assert "bwd_flops + fwd_flops" in out and "16*psi/N" in out and "bus_bandwidth" in out
    assert main([*argv, "--explain", "blocks.9"]) == 2


def test_strategy_text_errors_name_the_key():
    from galvatron_fx.cli import parse_strategy

    with pytest.raises(ValueError, match=r"tp='four' is not a whole number"):
        parse_strategy("tp=four")
    with pytest.raises(ValueError, match=r"zero='4'"):
        parse_strategy("dp=2,zero=4")

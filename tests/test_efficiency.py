"""Achievable kernel efficiency (issue 20, causes 1 and 2): a preset prices each kernel by its
class - GEMMs at the achievable fraction of the peak with tile and wave quantisation,
memory-bound kernels at the trained dtype's bytes and the achievable bandwidth, causal
attention at half its score blocks - checked against arithmetic written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from galvatron_fx.cost_models.efficiency import KernelEfficiency, gemm_quantization, kernel_time_s
from galvatron_fx.cost_models.hardware import PRESETS, load_cluster
from galvatron_fx.lowering import analyze
from galvatron_fx.plan import LayerStrategy
from galvatron_fx.planning.price import price_plan

H100 = PRESETS["h100-80gb-sxm"]
ROWS, WIDTH = 8192, 4096


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc(x))


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.mean()


@pytest.fixture(scope="module")
def stack():
    model = _Stack().to("meta")
    return analyze(model, (torch.empty(ROWS, WIDTH, device="meta"),), {})


def _block(analysis, cluster, precision="fp32"):
    plan = analysis.plan(LayerStrategy(), world_size=1)
    costs = price_plan(analysis, plan, cluster, dtype="bf16", precision=precision)
    return next(c for c in costs if c.unit == "blocks.1")


def test_a_large_gemm_runs_at_the_achievable_fraction_of_the_peak_in_whole_waves(stack):
    """Cause 1: GEMMs were priced at 100% of the datasheet peak. An 8192 x 4096 x 4096 GEMM
    on H100: 2 M N K FLOPs, 64 x 32 = 2,048 output tiles of 128 x 128 over 132 SMs run in
    16 waves (2,112 slots), at 792 of 989 TFLOP/s."""
    flops = 2 * ROWS * WIDTH * WIDTH
    q = 2048 / (16 * 132)
    gemm_s = flops / (989e12 * (792 / 989) * q)
    gelu_bytes = 2 * ROWS * WIDTH * 4  # fp32 in and out
    gelu_s = gelu_bytes / (3350e9 * 0.85)
    block = _block(stack, H100)
    assert block.fwd_s == pytest.approx(gemm_s + gelu_s, rel=1e-9)
    assert block.fwd_s > 1.2 * flops / 989e12  # the old price: the datasheet peak


def test_memory_bound_kernels_move_the_trained_dtypes_bytes(stack):
    """Cause 2: a model captured in fp32 and trained in mixed precision reads and writes
    bf16 values: the GELU moves half the bytes its fp32 graph says."""
    fp32, mixed = _block(stack, H100, "fp32"), _block(stack, H100, "mixed")
    gelu_fp32_s = 2 * ROWS * WIDTH * 4 / (3350e9 * 0.85)
    assert fp32.fwd_s - mixed.fwd_s == pytest.approx(gelu_fp32_s / 2, rel=1e-6)


def test_tile_and_wave_quantisation_by_hand():
    eff = KernelEfficiency(tile=128, sms=132)
    assert gemm_quantization(8192, 4096, 1, eff) == pytest.approx(2048 / 2112)
    # a TP-split output of 8192 x 64: half of every 128-wide tile is padding; 64 tiles,
    # one partial wave of 132 slots
    assert gemm_quantization(8192, 64, 1, eff) == pytest.approx(0.5 * 64 / 132)
    assert gemm_quantization(8192, 64, 1, KernelEfficiency()) == 1.0


def test_a_kernel_takes_at_least_the_floor():
    # 1 KiB at 3.35 TB/s is 0.3 ns: the launch floor (4 us) is what it costs
    t = kernel_time_s("memory", 0, 1024, 989e12, 3350e9, H100.efficiency)
    assert t == H100.efficiency.kernel_floor_s == 4e-6
    assert kernel_time_s("memory", 0, 0, 989e12, 3350e9, H100.efficiency) == 0.0


class _Attention(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList(nn.Identity() for _ in range(1))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, q, is_causal=self.causal).mean()


def test_causal_attention_costs_half_the_score_blocks():
    """Fused kernels skip the masked half of a causal attention's score blocks; the FLOP
    counter's formula counts all of them. 4 b h s^2 d forward FLOPs at 35% of the peak."""
    b, h, s, d = 1, 32, 4096, 128
    q = torch.empty(b, h, s, d, device="meta")
    cluster = load_cluster("h100-80gb-sxm")
    times = {}
    for causal in (False, True):
        analysis = analyze(_Attention(causal), (q,), {})
        plan = analysis.plan(LayerStrategy(), world_size=1)
        costs = price_plan(analysis, plan, cluster, dtype="bf16", precision="fp32")
        times[causal] = sum(c.fwd_s for c in costs)
    full_s = 4 * b * h * s * s * d / (989e12 * 0.35)
    assert times[False] - times[True] == pytest.approx(full_s / 2, rel=1e-3)
    assert math.isfinite(times[True])


class _ChainBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return F.gelu(h) * h


class _ChainStack(_Stack):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_ChainBlock() for _ in range(2))


def test_compiled_programs_fuse_chains_of_memory_bound_kernels():
    """Inductor fuses the GELU and the product into one kernel that reads h once and
    writes the result once (2 values of ROWS x WIDTH fp32) where eager reads and writes
    5 (GELU: h in, g out; product: g and h in, result out)."""
    from galvatron_fx.planning.model_terms import model_terms

    analysis = analyze(_ChainStack().to("meta"), (torch.empty(ROWS, WIDTH, device="meta"),), {})
    value_bytes = ROWS * WIDTH * 4
    forward = {}
    for compiled in (False, True):
        terms = model_terms(analysis, H100, [1], precision="fp32", compiled=compiled)
        forward[compiled] = terms.unit_terms("blocks.1", LayerStrategy()).fwd_s
    gemm_s = 2 * ROWS * WIDTH * WIDTH / (989e12 * (792 / 989) * (2048 / 2112))
    assert forward[True] == pytest.approx(gemm_s + 2 * value_bytes / (3350e9 * 0.85), rel=1e-9)
    assert forward[False] == pytest.approx(gemm_s + 5 * value_bytes / (3350e9 * 0.85), rel=1e-9)


def test_profile_device_measures_every_kernel_class_into_a_cluster_file(tmp_path):
    """`profile --device` on this CPU against a preset's datasheet (tiny shapes): every
    efficiency a fraction in (0, 1], the interconnect the preset's, and the file loads."""
    from galvatron_fx.runtime.device_profile import profile_device

    spec, measured = profile_device("cpu", H100, scale=1 / 32, repeats=1)
    eff = spec.efficiency
    for value in (eff.gemm, eff.attention_fwd, eff.attention_bwd, eff.memory):
        assert 0 < value <= 1
    assert eff.kernel_floor_s > 0 and spec.links == H100.links
    assert len(measured["gemm_curve"]) == 6
    spec.save(tmp_path / "measured.json")
    assert load_cluster(str(tmp_path / "measured.json")).efficiency == eff

"""`galvatron-fx profile --device cuda`: measure what one device sustains, per kernel class.

Against a preset's datasheet figures (`--base`), on one device of this machine:

- GEMMs: bf16 (fp32 on CPU) matmuls from square 8192s down to skinny ones; the best large
  one over the peak is `efficiency.gemm`, and every shape's measured rate is kept beside the
  rate the cost model predicts for it (tile and wave quantisation), so the curve can be read;
- fused attention: causal `scaled_dot_product_attention` forward, and forward + backward, at
  head dim 128; the causal half of the score blocks over the time, over the peak, gives
  `attention_fwd` and `attention_bwd`;
- memory-bound kernels: a large copy's bytes read and written over the datasheet bandwidth;
- the kernel floor: the mean time of a tiny op, waited for.

The result is the base cluster with those efficiencies (its interconnect as the preset
says: one device cannot measure NCCL across nodes), saved where `--cluster FILE` reads it.
Collectives on this machine's ranks are `profiler.py`'s.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from galvatron_fx.cost_models.efficiency import KernelEfficiency, gemm_quantization
from galvatron_fx.cost_models.hardware import ClusterSpec

__all__ = ["DeviceProfile", "profile_device"]

GEMM_SHAPES: tuple[tuple[int, int, int], ...] = (
    (8192, 8192, 8192),
    (8192, 4096, 4096),
    (16384, 1024, 4096),  # a grouped-query key projection
    (16384, 512, 4096),  # a tensor-parallel slice of an attention projection
    (4096, 128, 4096),
    (1024, 1024, 1024),
)
"""(M, N, K) of the measured GEMMs."""
DeviceProfile = dict[str, Any]


def _timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    def best_s(fn: Callable[[], Any], repeats: int) -> float:
        fn()  # warm-up (and lazy kernel selection)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    return best_s


def _clip(fraction: float) -> float:
    """A measured fraction of a datasheet peak, kept in (0, 1] (a part faster than its
    datasheet, or a timer too coarse, must not price kernels faster than the peak)."""
    return min(max(fraction, 1e-4), 1.0)


def profile_device(
    device: str, base: ClusterSpec, *, scale: float = 1.0, repeats: int = 5
) -> tuple[ClusterSpec, DeviceProfile]:
    """`base` with this device's measured efficiencies, and the measurements. `scale`
    shrinks every shape (a CPU smoke run); `repeats`: the best of that many runs."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    name = "bf16" if dtype is torch.bfloat16 else "fp32"
    if name not in base.peak_flops:
        raise ValueError(f"profile: base cluster {base.name!r} has no {name} peak FLOP/s")
    peak, best_s = base.peak_flops[name], _timer(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 0
    shape_of = base.efficiency if sms == 0 else replace(base.efficiency, sms=sms)

    def sized(n: int) -> int:
        return max(int(n * scale) // 8 * 8, 8)

    curve = []
    for m, n, k in GEMM_SHAPES:
        m, n, k = sized(m), sized(n), sized(k)
        a = torch.randn(m, k, device=dev, dtype=dtype)
        b = torch.randn(k, n, device=dev, dtype=dtype)
        rate = 2 * m * n * k / best_s(functools.partial(torch.matmul, a, b), repeats)
        predicted = shape_of.gemm * float(gemm_quantization(m, n, 1, shape_of))
        curve.append({"m": m, "n": n, "k": k, "measured": rate / peak, "predicted": predicted})
    best = max(c["measured"] for c in curve)
    gemm = _clip(best / float(gemm_quantization(*_largest(curve), shape_of)))

    heads, seq, head_dim = 16, sized(4096), 128
    q, k_, v = (
        torch.randn(1, heads, seq, head_dim, device=dev, dtype=dtype, requires_grad=True)
        for _ in range(3)
    )
    causal_flops = 4 * heads * seq * seq * head_dim / 2  # two matmuls, half the blocks

    def forward() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k_, v, is_causal=True)

    def both() -> None:
        forward().sum().backward()

    fwd_s = best_s(lambda: forward().detach(), repeats)
    bwd_s = max(best_s(both, repeats) - fwd_s, 1e-9)
    attention_fwd = _clip(causal_flops / fwd_s / peak)
    attention_bwd = _clip(2.5 * causal_flops / bwd_s / peak)  # FlashAttention-2's backward

    elems = sized(2**28) if dev.type == "cuda" else sized(2**24)
    src = torch.empty(elems, device=dev, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    copy_rate = 2 * src.numel() * 4 / best_s(lambda: dst.copy_(src), repeats)
    memory = _clip(copy_rate / base.memory_bandwidth_bytes_per_s)

    one = torch.ones(1, device=dev)
    floor_s = best_s(lambda: [torch.add(one, one) for _ in range(100)], repeats) / 100
    eff = KernelEfficiency(
        gemm=gemm,
        attention_fwd=attention_fwd,
        attention_bwd=attention_bwd,
        memory=memory,
        kernel_floor_s=floor_s,
        tile=shape_of.tile,
        sms=sms or shape_of.sms,
        source=f"galvatron-fx profile --device {device} against {base.name}'s datasheet",
    )
    measured = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "gemm_curve": curve,
        "attention_fwd_s": fwd_s,
        "attention_bwd_s": bwd_s,
        "copy_bytes_per_s": copy_rate,
        "kernel_floor_s": floor_s,
    }
    spec = replace(
        base,
        name=f"{base.name}-measured",
        efficiency=eff,
        source=f"{base.source}; efficiencies measured on {measured['device']}",
    )
    return spec, measured


def _largest(curve: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(M, N, batch) of the GEMM that reached the highest rate."""
    best = max(curve, key=lambda c: c["measured"])
    return best["m"], best["n"], 1

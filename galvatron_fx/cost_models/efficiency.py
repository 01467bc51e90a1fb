"""What a device really sustains, per class of kernel: the achievable fraction of its peak.

A datasheet's peak is never reached. The time of one kernel on one device is

    gemm       t = max(F / (peak * e_gemm * q_tile * q_wave), B / (bw * e_mem), t_floor)
    attention  t = max(F / (peak * e_attn), B / (bw * e_mem), t_floor)     (fwd, bwd apart)
    memory     t = max(F / peak, B / (bw * e_mem), t_floor)

with F the kernel's FLOPs and B its bytes at the trained dtype's width. `q_tile` and `q_wave`
are the tile and wave quantisation of NVIDIA's "Matrix Multiplication Background" guide
(Deep Learning Performance documentation): a GEMM is computed in output tiles of
`tile x tile`, so an M x N output wastes the padding of its last row and column of tiles, and
tiles run in waves of one per SM, so the last wave of a GEMM whose tile count is not a
multiple of the SM count leaves SMs idle. Both are 1 for large GEMMs and fall for skinny ones
(tensor parallelism's split weights, small micro-batches). `t_floor` is the shortest a kernel
takes (launch latency, ramp up and tail).

A `KernelEfficiency` of all ones and no floor is the plain roofline. Pure arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["KernelEfficiency", "OpClass", "gemm_quantization", "kernel_time_s"]

OpClass = Literal["gemm", "attention", "memory"]


@dataclass(frozen=True)
class KernelEfficiency:
    """Achievable fractions of a device's peaks, per kernel class."""

    gemm: float = 1.0
    """Of the dense peak FLOP/s, by a large GEMM (before tile and wave quantisation)."""
    attention_fwd: float = 1.0
    """Of the dense peak FLOP/s, by the fused attention forward kernel."""
    attention_bwd: float = 1.0
    """By the fused attention backward kernel (lower: it recomputes and reduces more)."""
    memory: float = 1.0
    """Of the memory bandwidth, by memory-bound kernels (norms, activations, adds)."""
    kernel_floor_s: float = 0.0
    """Shortest time of one kernel."""
    tile: int = 0
    """Edge of a GEMM's output tile (0: no tile quantisation)."""
    sms: int = 0
    """Streaming multiprocessors running tiles side by side (0: no wave quantisation)."""
    source: str = ""
    """Where the figures come from."""

    def __post_init__(self) -> None:
        for name in ("gemm", "attention_fwd", "attention_bwd", "memory"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(
                    f"KernelEfficiency.{name} is a fraction of the peak in (0, 1], got {value}"
                )
        if self.kernel_floor_s < 0 or self.tile < 0 or self.sms < 0:
            raise ValueError("KernelEfficiency: kernel_floor_s, tile and sms must be >= 0")

    def scaled(self, factor: float) -> KernelEfficiency:
        """The compute efficiencies times `factor` (a measured correction, in (0, 1])."""
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"efficiency factor must be in (0, 1], got {factor}")
        return KernelEfficiency(
            self.gemm * factor,
            self.attention_fwd * factor,
            self.attention_bwd * factor,
            self.memory,
            self.kernel_floor_s,
            self.tile,
            self.sms,
            self.source,
        )


def gemm_quantization(m: int, n: int, batch: int, eff: KernelEfficiency) -> float:
    """The fraction of a GEMM's tile slots doing useful work: `batch` GEMMs with M x N
    outputs each, in `eff.tile`-square tiles, `eff.sms` tiles at a time."""
    if m <= 0 or n <= 0 or batch <= 0:
        return 1.0
    q = 1.0
    tiles = batch
    if eff.tile:
        rows, cols = math.ceil(m / eff.tile), math.ceil(n / eff.tile)
        q *= (m * n) / (rows * cols * eff.tile**2)
        tiles = batch * rows * cols
    if eff.sms:
        waves = math.ceil(tiles / eff.sms)
        q *= tiles / (waves * eff.sms)
    return q


def kernel_time_s(
    op: OpClass,
    flops: float,
    nbytes: float,
    peak_flops: float,
    bandwidth_bytes_per_s: float,
    eff: KernelEfficiency,
    *,
    backward: bool = False,
    quantization: float = 1.0,
) -> float:
    """Seconds of one kernel (module docstring); 0 for a kernel with no work."""
    if flops <= 0 and nbytes <= 0:
        return 0.0
    if op == "gemm":
        rate = peak_flops * eff.gemm * quantization
    elif op == "attention":
        rate = peak_flops * (eff.attention_bwd if backward else eff.attention_fwd)
    else:
        rate = peak_flops
    return max(flops / rate, nbytes / (bandwidth_bytes_per_s * eff.memory), eff.kernel_floor_s)

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

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "KernelEfficiency",
    "KernelWork",
    "OpClass",
    "gemm_quantization",
    "kernel_time_s",
    "work_parts_s",
]

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


def gemm_quantization(m: ArrayLike, n: ArrayLike, batch: ArrayLike, eff: KernelEfficiency) -> Any:
    """The fraction of a GEMM's tile slots doing useful work: `batch` GEMMs with M x N
    outputs each, in `eff.tile`-square tiles, `eff.sms` tiles at a time (numpy-broadcast;
    1 where there is no GEMM, M <= 0)."""
    rows_m = np.asarray(m, dtype=float)
    cols_n = np.maximum(np.asarray(n, dtype=float), 1)
    count = np.maximum(np.asarray(batch, dtype=float), 1)
    q, tiles = np.ones(np.broadcast(rows_m, cols_n, count).shape), count
    if eff.tile:
        rows, cols = np.ceil(np.maximum(rows_m, 1) / eff.tile), np.ceil(cols_n / eff.tile)
        q = q * (np.maximum(rows_m, 1) * cols_n) / (rows * cols * eff.tile**2)
        tiles = count * rows * cols
    if eff.sms:
        q = q * tiles / (np.ceil(tiles / eff.sms) * eff.sms)
    return np.where(rows_m > 0, q, 1.0)


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
    compute, memory = work_parts_s(
        op, flops, nbytes, peak_flops, bandwidth_bytes_per_s, eff, backward=backward
    )
    return max(compute / quantization, memory, eff.kernel_floor_s)


def work_parts_s(
    op: OpClass,
    flops: float,
    nbytes: float,
    peak_flops: float,
    bandwidth_bytes_per_s: float,
    eff: KernelEfficiency,
    *,
    backward: bool = False,
) -> tuple[float, float]:
    """(compute, memory) seconds of a kernel's work, a GEMM's at full tile use."""
    if op == "gemm":
        rate = peak_flops * eff.gemm
    elif op == "attention":
        rate = peak_flops * (eff.attention_bwd if backward else eff.attention_fwd)
    else:
        rate = peak_flops
    return flops / rate, nbytes / (bandwidth_bytes_per_s * eff.memory)


@dataclass(frozen=True)
class KernelWork:
    """A unit's kernels on one rank at a reference batch, per node: the compute and memory
    seconds of its forward kernel and of its backward's kernels (at full GEMM tile use,
    floors left out), how many kernels that backward launches, its GEMM output shape, and
    whether selective recomputation runs it again. At `scale` times the reference batch

        fwd_i = max(scale * c_i / q_i(scale), scale * m_i, floor)
        bwd_i = max(scale * c'_i / q_i(scale), scale * m'_i, k_i * floor)

    with `q_i` the GEMM's tile and wave quantisation at its scaled rows (M, or the batch of
    a batched GEMM): a unit whose kernels are tiny costs its launches, not a share of them,
    and a smaller micro-batch fills fewer waves. Nodes with no work cost nothing."""

    compute_s: np.ndarray
    """Per node: (forward compute, forward memory, backward compute, backward memory)."""
    bwd_kernels: np.ndarray
    gemm_shape: np.ndarray
    """Per node: (M, N, batch) of its GEMM output, zeros for other kernels."""
    selective: np.ndarray
    """Bool per node: one of the attention cores selective recomputation repeats."""
    eff: KernelEfficiency

    def _quantization(self, scale: float) -> np.ndarray:
        """Tile and wave quantisation at `scale` times the reference batch: the rows of a
        GEMM grow with it, or the batch of a batched one."""
        m, n, batch = (self.gemm_shape[:, i] for i in range(3))
        batched = batch > 1
        rows = np.where(batched | (m <= 0), m, np.maximum(np.ceil(m * scale), 1))
        batch = np.where(batched, np.maximum(np.ceil(batch * scale), 1), 1)
        return gemm_quantization(rows, n, batch, self.eff)

    def at(self, scale: float) -> tuple[float, float, float, float]:
        """(forward, backward, full recomputation, selective recomputation) seconds."""
        q = self._quantization(scale)
        fc, fm, bc, bm = (self.compute_s[:, i] * scale for i in range(4))
        floor = self.eff.kernel_floor_s
        f = np.where(fc + fm > 0, np.maximum(np.maximum(fc / q, fm), floor), 0.0)
        b = np.where(bc + bm > 0, np.maximum(np.maximum(bc / q, bm), self.bwd_kernels * floor), 0.0)
        return float(f.sum()), float(b.sum()), float(f.sum()), float(f[self.selective].sum())

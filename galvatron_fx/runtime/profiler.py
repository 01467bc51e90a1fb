"""`galvatron-fx profile`: measure this machine into a `ClusterSpec` named `local`.

Measures one device's matmul throughput at a few square shapes per dtype and its memory
bandwidth (a large copy), then each collective kind for every group size 2..N over message
sizes from 1 KB up, on N forked gloo CPU ranks (GPUs, when present, are the pipeline issue's
concern), and fits latency + size / bus bandwidth by least squares (`cost_models.fit`).
The result is cached as JSON (default `~/.cache/galvatron_fx/local.json`), which
`--cluster local` reads. Layer timings (`--model`) come with the rest of the cost issue.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from galvatron_fx.cost_models.fit import fit_alpha_beta
from galvatron_fx.cost_models.hardware import ClusterSpec, Link
from galvatron_fx.runtime import collectives as C
from galvatron_fx.runtime.launch import fork_ranks

__all__ = ["DEFAULT_PROFILE", "ProfileConfig", "profile"]

DEFAULT_PROFILE = Path.home() / ".cache" / "galvatron_fx" / "local.json"
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


@dataclass(frozen=True)
class ProfileConfig:
    nproc: int = 2
    max_bytes: int = 256 * 2**20
    """Largest message; sizes go up by 4x from 1 KB."""
    repeats: int = 5
    matmul_sizes: tuple[int, ...] = (512, 1024, 2048)
    copy_bytes: int = 256 * 2**20

    @property
    def sizes(self) -> list[int]:
        out, size = [], 1024
        while size <= self.max_bytes:
            out.append(size)
            size *= 4
        return out


def _progress(done: int, total: int, what: str) -> None:
    bar = "#" * (30 * done // total)
    print(f"\r[{bar:<30}] {done}/{total} {what:<40}", end="", file=sys.stderr, flush=True)


def _best_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_matmul(cfg: ProfileConfig) -> dict[str, float]:
    """Best FLOP/s per dtype over the shapes."""
    out = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        best = 0.0
        for size in cfg.matmul_sizes:
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            best = max(
                best, 2 * size**3 / _best_s(functools.partial(torch.matmul, a, b), cfg.repeats)
            )
        out[name] = best
    return out


def measure_copy(cfg: ProfileConfig) -> float:
    """Bytes read and written per second by a large copy."""
    src = torch.empty(cfg.copy_bytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    return 2 * cfg.copy_bytes / _best_s(lambda: dst.copy_(src), cfg.repeats)


def _collective(kind: str, size: int, n: int) -> Callable[[], Any]:
    elems = max(size // 4, n)
    elems -= elems % n
    if kind == "all_reduce":
        t = torch.ones(elems)
        return lambda: dist.all_reduce(t)
    if kind == "all_gather":
        piece, out = torch.ones(elems // n), torch.empty(elems)
        return lambda: C.all_gather_flat(out, piece)
    if kind == "reduce_scatter":
        full, out = torch.ones(elems), torch.empty(elems // n)
        return lambda: C.reduce_scatter_flat(out, full)
    src, dst = torch.ones(elems), torch.empty(elems)
    return lambda: dist.all_to_all_single(dst, src)


def _rank(rank: int, world: int, cfg: ProfileConfig) -> dict[tuple[str, int, int], float]:
    results: dict[tuple[str, int, int], float] = {}
    steps = [(k, s) for k in KINDS for s in cfg.sizes]
    for i, (kind, size) in enumerate(steps):
        try:
            fn = _collective(kind, size, world)
            dist.barrier()
            results[(kind, world, size)] = statistics.median(_timed(fn) for _ in range(cfg.repeats))
        except RuntimeError:  # a kind this backend lacks
            pass
        if rank == 0:
            _progress(i + 1, len(steps), f"{kind} {size} B on {world} ranks")
    return results


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_collectives(cfg: ProfileConfig, world: int) -> dict[tuple[str, int, int], float]:
    results = fork_ranks(_rank, world, cfg, timeout_s=1800)[0]
    print(file=sys.stderr)
    return results


def _device(rank: int, world: int, cfg: ProfileConfig) -> tuple[dict[str, float], float, float]:
    """One rank's compute while every rank computes: the devices here share cores."""
    dist.barrier()
    flops, bandwidth = measure_matmul(cfg), measure_copy(cfg)
    one = torch.ones(1)
    overhead = _best_s(lambda: [torch.add(one, one) for _ in range(100)], cfg.repeats) / 100
    return flops, bandwidth, overhead


def profile(cfg: ProfileConfig) -> ClusterSpec:
    """Measure this machine with `cfg.nproc` ranks at once; collectives on 2..nproc ranks."""
    flops, bandwidth, overhead = fork_ranks(_device, cfg.nproc, cfg, timeout_s=600)[0]
    links = []
    fits = []
    for world in range(2, cfg.nproc + 1):
        measured = measure_collectives(cfg, world)
        for kind in KINDS:
            points = sorted((s, t) for (k, w, s), t in measured.items() if k == kind)
            if len(points) < 2:
                continue
            fit = fit_alpha_beta(kind, world, [s for s, _ in points], [t for _, t in points])
            fits.append(f"{kind}@{world}: error {fit.relative_error:.0%}")
            for scope in ("intra", "inter"):  # one machine: no other node to reach
                links.append(Link(kind, scope, fit.latency_s, fit.bus_bandwidth_bytes_per_s, world))
    for kind in KINDS:  # other group sizes: the largest one measured
        measured_kind = [lk for lk in links if lk.kind == kind]
        if measured_kind:
            widest = max(measured_kind, key=lambda lk: lk.group_size)
            links += [
                replace(lk, group_size=0)
                for lk in measured_kind
                if lk.group_size == widest.group_size
            ]
    return ClusterSpec(
        "local",
        nodes=1,
        devices_per_node=cfg.nproc,
        peak_flops=flops,
        memory_bytes=_memory_bytes(),
        memory_bandwidth_bytes_per_s=bandwidth,
        links=tuple(links),
        overlap=0.5,
        op_overhead_s=overhead,
        source=f"galvatron-fx profile on {os.uname().nodename} ({cfg.nproc} gloo CPU ranks); "
        "overlap not measured yet (0.5); fits: " + ", ".join(fits),
    )


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 2**34

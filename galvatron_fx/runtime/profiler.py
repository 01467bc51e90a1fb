"""`galvatron-fx profile`: measure this machine into a `ClusterSpec` named `local`.

Measures one device's matmul throughput at a few square shapes per dtype and its memory
bandwidth (a large copy) while every rank computes (the ranks here share cores), then each
collective kind for every group size 2..N over message sizes from 1 KB up, on N forked gloo
CPU ranks (the collectives a CPU job runs; NCCL on GPUs is not measured here), and fits latency +
size / bus bandwidth by least squares (`cost_models.fit`).

Collectives are measured the way a training step meets them: each rank computes about a
layer's worth (`chunk_s`) and then calls the collective in line; the figure is what the
collective adds to that compute. On ranks that share cores this includes the ranks' arrival
skew and the CPU the transport takes, which an isolated measurement misses by 2x or more.
Ranks outside a group keep computing. An all-reduce launched before the compute and waited
for after it gives the overlap fraction. Layer timings (`--model`) are `layer_profile`'s.

The result is cached as JSON (default `~/.cache/galvatron_fx/local.json`), which
`--cluster local` reads.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from galvatron_fx.cost_models.fit import fit_alpha_beta
from galvatron_fx.cost_models.hardware import ClusterSpec, Link
from galvatron_fx.progress import progress
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
    repeats: int = 8
    matmul_sizes: tuple[int, ...] = (512, 1024, 2048)
    copy_bytes: int = 256 * 2**20
    chunk_s: float = 0.01
    """Compute between two collectives while measuring them (about a layer's)."""

    @property
    def sizes(self) -> list[int]:
        out, size = [], 1024
        while size <= self.max_bytes:
            out.append(size)
            size *= 4
        return out


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


def _collective(kind: str, size: int, n: int, group: Any) -> Callable[..., Any]:
    elems = max(size // 4, n)
    elems -= elems % n
    if kind == "all_reduce":
        t = torch.ones(elems)
        return functools.partial(dist.all_reduce, t, group=group)
    if kind == "all_gather":
        piece, out = torch.ones(elems // n), torch.empty(elems)
        return functools.partial(C.all_gather_flat, out, piece, group=group)
    if kind == "reduce_scatter":
        full, out = torch.ones(elems), torch.empty(elems // n)
        return functools.partial(C.reduce_scatter_flat, out, full, group=group)
    src, dst = torch.ones(elems), torch.empty(elems)
    return functools.partial(dist.all_to_all_single, dst, src, group=group)


def _chunk(target_s: float) -> Callable[[], Any]:
    """Compute lasting about `target_s` while every rank computes (a layer's worth). Every
    rank runs the same number of matmuls (the median of their estimates): the skew a
    collective meets grows with the compute before it, so it must not differ by rank."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    mm = functools.partial(torch.mm, a, b)
    dist.barrier()
    once = statistics.median(_best_s(lambda: [mm() for _ in range(5)], 3) / 5 for _ in range(3))
    estimates = [0.0] * dist.get_world_size()
    dist.all_gather_object(estimates, target_s / once)
    reps = max(1, round(statistics.median(estimates)))
    return lambda: [mm() for _ in range(reps)]


def _loop(chunk: Callable[[], Any], coll: Callable[..., Any] | None, iters: int) -> float:
    """Seconds per iteration of compute then, in line, the collective."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        chunk()
        if coll is not None:
            coll()
    return (time.perf_counter() - start) / iters


def _paired(
    chunk: Callable[[], Any], coll: Callable[..., Any] | None, iters: int
) -> tuple[float, float]:
    """(compute alone, compute then the collective): medians of three loops each, taken in
    turns. The machine's speed drifts over a profile (other tenants, clocks); measuring the
    compute right next to the collective keeps that drift out of their difference."""
    alone, with_coll = [], []
    for _ in range(3):
        alone.append(_loop(chunk, None, iters))
        with_coll.append(_loop(chunk, coll, iters))
    return statistics.median(alone), statistics.median(with_coll)


def _overlapped(chunk: Callable[[], Any], coll: Callable[..., Any], iters: int) -> float:
    """Seconds per iteration with the collective launched before the compute."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        work = coll(async_op=True)
        chunk()
        work.wait()
    return (time.perf_counter() - start) / iters


def _my_block(world: int, n: int) -> Any:
    """Consecutive groups of `n` ranks (every rank creates every group): this rank's, or
    None for a rank left over."""
    mine = None
    for start in range(0, world - n + 1, n):
        ranks = list(range(start, start + n))
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def _rank(rank: int, world: int, cfg: ProfileConfig) -> dict[str, Any]:
    """In-situ collective costs: what an in-line collective adds to compute that every rank
    runs, so the arrival skew of ranks sharing cores and the CPU the transport takes are in
    the figure (ranks outside a group keep computing). Also how much of an asynchronous
    all-reduce compute hides."""
    chunk = _chunk(cfg.chunk_s)
    groups = {n: _my_block(world, n) for n in range(2, world + 1)}
    results: dict[tuple[str, int, int], float] = {}
    overlaps = []
    steps = [(n, k, s) for n in range(2, world + 1) for k in KINDS for s in cfg.sizes]
    for i, (n, kind, size) in enumerate(steps):
        group = groups[n]
        coll = _collective(kind, size, n, group) if group is not None else None
        try:
            alone, with_coll = _paired(chunk, coll, cfg.repeats)
        except RuntimeError:  # a kind this backend lacks
            continue
        results[(kind, n, size)] = max(with_coll - alone, 1e-7)
        if coll is not None and kind == "all_reduce" and n == world and size * 16 >= cfg.max_bytes:
            both = statistics.median(_overlapped(chunk, coll, cfg.repeats) for _ in range(3))
            overlaps.append((with_coll - both) / max(min(alone, with_coll - alone), 1e-9))
        if rank == 0:
            progress(i + 1, len(steps), f"{kind} {size} B on {n} of {world} ranks")
    return {"collectives": results, "overlaps": overlaps}


def measure_collectives(cfg: ProfileConfig) -> tuple[dict[tuple[str, int, int], float], float]:
    """Per (kind, group size, bytes): in-situ seconds, the mean over the ranks in a group;
    and the fraction of an asynchronous collective that compute hides."""
    per_rank = fork_ranks(_rank, cfg.nproc, cfg, timeout_s=1800)
    samples: dict[tuple[str, int, int], list[float]] = {}
    for r, result in enumerate(per_rank):
        for (kind, n, size), t in result["collectives"].items():
            if r < cfg.nproc - cfg.nproc % n:  # ranks in a group of n
                samples.setdefault((kind, n, size), []).append(t)
    overlaps = [o for r in per_rank for o in r["overlaps"]]
    overlap = min(max(statistics.median(overlaps), 0.0), 1.0) if overlaps else 0.0
    return {k: statistics.mean(v) for k, v in samples.items()}, overlap


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
    measured, overlap = measure_collectives(cfg)
    for world in range(2, cfg.nproc + 1):
        for kind in KINDS:
            points = sorted((s, t) for (k, w, s), t in measured.items() if (k, w) == (kind, world))
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
        overlap=overlap,
        op_overhead_s=overhead,
        source=f"galvatron-fx profile on {os.uname().nodename} ({cfg.nproc} gloo CPU ranks); "
        f"collectives in situ after {cfg.chunk_s * 1e3:.0f} ms of compute on every rank; "
        f"overlap {overlap:.2f} measured; fits: " + ", ".join(fits),
    )


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 2**34

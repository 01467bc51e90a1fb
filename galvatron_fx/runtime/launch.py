"""Local launch: run `fn(rank, world_size, *args)` on forked gloo CPU ranks.

For tests, benchmarks, the profiler and the demo on one machine. Forking from a process that
has already imported torch, torch.distributed and the functional collectives starts a 4-rank
job in well under a second (spawn: seconds; torchrun: ~10 s). Each rank runs one thread,
joins a gloo group on a fresh TCP port with a short timeout and sends back its result as
bytes (`torch.save`: tensors would otherwise travel as shared-memory handles that die with
the rank); a rank that fails or hangs raises `RankError` with that rank's traceback.
Real jobs use `torchrun`.
"""

from __future__ import annotations

import faulthandler
import io
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives

__all__ = ["RankError", "fork_ranks", "free_port"]


class RankError(RuntimeError):
    """A forked rank failed or did not answer in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    port: int,
    args: tuple[Any, ...],
    out: Any,
    backend: str,
) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        # a crash in C++ still names the Python frames; the real stderr, since pytest's
        # capture replaces sys.stderr with an object that has no file descriptor
        faulthandler.enable(file=sys.__stderr__ or sys.stderr, all_threads=True)
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per rank, as torchrun's LOCAL_RANK does
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=120),
        )
        buf = io.BytesIO()
        torch.save(fn(rank, world, *args), buf)
        out.put((rank, True, buf.getvalue()))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        out.close()
        out.join_thread()  # the queue's feeder thread must flush before we exit
        os._exit(0)  # skip the atexit handlers inherited from the parent (pytest's, say)


def fork_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    backend: str = "gloo",
) -> list[Any]:
    """`fn(rank, world_size, *args)` on `world_size` forked ranks; results by rank.
    `backend="nccl"` gives rank r GPU r (the parent must not have initialised CUDA: a
    forked child cannot use it then)."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, out, backend))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            rank, ok, value = _next_answer(out, procs, results, deadline, timeout_s)
            if not ok:
                raise RankError(f"rank {rank} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


def _next_answer(
    out: Any, procs: list[Any], results: dict[int, Any], deadline: float, timeout_s: float
) -> tuple[int, bool, Any]:
    """The next rank's answer; a rank that died without one (a crash, a signal) is
    reported at once instead of after the whole timeout."""
    while True:
        try:
            return out.get(timeout=1.0)
        except queue.Empty:
            pass
        dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
        if dead:
            try:  # its answer may still be in the pipe
                return out.get(timeout=2.0)
            except queue.Empty:
                code = procs[dead[0]].exitcode
                raise RankError(
                    f"rank {dead[0]} died without answering (exit code {code}; a negative "
                    "code is the signal that killed it); its stderr has the details"
                ) from None
        if time.monotonic() > deadline:
            raise RankError(f"ranks timed out after {timeout_s} s; answered: {sorted(results)}")

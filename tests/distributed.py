"""Fork gloo ranks from pytest: `run_ranks(fn, world_size, *args)` returns every rank's result.

Forking from a parent that has already imported torch, torch.distributed and the functional
collectives starts a 4-rank job in well under a second (spawn: seconds, torchrun: ~10 s).
Each rank sets one thread, joins a gloo group on a fresh TCP port with a short timeout, runs
`fn(rank, world_size, *args)` and sends back its (picklable) result or its traceback; a rank
that fails or hangs fails the test with that rank's traceback.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives

__all__ = ["free_port", "run_ranks"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(
    fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple[Any, ...], out: Any
) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        result = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(result, buf)  # plain bytes: tensors would travel as shared memory handles
        out.put((rank, True, buf.getvalue()))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        out.close()
        out.join_thread()  # the queue's feeder thread must flush before we exit
        os._exit(0)  # skip atexit handlers inherited from pytest


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` forked gloo ranks; results by rank."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, out))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in procs:
            rank, ok, value = out.get(timeout=timeout_s)
            if ok:
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    except Exception as err:  # queue.Empty: a rank hung
        errors.append(f"ranks timed out after {timeout_s} s ({err!r}); done: {sorted(results)}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]

"""`galvatron-fx profile --model`: measured forward, backward, recompute and step time of every
distinct unit under each strategy's local shapes, keyed by the unit's fingerprint.

For each strategy, the analysed model is rewritten for rank 0 of a job of tp x dp ranks on
PyTorch's fake process group: the program computes exactly what that rank would, on its
local shapes, while every collective returns at once. `layer_timer` then times each unit.
So the table holds compute only; communication stays with the alpha-beta model, which the
profiler fits separately. Ranks on one machine share its cores, so `concurrency` copies of
the measurement run at once (the number of ranks the job will run here; 1 per GPU).

Units with equal fingerprints (the repeated layers) are one entry, the median over them and
over the concurrent copies. The table is cached as JSON next to the cluster profile and
merged with what is there when measured at the same concurrency.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from galvatron_fx.cost_models.layer_times import LayerTime, LayerTimes, median_time, timing_key
from galvatron_fx.lowering import Analysis, lower
from galvatron_fx.plan import LayerStrategy, PlanError
from galvatron_fx.planning.unit_terms import stepped_elems
from galvatron_fx.progress import progress
from galvatron_fx.runtime import collectives as C
from galvatron_fx.runtime.assemble import assemble
from galvatron_fx.runtime.launch import fork_ranks
from galvatron_fx.runtime.layer_timer import time_units
from galvatron_fx.unit_graph.shapes import layer_shapes
from galvatron_fx.unit_graph.units import model_fingerprint

__all__ = ["fitting_strategies", "profile_layers"]


def _measure(
    analysis: Analysis, args: tuple, kwargs: dict, s: LayerStrategy, repeats: int
) -> dict[str, LayerTime]:
    """Rank 0 of a tp x dp job on the fake process group: each unit's times."""
    if dist.is_initialized():
        dist.destroy_process_group()
    C.GROUPS.clear()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=s.devices)
    plan = analysis.plan(s, world_size=s.devices)
    compiled = assemble(lower(analysis.copy(), plan, 0), world=s.devices)
    return time_units(compiled, args, kwargs, stepped_elems(compiled.params, plan), repeats=repeats)


def _rank(
    rank: int,
    world: int,
    analysis: Analysis,
    args: tuple,
    kwargs: dict,
    strategies: list[LayerStrategy],
    repeats: int,
    barrier: Any,
) -> dict[str, dict[str, LayerTime]]:
    torch.set_flush_denormal(True)  # collectives on the fake group leave garbage behind
    out = {}
    for i, s in enumerate(strategies):
        barrier.wait()  # the copies start each strategy together, as real ranks would
        out[s.short()] = _measure(analysis, args, kwargs, s, repeats)
        if rank == 0:
            progress(i + 1, len(strategies), s.short())
    return out


def profile_layers(
    analysis: Analysis,
    args: tuple,
    kwargs: dict,
    strategies: list[LayerStrategy],
    *,
    concurrency: int = 1,
    repeats: int = 5,
) -> LayerTimes:
    """Measure every distinct unit of `analysis` (captured with example inputs `args`,
    `kwargs`, the global batch) under each strategy, `concurrency` copies at once. A strategy
    the model refuses (tp not dividing its heads, say) is an error naming it."""
    for s in strategies:
        _check(analysis, s)
    barrier = mp.get_context("fork").Barrier(concurrency)
    per_rank = fork_ranks(
        _rank, concurrency, analysis, args, kwargs, strategies, repeats, barrier, timeout_s=3600
    )
    samples: dict[str, list[LayerTime]] = defaultdict(list)
    for s in strategies:
        plan = analysis.plan(s, world_size=s.devices)
        for times in per_rank:
            for unit in analysis.layers:
                key, _ = timing_key(unit.fingerprint, plan.strategy(unit.name))
                samples[key].append(times[s.short()][unit.name])
    entries = {k: median_time(v) for k, v in samples.items()}
    source = f"galvatron-fx profile --model on {os.uname().nodename}, {concurrency} at once"
    return LayerTimes(concurrency, entries, source)


def _check(analysis: Analysis, s: LayerStrategy) -> None:
    gm = analysis.graph_module
    try:
        analysis.plan(s, world_size=s.devices).check_model(model_fingerprint(gm), layer_shapes(gm))
    except PlanError as err:
        raise ValueError(f"profile --model: strategy {s.short()!r} does not fit: {err}") from None


def fitting_strategies(analysis: Analysis, strategies: list[LayerStrategy]) -> list[LayerStrategy]:
    """The strategies this model accepts (drops, say, a tp that does not divide its heads)."""
    out = []
    for s in strategies:
        try:
            _check(analysis, s)
        except ValueError:
            continue
        out.append(s)
    return out

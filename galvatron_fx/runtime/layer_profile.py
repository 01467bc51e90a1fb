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

import json
import multiprocessing as mp
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from galvatron_fx.jsonio import fields_of, read_json
from galvatron_fx.plan import DPMode, LayerStrategy, Recompute
from galvatron_fx.progress import progress
from galvatron_fx.runtime import collectives as C
from galvatron_fx.runtime.launch import fork_ranks
from galvatron_fx.runtime.layer_timer import LayerTime, median_time, time_units

__all__ = [
    "DEFAULT_LAYERS",
    "LayerTimes",
    "default_strategies",
    "fitting_strategies",
    "profile_layers",
    "timing_key",
]

DEFAULT_LAYERS = Path.home() / ".cache" / "galvatron_fx" / "layers.json"


def timing_key(fingerprint: str, s: LayerStrategy) -> tuple[str, float]:
    """The table key of a unit under `s`, and the factor on the measured step time.

    ZeRO-1 and -2 compute what plain DP computes and step 1/dp of the elements, so they share
    its entry; ZeRO-3 gathers and frees parameters around each use and has its own."""
    step = 1.0
    if s.dp_mode in (DPMode.ZERO1, DPMode.ZERO2):
        s, step = replace(s, dp_mode=DPMode.ALLREDUCE), 1.0 / s.dp
    if s.dp == 1:
        s = replace(s, dp_mode=DPMode.ALLREDUCE)
    return f"{fingerprint}/{s.short()}", step


@dataclass
class LayerTimes:
    """Measured unit times, by `timing_key`."""

    concurrency: int
    """Ranks that computed at once on this machine while measuring."""
    entries: dict[str, LayerTime] = field(default_factory=dict)
    source: str = ""

    def lookup(self, fingerprint: str, s: LayerStrategy) -> LayerTime | None:
        key, step = timing_key(fingerprint, s)
        found = self.entries.get(key)
        return found.scaled(step) if found is not None else None

    def to_json(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "source": self.source,
            "entries": {k: asdict(v) for k, v in sorted(self.entries.items())},
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str = "layer timings") -> LayerTimes:
        """Checked field by field: a ValueError names the path (`entries['k'].fwd_s`)."""
        return cls(**fields_of(cls, data, source))

    def save(self, path: Path) -> None:
        """Merge into `path` (same concurrency) or replace it; written atomically."""
        merged = self
        if path.exists():
            old = load_layer_times(path)
            if old is not None and old.concurrency == self.concurrency:
                merged = LayerTimes(self.concurrency, {**old.entries, **self.entries}, self.source)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(merged.to_json(), indent=1) + "\n")
        tmp.replace(path)


def load_layer_times(path: Path) -> LayerTimes | None:
    """The table at `path`, or None when there is none."""
    if not path.exists():
        return None
    try:
        return LayerTimes.from_json(read_json(path), source=str(path))
    except ValueError as err:
        raise ValueError(f"{err}; fix it, or delete it and profile again") from None


def default_strategies(world: int) -> list[LayerStrategy]:
    """Every tp x dp split of `world` with and without sp, plain DP or ZeRO-3, and each
    recomputation: the shapes a search over `world` devices can ask about."""
    out = []
    for tp in (d for d in range(1, world + 1) if world % d == 0):
        dp = world // tp
        for sp in (False, True) if tp > 1 else (False,):
            modes = (DPMode.ALLREDUCE, DPMode.ZERO3) if dp > 1 else (DPMode.ALLREDUCE,)
            for mode in modes:
                for rc in Recompute:
                    out.append(LayerStrategy(tp=tp, sp=sp, dp=dp, dp_mode=mode, recompute=rc))
    return out


def _measure(
    analysis: Any, args: tuple, kwargs: dict, s: LayerStrategy, repeats: int
) -> dict[str, LayerTime]:
    """Rank 0 of a tp x dp job on the fake process group: each unit's times."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from galvatron_fx.compile import parallelize
    from galvatron_fx.passes.plan_costs import stepped_elems

    if dist.is_initialized():
        dist.destroy_process_group()
    C.GROUPS.clear()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=s.devices)
    plan = analysis.plan(s, world_size=s.devices)
    compiled = parallelize(analysis.copy(), plan=plan, rank=0)
    return time_units(compiled, args, kwargs, stepped_elems(compiled.params, plan), repeats=repeats)


def _rank(
    rank: int,
    world: int,
    analysis: Any,
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
    analysis: Any,
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


def _check(analysis: Any, s: LayerStrategy) -> None:
    from galvatron_fx.plan import PlanError
    from galvatron_fx.summary import layer_shapes, model_fingerprint

    gm = analysis.graph_module
    try:
        analysis.plan(s, world_size=s.devices).check_model(model_fingerprint(gm), layer_shapes(gm))
    except PlanError as err:
        raise ValueError(f"profile --model: strategy {s.short()!r} does not fit: {err}") from None


def fitting_strategies(analysis: Any, strategies: list[LayerStrategy]) -> list[LayerStrategy]:
    """The strategies this model accepts (drops, say, a tp that does not divide its heads)."""
    out = []
    for s in strategies:
        try:
            _check(analysis, s)
        except ValueError:
            continue
        out.append(s)
    return out

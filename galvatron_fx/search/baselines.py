"""Hand-made plans, priced by the same cost model as the search, for comparison.

Each baseline is a family of uniform plans with layers cut evenly into stages, as Megatron-LM
does: one strategy for every layer; the segments (embedding, head, loss) the same less what a
segment cannot take (sequence parallelism, Ulysses, recomputation), free to split the
vocabulary. The family's best member over micro-batch counts (and its own degrees) is
reported:

- `dp`: plain data parallelism over every device;
- `zero3`: ZeRO-3 over every device; `zero3+full-recompute`: the same, every layer recomputed;
- `tp-in-node`: tensor parallelism over a node (with or without sequence parallelism), plain
  data parallelism across nodes;
- `megatron-3d`: TP inside a node, pipeline stages (1F1B), plain DP for the rest, with any
  recomputation and sequence parallelism, best over the degrees;
- `ulysses`: Ulysses sequence parallelism over a group inside a node (DeepSpeed-Ulysses),
  plain DP for the rest or ZeRO-3 over every rank, with any recomputation, best over the
  degrees;
- `uniform`: the best single strategy of the search's own candidates, any pipeline.

A family with no member that fits reports None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from galvatron_fx.plan import DPMode, LayerStrategy, Recompute, Schedule
from galvatron_fx.search.dp import Solution
from galvatron_fx.search.planner import Config, Searched, SearchSpace, configs, solve_config
from galvatron_fx.search.strategies import candidates

__all__ = [
    "BASELINES",
    "UNIFORM_TOLERANCE",
    "Baseline",
    "BaselineResult",
    "even_starts",
    "run_baselines",
    "simplest_within",
]

UNIFORM_TOLERANCE = 0.01
"""A mixed plan must beat the best uniform plan of its configuration by more than this
fraction of the step time to be chosen."""


@dataclass(frozen=True)
class Baseline:
    name: str
    layer_strategies: Callable[[SearchSpace, int], list[LayerStrategy]]
    """Strategies to try for a stage of `d` devices."""
    pipelined: bool = False
    """Whether the family may use pipeline stages (1F1B)."""


@dataclass(frozen=True)
class BaselineResult:
    name: str
    time_s: float | None
    config: Config | None
    strategy: LayerStrategy | None
    solution: Solution | None
    searched: Searched | None = None
    """The solved instance: `searched.plan(terms, world)` is the baseline as a runnable Plan."""


def _tp1(mode: DPMode, rc: Recompute) -> Callable[[SearchSpace, int], list[LayerStrategy]]:
    return lambda space, d: [
        LayerStrategy(dp=d, dp_mode=mode if d > 1 else DPMode.ALLREDUCE, recompute=rc)
    ]


def _tp_in_node(space: SearchSpace, d: int) -> list[LayerStrategy]:
    tp = min(space.cluster.devices_per_node, d)
    if tp == 1:
        return [LayerStrategy(dp=d)]
    return [LayerStrategy(tp=tp, sp=sp, dp=d // tp) for sp in (False, True)]


def _megatron(space: SearchSpace, d: int) -> list[LayerStrategy]:
    out = []
    tp = 1
    while tp <= min(space.cluster.devices_per_node, d):
        for sp in (False, True) if tp > 1 else (False,):
            for rc in Recompute:
                out.append(LayerStrategy(tp=tp, sp=sp, dp=d // tp, recompute=rc))
        tp *= 2
    return out


def _ulysses(space: SearchSpace, d: int) -> list[LayerStrategy]:
    out = []
    tp = 2
    while tp <= min(space.cluster.devices_per_node, d):
        for mode in (DPMode.ALLREDUCE, DPMode.ZERO3):  # over all d ranks, dp = 1 included
            for rc in Recompute:
                out.append(
                    LayerStrategy(tp=tp, ulysses=True, dp=d // tp, dp_mode=mode, recompute=rc)
                )
        tp *= 2
    return out


def _uniform(space: SearchSpace, d: int) -> list[LayerStrategy]:
    return candidates(d, min(space.cluster.devices_per_node, d))


BASELINES: tuple[Baseline, ...] = (
    Baseline("dp", _tp1(DPMode.ALLREDUCE, Recompute.NONE)),
    Baseline("zero3", _tp1(DPMode.ZERO3, Recompute.NONE)),
    Baseline("zero3+full-recompute", _tp1(DPMode.ZERO3, Recompute.FULL)),
    Baseline("tp-in-node", _tp_in_node),
    Baseline("megatron-3d", _megatron, pipelined=True),
    Baseline("ulysses", _ulysses),
    Baseline("uniform", _uniform, pipelined=True),
)


def even_starts(kinds: tuple[str, ...], stages: int) -> tuple[int, ...] | None:
    """Stage starts with the layers divided as evenly as they go (the first stages take
    the remainder), segments staying with their neighbouring layers."""
    layers = [i for i, k in enumerate(kinds) if k == "layer"]
    if len(layers) < stages:
        return None
    base, extra = divmod(len(layers), stages)
    starts, at = [0], 0
    for k in range(stages - 1):
        at += base + (1 if k < extra else 0)
        starts.append(layers[at])
    return tuple(starts)


def _segment_variants(s: LayerStrategy) -> frozenset[LayerStrategy]:
    """What a segment takes of the layers' strategy `s`: `s` without sequence parallelism,
    Ulysses or recomputation (segment candidates have none), the vocabulary split or not."""
    plain = dataclasses.replace(
        s, sp=False, ulysses=False, recompute=Recompute.NONE, vocab_parallel=False
    )
    out = {plain}
    if s.tp > 1:
        out.add(dataclasses.replace(plain, vocab_parallel=True))
    return frozenset(out)


def _uniform_in(s: LayerStrategy) -> Callable[[LayerStrategy, str], bool]:
    """The candidates of the uniform plan of `s`: every layer `s` itself (never a segment's
    variant of it, which a layer could take too), every segment one of its variants."""
    segments = _segment_variants(s)

    def allowed(candidate: LayerStrategy, kind: str) -> bool:
        return candidate == s if kind == "layer" else candidate in segments

    return allowed


def _family_configs(space: SearchSpace, baseline: Baseline) -> Iterable[Config]:
    for c in configs(space.world, len(space.terms.units), space.global_batch, chunks=()):
        if c.schedule is Schedule.GPIPE:
            continue
        if c.pipeline > 1 and not baseline.pipelined:
            continue
        yield c


def best_of(space: SearchSpace, baseline: Baseline) -> BaselineResult:
    best = BaselineResult(baseline.name, None, None, None, None)
    for config in _family_configs(space, baseline):
        starts = even_starts(space.terms.kinds, config.stages)
        if starts is None:
            continue
        d = space.world // config.pipeline
        for s in baseline.layer_strategies(space, d):
            sub = space.restricted(_uniform_in(s))
            if best.time_s is not None and sub.lower_bound(config) >= best.time_s:
                continue
            problem = sub.problem(config, prune=False)
            if problem is None:
                continue
            searched = solve_config(sub, config, problem, starts, prune=False)
            solution = searched.solution if searched else None
            if solution is not None and (best.time_s is None or solution.time_s < best.time_s):
                best = BaselineResult(baseline.name, solution.time_s, config, s, solution, searched)
    return best


def run_baselines(space: SearchSpace) -> list[BaselineResult]:
    return [best_of(space, b) for b in BASELINES]


def simplest_within(space: SearchSpace, best: Searched, tolerance: float) -> Searched:
    """The best uniform plan of `best`'s configuration (one strategy for every layer, free
    stage boundaries) when it is within `tolerance` of `best`'s time, else `best`.

    A plan that mixes strategies pays layout switches and leans on the cost model's small
    differences between strategies; when the predicted gain is below the model's
    resolution (its measured median error is a few percent), the measured outcome is a
    coin toss (on the reference GPT a mix predicted 0.2% faster than plain DP measured 6%
    slower), so the simpler plan is the safer one."""
    config = best.config
    if len({best.options[i].strategies[c] for i, c in enumerate(best.solution.choice)}) == 1:
        return best
    d = space.world // config.pipeline
    chosen = best
    limit = best.solution.time_s * (1 + tolerance)
    for s in _uniform(space, d):
        sub = space.restricted(_uniform_in(s))
        if sub.lower_bound(config) > limit:
            continue
        problem = sub.problem(config, prune=False)
        found = solve_config(sub, config, problem, prune=False) if problem is not None else None
        better = found is not None and (
            chosen is best or found.solution.time_s < chosen.solution.time_s
        )
        if better and found is not None and found.solution.time_s <= limit:
            chosen = found
    return best if chosen is best else _in_options_of(space, config, chosen) or best


def _in_options_of(space: SearchSpace, config: Config, found: Searched) -> Searched | None:
    """`found` with its choices as indices into the options of `space`'s problem for
    `config` (what `explain` and the plan read), or None when a chosen strategy is not
    among them (pruned as dominated)."""
    problem = space.problem(config)
    if problem is None:
        return None
    choice = []
    for options, unit, c in zip(problem.units, found.options, found.solution.choice, strict=True):
        strategy = unit.strategies[c]
        if strategy not in options.strategies:
            return None
        choice.append(options.strategies.index(strategy))
    solution = dataclasses.replace(found.solution, choice=tuple(choice))
    return Searched(found.config, solution, problem.units, tuple(sorted(space.fixed.items())))

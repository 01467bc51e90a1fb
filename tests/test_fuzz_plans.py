"""Random plans drawn by hypothesis: valid ones train like one process, invalid ones are
refused with `PlanError` before any work.

Valid plans, on 4 gloo ranks, for the tiny GPT (2 or 4 layers, or 2 with the head tied to
the embedding) and a tiny Llama with 2 query heads over 1 key/value head: every unit gets tp
in {1, 2, 4} dividing its query heads and
the widths it splits, sp, Ulysses (where the attention's heads and sequence divide) and
vocab_parallel only with tp > 1, dp = 4 / degree / tp in any dp
mode, either TP rank order and any recomputation (units sharing a weight share tp, dp, rank
order and vocab split); the pipeline has degree 1, 2 or 4, random stage starts (2 virtual
stages where there are units enough; every pipeline rank holding a parameter; a cut between
the embedding and a head tied to it puts the weight in both stages), micro-batches whose
size every dp divides and a schedule legal for them. One step's loss (every rank's) and
every gathered gradient, and every parameter after two AdamW steps, equal one process's
within 1e-5 relative in each tensor's 2-norm (tests/exactness.py explains the floor for
analytically zero gradients and eps=1e-5), and every rank's pieces (gradients after the
first step, parameters after the last) equal their replicas' on the other ranks bit for bit
(`exactness.replica_disagreements`). Several plans share one fork of the ranks; a failure
names the plan's JSON.

Invalid plans: one mutation of a valid plan's JSON per kind in `MUTATIONS` (wrong degrees,
types or fields, a unit missing, unknown, repeated or out of order, bad stage starts or
micro-batches, another model's fingerprint, a shared weight stored in different layouts
by the stages it is cut across, ...). `Plan.from_json`
(alone, for a plan wrong whatever the model) and then `compile`, in this process as rank 0
of a 4-rank job whose collectives raise, must raise `PlanError` and nothing else, with the
message the mutation names (a regex: a plan refused for another reason fails).

Example counts are fixed and derandomized under `make test` (2 batches of valid plans per
model, 9 invalid plans per kind). `make fuzz` (GFX_FUZZ_EXAMPLES=N) draws N batches per model
and 10 N invalid plans per kind at random; a failure prints the shrunk example and a
`@reproduce_failure` blob (`--hypothesis-seed=S` replays a whole run).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_GPT, TINY_HF, build
from distributed import run_ranks
from exactness import held_checksums, replica_disagreements, whole_checksums
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st

import galvatron_fx as gfx
from galvatron_fx.lowering import analyze
from galvatron_fx.meta import LAYER
from galvatron_fx.plan import (
    DPMode,
    LayerShape,
    LayerStrategy,
    PipelineConfig,
    Plan,
    PlanError,
    Recompute,
)
from galvatron_fx.runtime import collectives as C
from galvatron_fx.unit_graph.shapes import layer_shapes
from galvatron_fx.unit_graph.units import model_fingerprint

gfx_compile = importlib.import_module("galvatron_fx.compile")  # the package shadows it

SPECS = {
    "gpt2": TINY_GPT,
    "gpt4": TINY_GPT.replace("layers=2", "layers=4"),
    # 2 query heads over 1 key/value head: tp 2 runs the whole kv projections on both TP
    # ranks, tp 4 divides no head count (what the invalid tp mutation draws)
    "llama": TINY_HF["llama"].replace(
        "num_attention_heads=4,num_key_value_heads=2", "num_attention_heads=2,num_key_value_heads=1"
    ),
    "gpt2-tied": TINY_GPT + ",tied=1",  # embedding and head share a weight
}
WORLD, BATCH, SEQ, STEPS, LR, EPS = 4, 8, 16, 2, 1e-3, 1e-5
RTOL = 1e-5

_FUZZ = int(os.environ.get("GFX_FUZZ_EXAMPLES", "0"))
"""0: the fixed `make test` run; N > 0: `make fuzz`, N random batches of valid plans per
model and 10 N invalid plans per kind of mutation."""
_COMMON = {
    "derandomize": not _FUZZ,
    "database": None,
    "print_blob": bool(_FUZZ),
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
}
VALID = settings(  # per model
    max_examples=_FUZZ or 2,
    # a fixed run reports its failing batch of plans at once; shrinking forks the ranks
    # for every attempt (minutes), so only `make fuzz` shrinks
    phases=list(Phase) if _FUZZ else [Phase.explicit, Phase.generate],
    **_COMMON,
)
INVALID = settings(max_examples=10 * _FUZZ or 9, **_COMMON)  # per kind: about 200 in all
PLANS_PER_FORK = 4


# Model facts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What drawing a plan for a model needs."""

    name: str
    units: tuple[str, ...]
    fingerprint: str
    tps: dict[str, tuple[int, ...]]
    """Per unit, the tp degrees (of 1, 2, 4) dividing its heads and split widths."""
    ulysses: dict[str, tuple[int, ...]]
    """Per unit, the Ulysses degrees (of 2, 4) dividing its attention's heads and sequence."""
    tied: tuple[tuple[str, ...], ...]
    """Units sharing a weight (tied embedding and head): one layout, any stages."""
    with_params: frozenset[int]
    """Units (by position) reading a parameter."""
    starts: tuple[int, ...]
    """Units (by position) that may start a pipeline stage: any after the first that does
    not leave the last stage without a parameter (a weight shared across the cut is held
    by both stages)."""
    attention: frozenset[str] = frozenset()
    """Units with attention (query heads): the ones Ulysses can run."""


def degrees(
    shapes: dict[str, LayerShape],
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Per unit, the tp degrees (of 1, 2, 4) dividing its query heads and split widths, and
    the Ulysses degrees (of 2, 4) dividing its heads, key/value heads and sequence."""
    tps = {
        u: tuple(
            t
            for t in (1, 2, 4)
            if all(h % t == 0 for h in s.heads) and all(n % t == 0 for _, n in s.tp_split_dims)
        )
        for u, s in shapes.items()
    }
    ulysses = {
        u: tuple(
            t
            for t in (2, 4)
            if s.heads and all(n % t == 0 for n in s.heads + s.kv_heads + s.seq_lens)
        )
        for u, s in shapes.items()
    }
    return tps, ulysses


@functools.cache
def facts(name: str) -> Facts:
    model, args, kwargs = build(SPECS[name], batch=BATCH, seq=SEQ)
    analysis = analyze(model, args, kwargs)
    shapes = layer_shapes(analysis.graph_module)
    tps, ulysses = degrees(shapes)
    units = tuple(analysis.units)
    readers: dict[int, set[int]] = {}  # per parameter (by identity), the units reading it
    for node in analysis.graph.nodes:
        param = getattr_path(analysis.graph_module, str(node.target))
        if node.op == "get_attr" and isinstance(param, torch.nn.Parameter):
            readers.setdefault(id(param), set()).update(
                units.index(LAYER.get(u).name) for u in node.users
            )
    spans = [(min(at), max(at)) for at in readers.values()]
    starts = tuple(k for k in range(1, len(units)) if any(hi >= k for _, hi in spans))
    tied = tuple(tuple(units[i] for i in sorted(at)) for at in readers.values() if len(at) > 1)
    with_params = frozenset(i for at in readers.values() for i in at)
    fingerprint = model_fingerprint(analysis.graph_module)
    attention = frozenset(u for u, s in shapes.items() if s.heads)
    return Facts(name, units, fingerprint, tps, ulysses, tied, with_params, starts, attention)


def getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


@functools.cache
def reference(name: str) -> dict[str, Any]:
    """One process: the first step's loss and gradients, the parameters after STEPS steps."""
    model, args, kwargs = build(SPECS[name], batch=BATCH, seq=SEQ)
    opt = _adamw(model.parameters())
    loss, grads = 0.0, {}
    for step in range(STEPS):
        opt.zero_grad()
        out = model(*args, **kwargs)
        value = out if isinstance(out, torch.Tensor) else out.loss
        value.backward()
        if step == 0:
            loss = value.item()
            named = model.named_parameters(remove_duplicate=False)  # tied: every name
            grads = {n: p.grad.clone() for n, p in named}
        opt.step()
    named = model.named_parameters(remove_duplicate=False)
    params = {n: p.detach().clone() for n, p in named}
    return {"loss": loss, "grads": grads, "params": params}


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR, eps=EPS)


# Valid plans ---------------------------------------------------------------------------


def _schedules(degree: int, virtual: int, dp1_possible: bool) -> list[str]:
    """Schedules legal for the pipeline (interleaved-zb only where every dp can be 1)."""
    out = ["1f1b", "gpipe", "interleaved-1f1b"] if virtual == 1 else ["interleaved-1f1b"]
    return [*out, "interleaved-zb"] if dp1_possible else out


def _holds_params(f: Facts, starts: list[int], degree: int) -> bool:
    """Every pipeline rank's stages (stage k on rank k % degree) read a parameter."""
    stage = [sum(k >= s for s in starts) for k in range(len(f.units))]
    return {stage[i] % degree for i in f.with_params} == set(range(degree))


@st.composite
def strategies_for(
    draw: st.DrawFn, tps: list[int], per_stage: int, ulysses_tps: tuple[int, ...] = ()
) -> LayerStrategy:
    tp = draw(st.sampled_from(tps))
    kinds = ["none", "megatron", "ulysses"] if tp in ulysses_tps else ["none", "megatron"]
    seq = draw(st.sampled_from(kinds)) if tp > 1 else "none"
    return LayerStrategy(
        tp=tp,
        sp=seq == "megatron",
        ulysses=seq == "ulysses",
        dp=per_stage // tp,
        dp_mode=draw(st.sampled_from(list(DPMode))),
        recompute=draw(st.sampled_from(list(Recompute))),
        tp_consecutive=draw(st.booleans()),
        vocab_parallel=tp > 1 and seq != "ulysses" and draw(st.booleans()),
    )


def _tie(f: Facts, strategies: dict[str, LayerStrategy]) -> None:
    """Units sharing a weight take the first one's layout (tp, dp, rank order, vocab)."""
    for first, *others in f.tied:
        s = strategies[first]
        for unit in others:
            sp = strategies[unit].sp and s.tp > 1
            ulysses = strategies[unit].ulysses and s.tp == strategies[unit].tp
            strategies[unit] = dataclasses.replace(
                strategies[unit],
                **{k: getattr(s, k) for k in ("tp", "dp", "tp_consecutive", "vocab_parallel")},
                sp=sp,
                ulysses=ulysses and not s.vocab_parallel,
            )


@st.composite
def valid_plans(draw: st.DrawFn, f: Facts) -> Plan:
    degree = draw(st.sampled_from([d for d in (1, 2, 4) if d - 1 <= len(f.starts)]))
    per_stage = WORLD // degree
    tps = {u: [t for t in f.tps[u] if per_stage % t == 0] for u in f.units}
    chunks = [v for v in (1, 2) if v == 1 or (degree > 1 and 2 * degree - 1 <= len(f.starts))]
    virtual = draw(st.sampled_from(chunks))
    zb_possible = all(per_stage in tps[u] for u in f.units)
    schedule = draw(st.sampled_from(_schedules(degree, virtual, zb_possible)))
    n = degree * virtual
    cuts = st.sets(st.sampled_from(f.starts), min_size=n - 1, max_size=n - 1) if n > 1 else None
    starts = sorted(draw(cuts)) if cuts is not None else []
    assume(_holds_params(f, starts, degree))
    if schedule == "interleaved-zb":  # no dp inside stages
        tps = {u: [per_stage] for u in f.units}
    # interleaved-zb: no data-parallel state, and a Ulysses group's weights have one
    ulysses = {u: () if schedule == "interleaved-zb" else f.ulysses[u] for u in f.units}
    strategies = {u: draw(strategies_for(tps[u], per_stage, ulysses[u])) for u in f.units}
    _tie(f, strategies)
    widest = max(s.dp for s in strategies.values())
    micro = draw(st.sampled_from([m for m in (1, 2, 4, 8) if (BATCH // m) % widest == 0]))
    pipeline = PipelineConfig(
        degree=degree,
        stage_starts=tuple(f.units[i] for i in starts),
        micro_batches=micro,
        schedule=schedule,
        virtual_stages=virtual,
    )
    return Plan(WORLD, tuple(strategies.items()), f.fingerprint, pipeline)


def _run_plans(rank: int, world: int, name: str, plans: list[dict]) -> list[dict]:
    """Every plan in turn on this rank: compile a fresh model, two AdamW steps."""
    out = []
    for i, data in enumerate(plans):
        try:
            model, args, kwargs = build(SPECS[name], batch=BATCH, seq=SEQ)
            plan = Plan.from_json(data)
            compiled = gfx.compile(model, args, kwargs, plan=plan, optimizer=_adamw)
            loss = compiled.train_step(*args, **kwargs).item()
            grads = compiled.full_grads()
            sums = held_checksums(compiled, "gradient") | whole_checksums(grads, "gradient")
            for _ in range(STEPS - 1):
                compiled.train_step(*args, **kwargs)
            params = compiled.full_params()
            sums |= held_checksums(compiled, "value") | whole_checksums(params, "value")
        except Exception as err:
            raise RuntimeError(f"plan {i} failed on rank {rank}: {json.dumps(data)}") from err
        keep = rank == 0
        got = {"loss": loss, "grads": grads if keep else {}, "params": params if keep else {}}
        out.append({**got, "replicas": sums})
    return out


def _rel(got: torch.Tensor | None, want: torch.Tensor, floor: float) -> float:
    if got is None or got.shape != want.shape:
        return float("inf")
    return (got - want).norm().item() / max(want.norm().item(), floor)


def _differences(ref: dict[str, Any], got: list[dict[str, Any]]) -> list[str]:
    """Each loss, gradient or parameter off by more than RTOL, with its relative error
    (every rank's loss; rank 0's gathered tensors), and each rank whose pieces differ from
    their replicas on other ranks (`exactness.replica_disagreements`)."""
    out = replica_disagreements([r["replicas"] for r in got])
    for rank, r in enumerate(got):
        err = abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
        if err > RTOL:
            out.append(f"loss on rank {rank}: {r['loss']} vs {ref['loss']} (rel {err:.2e})")
    grads, params = got[0]["grads"], got[0]["params"]  # may hold buffers too
    missing = sorted({*ref["params"]} - {*grads} | {*ref["params"]} - {*params})
    if missing:
        out.append(f"no gradient or value for {missing[:4]}")
    floor = 1e-6 * max(g.norm().item() for g in ref["grads"].values())
    noise = {n for n, g in ref["grads"].items() if g.norm().item() < floor}
    for n, g in ref["grads"].items():
        if (err := _rel(grads.get(n), g, floor)) > RTOL:
            out.append(f"gradient {n}: rel {err:.2e}")
    for n, p in ref["params"].items():
        if n not in noise and (err := _rel(params.get(n), p, 1e-30)) > RTOL:
            out.append(f"{n} after {STEPS} AdamW steps: rel {err:.2e}")
    return out


@pytest.mark.parametrize("name", list(SPECS))
@VALID
@given(data=st.data())
def test_random_valid_plans_train_like_one_process(name: str, data: st.DataObject) -> None:
    batch = st.lists(valid_plans(facts(name)), min_size=1, max_size=PLANS_PER_FORK)
    plans = data.draw(batch, label="plans")
    for plan in plans:
        assert Plan.from_json(plan.to_json()) == plan
        note(f"{name}: {json.dumps(plan.to_json())}")
    results = run_ranks(_run_plans, WORLD, name, [p.to_json() for p in plans], timeout_s=600)
    ref = reference(name)
    for i, plan in enumerate(plans):
        bad = _differences(ref, [r[i] for r in results])
        where = f"{name}, plan {json.dumps(plan.to_json())}\n{plan.table()}"
        assert not bad, "\n".join([where, *bad[:8]])


# Invalid plans -------------------------------------------------------------------------

Mutation = Callable[[st.DrawFn, dict, Facts], tuple[Any, str]]
MUTATIONS: dict[str, tuple[Mutation, bool]] = {}
"""Name -> (mutation of a valid plan's JSON, whether `Plan.from_json` alone must refuse it:
the plan is wrong whatever the model). A mutation returns the mutated JSON and the reason
the refusal must give, a regex searched in the `PlanError`'s message: each mutation makes
exactly one thing wrong (it draws around anything else that would also be refused), so a
plan refused for another reason fails the test."""


def mutation(*, plan_level: bool) -> Callable[[Mutation], Mutation]:
    def register(fn: Mutation) -> Mutation:
        MUTATIONS[fn.__name__] = (fn, plan_level)
        return fn

    return register


def _pick(draw: st.DrawFn, data: dict) -> dict:
    """One strategy entry of `data` (mutable: `data` is a deep copy)."""
    return draw(st.sampled_from(data["strategies"]))


def _per_stage(data: dict) -> int:
    return WORLD // data["pipeline"]["degree"]


def _q(value: Any) -> str:
    """`value` as a message quotes it (its repr), as a regex."""
    return re.escape(repr(value))


def _unit(s: dict) -> str:
    """How a message locates strategy entry `s` of the JSON: `(unit 'blocks.0')`."""
    return rf"\(unit {_q(s['unit'])}\)"


def _no_zero_bubble(data: dict) -> None:
    """interleaved-zb takes no dp and no Ulysses inside stages: a mutation that adds either
    would be refused for that first."""
    assume(data["pipeline"]["schedule"] != "interleaved-zb")


@mutation(plan_level=False)
def tp_not_dividing_heads(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    _no_zero_bubble(data)
    options = [
        (s, t)
        for s in data["strategies"]
        for t in (2, 4)
        if _per_stage(data) % t == 0 and t not in f.tps[s["unit"]]
    ]
    assume(options)
    s, tp = draw(st.sampled_from(options))
    s.update(tp=tp, dp=_per_stage(data) // tp)
    # heads, a split width, or (a Ulysses unit) heads for the Ulysses degree
    return data, rf"layer {_q(s['unit'])}: .*not divisible by (the Ulysses degree )?tp={tp}\b"


@mutation(plan_level=True)
def degrees_not_the_world(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    s = _pick(draw, data)
    key = draw(st.sampled_from(["tp", "dp"]))
    s[key] *= draw(st.sampled_from([2, 4]))
    product = rf"tp={s['tp']} x dp={s['dp']} x pp={data['pipeline']['degree']}"
    return data, rf"layer {_q(s['unit'])}: {product} = \d+ devices, but world_size is {WORLD}$"


@mutation(plan_level=True)
def world_size(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    value = draw(st.sampled_from([1, 2, 3, 8, 0, -4]))
    data["world_size"] = value
    if value < 1:
        return data, rf"Plan\.world_size must be >= 1, got {value}$"
    return data, rf"= {WORLD} devices, but world_size is {value}$"


@mutation(plan_level=True)
def sp_or_vocab_without_tp(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    s = _pick(draw, data)
    s.update(tp=1, dp=_per_stage(data), sp=False, vocab_parallel=False, ulysses=False)
    flag = draw(st.sampled_from(["sp", "vocab_parallel", "ulysses"]))
    s[flag] = True
    return data, rf"{_unit(s)}: LayerStrategy\.{flag} needs tp > 1"


@mutation(plan_level=False)
def ulysses_without_attention(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    _no_zero_bubble(data)
    options = [s for s in data["strategies"] if s["unit"] not in f.attention]
    assume(options and _per_stage(data) % 2 == 0)
    s = draw(st.sampled_from(options))
    s.update(tp=2, dp=_per_stage(data) // 2, sp=False, vocab_parallel=False, ulysses=True)
    return data, rf"unit {_q(s['unit'])}: ulysses needs attention"


def _not_a_stage_start(data: dict, s: dict) -> None:
    """A unit that starts a stage cannot leave the plan without the stage start naming a
    unit that is not there (refused for that first)."""
    assume(s["unit"] not in data["pipeline"]["stage_starts"])


_ANOTHER_MODEL = r"\); it was made for another model$"


@mutation(plan_level=False)
def unknown_unit(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    s = _pick(draw, data)
    _not_a_stage_start(data, s)
    old, s["unit"] = s["unit"], draw(st.sampled_from(["blocks.99", "nope", "", "Blocks.0"]))
    return data, rf"missing \[{_q(old)}\], unknown \[{_q(s['unit'])}\]{_ANOTHER_MODEL}"


@mutation(plan_level=False)
def missing_unit(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    s = _pick(draw, data)
    _not_a_stage_start(data, s)
    data["strategies"].remove(s)
    _not_a_stage_start(data, data["strategies"][0])  # the first unit starts no stage
    return data, rf"missing \[{_q(s['unit'])}\], unknown \[\]{_ANOTHER_MODEL}"


@mutation(plan_level=True)
def repeated_unit(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    s = _pick(draw, data)
    if draw(st.booleans()):
        data["strategies"].insert(draw(st.integers(0, len(data["strategies"]))), dict(s))
    else:
        other = draw(st.sampled_from([x for x in data["strategies"] if x is not s]))
        other["unit"] = s["unit"]
    return data, r"^Plan: a unit is listed twice in \["


@mutation(plan_level=False)
def units_out_of_order(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    strategies = data["strategies"]
    i, j = draw(st.sets(st.integers(0, len(strategies) - 1), min_size=2, max_size=2))
    for k in (i, j):  # a stage start moved would be refused for the order of the starts
        _not_a_stage_start(data, strategies[k])
    strategies[i], strategies[j] = strategies[j], strategies[i]
    return data, rf"does not match this model's layers \(missing \[\], unknown \[\]{_ANOTHER_MODEL}"


@mutation(plan_level=True)
def stage_starts(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    p = data["pipeline"]
    starts, stages = p["stage_starts"], p["degree"] * p["virtual_stages"]
    kinds = ["not a unit", "the first unit", "one more", "one fewer", "repeated", "reversed"]
    kind = draw(st.sampled_from(kinds))
    # replacing a start needs one (appending would be "one more"); reordering needs two
    assume(kind not in ("not a unit", "the first unit", "one fewer") or starts)
    assume(kind not in ("repeated", "reversed") or len(starts) > 1)
    if kind in ("not a unit", "the first unit"):
        name = "nope" if kind == "not a unit" else f.units[0]
        starts[draw(st.integers(0, len(starts) - 1))] = name
        return data, rf"pipeline stage start {_q(name)} is not a unit after the first$"
    if kind == "one more":
        starts.insert(draw(st.integers(0, len(starts))), draw(st.sampled_from(f.units[1:])))
    elif kind == "one fewer":
        starts.pop(draw(st.integers(0, len(starts) - 1)))
    elif kind == "repeated":
        starts[-1] = starts[0]
    else:
        starts.reverse()
    if kind in ("one more", "one fewer"):
        got = len(starts)
        return data, rf"PipelineConfig: {stages} stages need {stages - 1} stage_starts, got {got}$"
    return data, r"pipeline stage starts \(.*\) are not in order$"


def _rounds_divide(p: dict) -> bool:
    """torch's interleaved schedules run the micro-batches in max(1, m // degree) rounds,
    which must divide m."""
    rounds = max(1, p["micro_batches"] // p["degree"])
    return not p["schedule"].startswith("interleaved") or p["micro_batches"] % rounds == 0


@mutation(plan_level=False)
def micro_batches_not_dividing_the_batch(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    m = data["pipeline"]["micro_batches"] = draw(st.sampled_from([3, 5, 6, 7, 16, 24]))
    assume(_rounds_divide(data["pipeline"]))
    return data, rf"^plan: {m} micro-batches do not split the batch of {BATCH}$"


@mutation(plan_level=False)
def micro_batch_not_split_by_dp(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    widest = max(s["dp"] for s in data["strategies"])
    options = [m for m in (1, 2, 4, 8) if (BATCH // m) % widest]
    assume(options)
    m = data["pipeline"]["micro_batches"] = draw(st.sampled_from(options))
    split = rf"a micro-batch of {BATCH // m} \(the batch of {BATCH} in {m}\)"
    return data, rf"dp=\d+ does not divide {split}"


@mutation(plan_level=True)
def not_positive(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    value = draw(st.sampled_from([0, -1, -2]))
    where = draw(st.sampled_from(["degree", "micro_batches", "virtual_stages", "tp", "dp"]))
    owner = "PipelineConfig" if where in data["pipeline"] else "LayerStrategy"
    (data["pipeline"] if owner == "PipelineConfig" else _pick(draw, data))[where] = value
    return data, rf"{owner}\.{where} must be an integer >= 1, got {value}$"


_WRONG_INT = ["2", 2.0, 4.0, 1.5, True, None, [2], {"n": 2}]
_WRONG_BOOL = ["yes", "false", "true", 0, 1, None, [True]]
_WRONG_ENUM = [3, None, "ZERO3", "zero4", "", ["zero1"], True]
_WRONG_STR = [5, None, ["blocks.0"], {"u": 1}, 1.5]
_UNIT_NAME = r'strategies\[\d+\]: expected an object with a "unit" name$'


@mutation(plan_level=True)
def wrong_type(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    where = draw(st.sampled_from(["strategy", "pipeline", "plan"]))
    expected = {"int": "an integer", "bool": "true or false", "enum": r"one of \[.*\]"}
    if where == "strategy":
        s = _pick(draw, data)
        key = draw(st.sampled_from(list(s)))
        kinds = {"tp": "int", "dp": "int", "unit": "str", "dp_mode": "enum", "recompute": "enum"}
        kind = kinds.get(key, "bool")
        values = {"int": _WRONG_INT, "str": _WRONG_STR, "enum": _WRONG_ENUM}
        at = _unit(s)  # before the unit's name is replaced
        s[key] = draw(st.sampled_from(values.get(kind, _WRONG_BOOL)))
        if kind == "str":
            return data, _UNIT_NAME
        return data, rf"{at}\.{key}: expected {expected[kind]}, got "
    if where == "pipeline":
        p = data["pipeline"]
        key = draw(st.sampled_from(list(p)))
        wrong = {"schedule": _WRONG_ENUM, "stage_starts": ["blocks.1", 3, None, {"a": 1}]}
        # a float or a bool equal to the right integer is still the wrong JSON type
        p[key] = draw(st.sampled_from(wrong.get(key, _WRONG_INT)))
        kind = {"schedule": expected["enum"], "stage_starts": r"a list \[\.\.\.\]"}
        return data, rf"^plan: pipeline\.{key}: expected {kind.get(key, expected['int'])}, got "
    key = draw(st.sampled_from(["world_size", "strategies", "pipeline", "schema_version"]))
    wrong = {
        "world_size": ["4", 4.0, 4.5, True, None, [4]],
        "strategies": [None, "embedding", 3, {"unit": "embedding"}, ["embedding"], [3]],
        "pipeline": [None, [], "1f1b", 2, [["degree", 1]]],
        "schema_version": ["1", 1.5, None, 2, 0],
    }[key]
    value = data[key] = draw(st.sampled_from(wrong))
    if key == "schema_version":
        return data, rf"^plan: schema_version {_q(value)} is not \d+; re-run the search"
    if key == "strategies" and isinstance(value, list):  # a list, of things not strategies
        return data, _UNIT_NAME
    kind = {"world_size": expected["int"], "strategies": r"a list \[\.\.\.\]"}
    what = kind.get(key, r"an object \{\.\.\.\}")
    return data, rf"^plan: {key}: expected {what}, got "


@mutation(plan_level=True)
def not_an_object(draw: st.DrawFn, data: dict, f: Facts) -> tuple[Any, str]:
    value = draw(st.sampled_from([[data], None, "plan", 4, [], json.dumps(data)]))
    return value, rf"^plan: expected a plan object \{{\.\.\.\}}, got {type(value).__name__}$"


@mutation(plan_level=True)
def unknown_field(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    where = draw(st.sampled_from(["plan", "pipeline", "strategy"]))
    name = draw(st.sampled_from(["foo", "tp_degree", "pp", "Sp", "zero"]))
    if where == "strategy":
        s = _pick(draw, data)
        s[name] = 1
        at = rf"plan: strategies\[\d+\] {_unit(s)}"
    else:
        (data if where == "plan" else data["pipeline"])[name] = 1
        at = "plan" if where == "plan" else "plan: pipeline"
    return data, rf"^{at}: unknown field\(s\) \[{_q(name)}\]"


@mutation(plan_level=True)
def missing_field(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    key = draw(st.sampled_from(["world_size", "model_fingerprint", "strategies", "unit"]))
    del (data if key != "unit" else _pick(draw, data))[key]
    if key == "unit":
        return data, _UNIT_NAME
    return data, rf"^plan: missing field\(s\) \[{_q(key)}\]$"


@mutation(plan_level=False)
def another_model(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    other = [g.fingerprint for g in map(facts, SPECS) if g.fingerprint != f.fingerprint]
    value = data["model_fingerprint"] = draw(st.sampled_from([*other, "0" * 16, ""]))
    made = rf"was made for model {re.escape(value)}, this model is {re.escape(f.fingerprint)}"
    return data, rf"{made}: same layer names, different shapes or ops$"


@mutation(plan_level=True)
def virtual_stages_without_interleaving(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    """Two chunks per rank (the stage starts they need) under a schedule that runs one."""
    assume(len(f.starts) >= 3)
    starts = draw(st.sets(st.sampled_from(f.starts), min_size=3, max_size=3))
    data = _two_stages(draw, data, *(f.units[i] for i in sorted(starts)))
    data["pipeline"].update(virtual_stages=2, schedule=draw(st.sampled_from(["1f1b", "gpipe"])))
    return data, r"virtual_stages > 1 needs schedule 'interleaved-1f1b' or 'interleaved-zb'$"


@mutation(plan_level=True)
def zero_bubble_with_dp(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    assume(any(s["dp"] > 1 or s.get("ulysses") for s in data["strategies"]))
    data["pipeline"]["schedule"] = "interleaved-zb"
    assume(_rounds_divide(data["pipeline"]))
    return data, r"schedule 'interleaved-zb' does not compose with data parallelism inside"


@mutation(plan_level=True)
def interleaved_rounds(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    """torch's interleaved schedules run the micro-batches in max(1, m // degree) rounds,
    which must divide m (checked by the plan, not only by the batch it splits)."""
    starts = draw(st.sets(st.integers(1, len(f.units) - 1), min_size=3, max_size=3))
    m = draw(st.sampled_from([9, 11, 13, 14, 19]))
    data["pipeline"] = {
        "degree": 4,
        "stage_starts": [f.units[i] for i in sorted(starts)],
        "micro_batches": m,
        "schedule": draw(st.sampled_from(["interleaved-1f1b", "interleaved-zb"])),
        "virtual_stages": 1,
    }
    for s in data["strategies"]:
        s.update(tp=1, dp=1, sp=False, vocab_parallel=False, ulysses=False)
    rounds = m // 4
    return data, rf"in {rounds} rounds \(micro_batches // degree\), so micro_batches={m} must"


def _two_stages(draw: st.DrawFn, data: dict, *starts: str) -> dict:
    """`data` as a pipeline of degree 2 starting stages at `starts`, dp 2 inside."""
    data["pipeline"] = {
        "degree": 2,
        "stage_starts": list(starts),
        "micro_batches": draw(st.sampled_from([1, 2, 4])),
        "schedule": draw(st.sampled_from(["1f1b", "gpipe", "interleaved-1f1b"])),
        "virtual_stages": 1,
    }
    for s in data["strategies"]:
        s.update(tp=1, dp=2, sp=False, vocab_parallel=False, ulysses=False)
    return data


_TIED = r"share parameter '.+' \(tied weights\) but store it differently"


@mutation(plan_level=False)
def stages_cut_a_shared_weight_stored_differently(
    draw: st.DrawFn, data: dict, f: Facts
) -> tuple[dict, str]:
    """Two stages each hold a copy of a weight two units share, in different layouts:
    their gradients could not be summed piece by piece."""
    cuts = [
        (group, u)
        for group in f.tied
        for u in f.units[f.units.index(group[0]) + 1 : f.units.index(group[-1]) + 1]
    ]
    assume(cuts)
    group, start = draw(st.sampled_from(cuts))
    data = _two_stages(draw, data, start)
    last = next(s for s in data["strategies"] if s["unit"] == group[-1])
    last.update(tp=2, dp=1, vocab_parallel=draw(st.booleans()))
    return data, _TIED


@mutation(plan_level=False)
def stage_without_parameters(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    """The last stage holds the loss alone: its optimizer would get no parameter."""
    empty = [u for i, u in enumerate(f.units) if i > max(f.with_params)]
    assume(empty)
    data = _two_stages(draw, data, draw(st.sampled_from(empty)))
    return data, r"^pipeline: the stages of pipeline rank\(s\) \[1\] hold no parameter"


_LAYOUTS = [(1, 4, True, False), (2, 2, True, False), (2, 2, False, False), (2, 2, True, True)]
_LAYOUTS += [(2, 2, False, True), (4, 1, True, False), (4, 1, True, True)]
"""(tp, dp, tp_consecutive, vocab_parallel) of 4 ranks, each a different layout."""


@mutation(plan_level=False)
def tied_units_in_different_layouts(draw: st.DrawFn, data: dict, f: Facts) -> tuple[dict, str]:
    """A shared weight is stored once: its units need one tp, dp, rank order, vocab split."""
    assume(f.tied)
    first, second = draw(st.lists(st.sampled_from(_LAYOUTS), min_size=2, max_size=2, unique=True))
    data["pipeline"] = {}
    for s in data["strategies"]:
        s.update(tp=1, dp=4, sp=False, vocab_parallel=False, ulysses=False)
    by_unit = {s["unit"]: s for s in data["strategies"]}
    for unit, (tp, dp, consecutive, vocab) in zip(f.tied[0][:2], (first, second), strict=True):
        by_unit[unit].update(tp=tp, dp=dp, tp_consecutive=consecutive, vocab_parallel=vocab)
    return data, _TIED


@st.composite
def invalid_plans(draw: st.DrawFn, kind: str) -> tuple[str, Any, str]:
    """(model name, JSON, the reason it must be refused for): a valid plan for the model
    with mutation `kind` applied."""
    name = draw(st.sampled_from(list(SPECS)))
    f = facts(name)
    data = copy.deepcopy(draw(valid_plans(f)).to_json())
    return name, *MUTATIONS[kind][0](draw, data, f)


_COLLECTIVES = (
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "new_group",
    "recv_object_list",
    "send_object_list",
)


@contextlib.contextmanager
def fake_world(world: int) -> Iterator[None]:
    """This process as rank 0 of a `world`-rank job whose collectives raise: validation
    must refuse an invalid plan before any rank waits on another."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def collective(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a collective ran before the plan was refused")

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    saved = {name: getattr(dist, name) for name in _COLLECTIVES}
    try:
        for name in _COLLECTIVES:
            setattr(dist, name, collective)
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
        dist.destroy_process_group()
        C.GROUPS.clear()


_CAPTURED: dict[tuple[int, int], Any] = {}
"""(id of the model, batch) -> its analysis, for `captured_once`."""


@contextlib.contextmanager
def captured_once() -> Iterator[None]:
    """compile's captures served from a cache (a deep copy each time): the same graphs,
    without a second of tracing per example."""
    real = gfx_compile.analyze

    def analyze_cached(model, example_inputs=(), example_kwargs=None, **kwargs):
        tensors = [*example_inputs, *(example_kwargs or {}).values()]
        key = (id(model), int(tensors[0].shape[0]))
        if key not in _CAPTURED:
            _CAPTURED[key] = real(model, example_inputs, example_kwargs, **kwargs)
        return _CAPTURED[key].copy()

    gfx_compile.analyze = analyze_cached
    try:
        yield
    finally:
        gfx_compile.analyze = real


@functools.cache
def _model(name: str) -> tuple[Any, ...]:
    return build(SPECS[name], batch=BATCH, seq=SEQ)


@INVALID
@given(data=st.data())
def _refused(kind: str, data: st.DataObject) -> None:
    name, plan, reason = data.draw(invalid_plans(kind), label="model, plan, reason")
    model, args, kwargs = _model(name)
    with pytest.raises(PlanError, match=reason):
        loaded = Plan.from_json(plan)
        assert not MUTATIONS[kind][1], f"Plan.from_json accepted a {kind} plan"
        gfx.compile(model, args, kwargs, plan=loaded, optimizer=_adamw)


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_random_invalid_plans_raise_plan_error(kind: str) -> None:
    with fake_world(WORLD), captured_once():
        _refused(kind)


def _refusal(name: str, plan: Any) -> str:
    """The message `Plan.from_json` or `compile` refuses `plan` with."""
    model, args, kwargs = _model(name)
    try:
        gfx.compile(model, args, kwargs, plan=Plan.from_json(plan), optimizer=_adamw)
    except PlanError as err:
        return str(err)
    raise AssertionError(f"accepted: {json.dumps(plan)}")


def _one(kind: str) -> tuple[str, Any, str]:
    """The first example `invalid_plans(kind)` draws (derandomized: the same every run)."""
    found = []

    @settings(max_examples=1, phases=[Phase.generate], **_COMMON)
    @given(example=invalid_plans(kind))
    def draw(example: tuple[str, Any, str]) -> None:
        found.append(example)

    draw()
    return found[0]


def test_each_reason_matches_its_own_refusal_and_no_other():
    """One example of every mutation, refused: its reason matches its own message
    and no message of another mutation that states a different reason, so a plan refused
    for the wrong reason fails `test_random_invalid_plans_raise_plan_error`."""
    examples = {kind: _one(kind) for kind in MUTATIONS}
    with fake_world(WORLD), captured_once():
        messages = {kind: _refusal(name, plan) for kind, (name, plan, _) in examples.items()}
    for kind, (_, _, reason) in examples.items():
        assert re.search(reason, messages[kind]), (kind, reason, messages[kind])
        others = [o for o, m in messages.items() if o != kind and re.search(reason, m)]
        assert all(examples[o][2] == reason for o in others), (kind, reason, others)

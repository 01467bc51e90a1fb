"""Random transformer architectures (tests/arch_variants.py) under random valid plans train
like one process, and keep their ops split where the issue says they must.

Each variant (fused or separate q/k/v, MHA/GQA/MQA, rotary/ALiBi/absolute positions, pre-
or post-norm, parallel blocks, SwiGLU, eager or sdpa attention, `x @ w.T` linears, ...) is
captured once here; plans are drawn by `test_fuzz_plans.valid_plans` from the variant's own
facts (tp in {1, 2, 4} dividing the heads and widths `layer_shapes` reports, sp or Ulysses
where legal, every dp mode, recomputation, vocab-parallel segments, pipelines of 1, 2 or 4
stages at starts that `check_plan` accepts). On 4 gloo ranks, several plans per fork, one
step's loss (every rank's), every gathered gradient and every parameter after two AdamW
steps must equal one process's within 1e-5 relative (tests/exactness.py's semantics), and
every rank's pieces must equal their replicas' bit for bit. Every
`ShardWarning` a rank's compile raises is recorded per plan and reported on failure.

`make test` runs `FIXED`, eight hand-picked variants that together use every building block
(`test_fixed_variants_cover_every_block`), each under one derandomized batch of plans, and
checks that no op the issue lists (item 8) gathers under tp on any of them.
`make fuzz` (GFX_FUZZ_EXAMPLES=N) draws N random (variant, plans) examples.
Known failures are `KNOWN` (xfail, not strict): remove an entry once its cause is fixed.
"""

from __future__ import annotations

import functools
import json
import os
import re
import traceback
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from arch_variants import BLOCKS, HEADS, Variant, build_variant, variant_problems
from distributed import run_ranks
from exactness import held_checksums, replica_disagreements, whole_checksums
from hypothesis import HealthCheck, Phase, assume, given, note, seed, settings
from hypothesis import strategies as st
from test_fuzz_plans import Facts, degrees, valid_plans

import galvatron_fx as gfx
from galvatron_fx.lowering import Analysis, analyze
from galvatron_fx.meta import LAYER
from galvatron_fx.passes.manager import RewriteTarget, run_passes
from galvatron_fx.passes.shard import ShardWarning, shard
from galvatron_fx.plan import LayerStrategy, PipelineConfig, Plan, PlanError
from galvatron_fx.plan_checks import check_plan
from galvatron_fx.unit_graph.shapes import layer_shapes
from galvatron_fx.unit_graph.units import model_fingerprint

WORLD, BATCH, SEQ, STEPS, LR, EPS = 4, 8, 16, 2, 1e-3, 1e-5
RTOL = 1e-5
PLANS_PER_FORK = 3
FIXED_PLANS = 2
"""Plans per fixed variant under `make test` (one fork each: about 10 s on 2 cores)."""

_FUZZ = int(os.environ.get("GFX_FUZZ_EXAMPLES", "0"))
"""0: the fixed `make test` run; N > 0: `make fuzz`, N random (variant, plans) examples."""
_BASE = settings(
    derandomize=not _FUZZ,
    database=None,
    print_blob=bool(_FUZZ),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],  # shrinking forks the ranks per attempt
)

ITEM_8_OPS = re.compile(
    r"aten\.(chunk|split|split_with_sizes|slice|unbind|select|stack|baddbmm|bmm|matmul|mm|"
    r"reshape|view|_unsafe_view|type_as|_to_copy|to|cross_entropy_loss)\b"
)
"""Ops that issue 18 (item 8) says must keep their split instead of gathering."""


# Variants --------------------------------------------------------------------------------

V = Variant
FIXED: dict[str, Variant] = {
    "nanogpt": V(qkv="chunk"),
    "llama": V("separate", 2, "expand", "rope_half", mlp="swiglu", bias=False, norm="rms_hand"),
    "phi": V(
        "slice", 1, "interleave", "rope_partial", parallel=True,
        attention="eager_additive", tied=True, vocab=64,
    ),
    "gptj": V("unbind", positions="rope_interleaved", parallel=True, attention="eager_masked_fill"),
    "bloom": V("split", positions="alibi", attention="eager_masked_fill", tied=True),
    "post-mm-ooo": V(
        "split", 2, "interleave", "sinusoidal", post_norm=True, mlp="swiglu",
        attention="eager_additive", bias=False, norm="rms_torch", matmul_linears=True,
        out_of_order=True, hidden=32, vocab=64,
    ),
    "mqa-post-par": V(
        "separate", 1, "expand", "learned", post_norm=True, parallel=True, norm="rms_torch",
        tied=True, matmul_linears=True, hidden=32,
    ),
    "sinus-ooo": V(
        "chunk", positions="sinusoidal", mlp="swiglu", bias=False, out_of_order=True, hidden=32
    ),
}  # fmt: skip
"""Together they use every choice of every block (one family's style each, roughly)."""

KNOWN: dict[str, str] = {}
"""Fixed variant -> why it fails today (xfail, not strict)."""
KNOWN_WARNINGS: dict[str, str] = {}
"""Fixed variant -> the item-8 ops that still gather on it (xfail, not strict)."""


def blocks_of(v: Variant) -> set[tuple[str, object]]:
    """The (field, choice) pairs `v` exercises (the repeat of k/v only with fewer kv heads)."""
    out = {(f, getattr(v, f)) for f in BLOCKS}
    return out - {("repeat_kv", v.repeat_kv)} if v.kv_heads == HEADS else out


def _param(name: str, known: dict[str, str]) -> Any:
    marks = [pytest.mark.xfail(reason=known[name], strict=False)] if name in known else []
    return pytest.param(name, marks=marks, id=name)


# Facts of a variant --------------------------------------------------------------------


@functools.cache
def analysis_of(v: Variant) -> Analysis:
    """The variant captured at the whole batch (use a `.copy()` to rewrite it)."""
    model, args, kwargs = build_variant(v, BATCH, SEQ)
    return analyze(model, args, kwargs)


@functools.cache
def facts(v: Variant) -> Facts:
    """What `valid_plans` needs of the variant, from its captured graph."""
    analysis = analysis_of(v)
    gm = analysis.graph_module
    shapes = layer_shapes(gm)
    tps, ulysses = degrees(shapes)
    units = tuple(analysis.units)
    readers = _readers(gm, units)
    fingerprint = model_fingerprint(gm)
    spans = [(min(at), max(at)) for at in readers]
    cut_ok = _tied_cut_allowed(gm, units, fingerprint, [s for s in spans if s[0] < s[1]])
    starts = tuple(
        k
        for k in range(1, len(units))
        if (cut_ok or not any(lo < k <= hi for lo, hi in spans)) and any(hi >= k for _, hi in spans)
    )
    tied = tuple(tuple(units[i] for i in sorted(at)) for at in readers if len(at) > 1)
    with_params = frozenset(i for at in readers for i in at)
    return Facts(v.name, units, fingerprint, tps, ulysses, tied, with_params, starts)


def _readers(gm: torch.fx.GraphModule, units: tuple[str, ...]) -> list[set[int]]:
    """Per parameter (by identity), the positions of the units reading it."""
    out: dict[int, set[int]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        param = gm.get_parameter(str(node.target)) if _is_param(gm, str(node.target)) else None
        if param is not None:
            out.setdefault(id(param), set()).update(
                units.index(LAYER.get(u).name) for u in node.users
            )
    return list(out.values())


def _is_param(gm: torch.fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True


def _tied_cut_allowed(
    gm: torch.fx.GraphModule, units: tuple[str, ...], fingerprint: str, tied: list[tuple[int, int]]
) -> bool:
    """Whether `check_plan` accepts a pipeline cutting between units that share a weight
    (Megatron's tied embedding across the first and last stage)."""
    if not tied:
        return False
    hi = tied[0][1]
    strategies = tuple((u, LayerStrategy(dp=2)) for u in units)
    pipeline = PipelineConfig(degree=2, stage_starts=(units[hi],), micro_batches=1)
    try:
        check_plan(Plan(WORLD, strategies, fingerprint, pipeline), gm, WORLD, micro_batches=True)
    except PlanError:
        return False
    return True


@functools.cache
def reference(v: Variant) -> dict[str, Any]:
    """One process: the first step's loss and gradients, the parameters after STEPS steps."""
    model, args, kwargs = build_variant(v, BATCH, SEQ)
    opt = _adamw(model.parameters())
    loss, grads = 0.0, {}
    for step in range(STEPS):
        opt.zero_grad()
        value = model(*args, **kwargs)
        value.backward()
        if step == 0:
            loss = value.item()
            named = model.named_parameters(remove_duplicate=False)  # tied: every name
            grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
        opt.step()
    named = model.named_parameters(remove_duplicate=False)
    params = {n: p.detach().clone() for n, p in named}
    return {"loss": loss, "grads": grads, "params": params, "rounding": _rounding(v, grads, params)}


def _rounding(
    v: Variant, grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Per gradient (by name) and per parameter after the steps (`after:` + name), how far
    the float32 reference is from the same steps in float64: its own rounding error.
    Softmax backward cancels, and in some variants the query projection's float32 gradient
    is 1.3e-5 off the float64 one, above RTOL before any rank splits anything; AdamW then
    carries such a gradient's rounding into a small parameter (a norm's bias 1.1e-5 off)."""
    model, args, kwargs = build_variant(v, BATCH, SEQ)
    model.double()
    opt = _adamw(model.parameters())
    exact: dict[str, torch.Tensor] = {}
    for step in range(STEPS):
        opt.zero_grad()
        model(*args, **kwargs).backward()
        if step == 0:
            exact = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
        opt.step()
    after = dict(model.named_parameters(remove_duplicate=False))
    out = {n: _rel(g.double(), exact[n], 1e-30) for n, g in grads.items() if n in exact}
    out |= {f"after:{n}": _rel(q.double(), after[n].detach(), 1e-30) for n, q in params.items()}
    return out


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, eps=EPS)


# On the ranks ----------------------------------------------------------------------------


def _gathering_ops(caught: list[warnings.WarningMessage]) -> list[str]:
    """The ops named by the ShardWarnings in `caught`, with their layers, one line each."""
    out = []
    for w in caught:
        if issubclass(w.category, ShardWarning):
            text = str(w.message)
            op = re.search(r"lets (\S+)", text)
            layers = re.findall(r"layer '([^']+)'", text)
            out.append(f"{op.group(1) if op else text[:60]} in {','.join(layers)}")
    return sorted(set(out))


def _run_plans(rank: int, world: int, v: Variant, plans: list[dict]) -> list[dict]:
    """Every plan in turn on this rank: compile a fresh model, STEPS AdamW steps. A failure
    is recorded (its traceback's tail) and the next plan runs."""
    out = []
    for data in plans:
        result: dict[str, Any] = {"loss": None, "grads": {}, "params": {}, "error": ""}
        result["replicas"] = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ShardWarning)
            try:
                model, args, kwargs = build_variant(v, BATCH, SEQ)
                compiled = gfx.compile(
                    model, args, kwargs, plan=Plan.from_json(data), optimizer=_adamw
                )
                result["loss"] = compiled.train_step(*args, **kwargs).item()
                grads = compiled.full_grads()
                sums = held_checksums(compiled, "gradient") | whole_checksums(grads, "gradient")
                for _ in range(STEPS - 1):
                    compiled.train_step(*args, **kwargs)
                params = compiled.full_params()
                sums |= held_checksums(compiled, "value") | whole_checksums(params, "value")
                result["replicas"] = sums
                if rank == 0:
                    result.update(grads=grads, params=params)
            except Exception as err:
                result["error"] = f"rank {rank}: {_tail(err)}"
        result["gathers"] = _gathering_ops(caught)
        out.append(result)
    return out


def _tail(err: BaseException) -> str:
    """The last frames and message of `err` and of each exception that caused it."""
    parts = []
    while err is not None:
        frames = traceback.format_tb(err.__traceback__)[-2:]
        parts.append("".join(frames) + f"{type(err).__name__}: {err}"[:800])
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return "\n<- caused by ->\n".join(reversed(parts))[-3000:]


def _rel(got: torch.Tensor | None, want: torch.Tensor, floor: float) -> float:
    if got is None or got.shape != want.shape:
        return float("inf")
    return (got - want).norm().item() / max(want.norm().item(), floor)


def differences(ref: dict[str, Any], got: list[dict[str, Any]]) -> list[str]:
    """Each error, loss, gradient or parameter off by more than RTOL (exactness.check's
    floor for analytically zero gradients; every rank's loss, rank 0's gathered tensors),
    and each rank whose pieces differ from their replicas on other ranks."""
    errors = [r["error"] for r in got if r["error"]]
    if errors:
        return errors[:1]
    out = replica_disagreements([r["replicas"] for r in got])
    for rank, r in enumerate(got):
        err = abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
        if err > RTOL:
            out.append(f"loss on rank {rank}: {r['loss']} vs {ref['loss']} (rel {err:.2e})")
    grads, params = got[0]["grads"], got[0]["params"]
    floor = 1e-6 * max(g.norm().item() for g in ref["grads"].values())
    noise = {n for n, g in ref["grads"].items() if g.norm().item() < floor}
    for n, g in ref["grads"].items():  # below the floor: rounding noise, off by < floor
        # a float32 gradient is only as exact as its own rounding (twice it: both sides round)
        tol = max(RTOL, 2 * ref["rounding"].get(n, 0.0)) if n not in noise else 1.0
        if (err := _rel(grads.get(n), g, floor)) > tol:
            out.append(f"gradient {n}: rel {err:.2e} (the reference's own rounding: {tol / 2:.1e})")
    for n, p in ref["params"].items():
        tol = max(RTOL, 2 * ref["rounding"].get(f"after:{n}", 0.0))
        if n not in noise and (err := _rel(params.get(n), p, 1e-30)) > tol:
            out.append(f"{n} after {STEPS} AdamW steps: rel {err:.2e} (own rounding {tol / 2:.1e})")
    return out


def run_and_compare(v: Variant, plans: list[Plan]) -> list[str]:
    """One fork of the ranks for `plans`; one report per failing plan (a difference from
    one process, or an item-8 op gathering)."""
    results = run_ranks(_run_plans, WORLD, v, [p.to_json() for p in plans], timeout_s=900)
    ref, reports = reference(v), []
    for i, plan in enumerate(plans):
        bad = differences(ref, [r[i] for r in results])
        item_8 = [g for g in results[0][i]["gathers"] if ITEM_8_OPS.match(g)]
        bad += [f"an op that should keep its split gathers: {g}" for g in item_8]
        if bad:
            gathers = "\n  ".join(results[0][i]["gathers"]) or "none"
            where = f"{v.name}, plan {json.dumps(plan.to_json())}\n{plan.table()}"
            reports.append("\n".join([where, *bad[:8], f"ShardWarnings:\n  {gathers}"]))
    return reports


def interesting(plans: list[Plan]) -> bool:
    """Some plan splits a layer's weights or cuts the model into stages."""
    return any(p.pipeline.degree > 1 or any(s.tp > 1 for _, s in p.strategies) for p in plans)


# Tests ---------------------------------------------------------------------------------


def test_fixed_variants_cover_every_block() -> None:
    assert all(not variant_problems(v) for v in FIXED.values())
    used = set().union(*map(blocks_of, FIXED.values()))
    missing = {(f, c) for f, choices in BLOCKS.items() for c in choices} - used
    assert not missing, f"no fixed variant uses {sorted(missing, key=str)}"


def _fixed(name: str) -> Callable[[], None]:
    """One derandomized batch of plans for a fixed variant, drawn from a seed of its own
    (the same draws for every variant would give every one the same kind of plan)."""
    v = FIXED[name]

    @seed(zlib.crc32(name.encode()))
    @settings(_BASE, max_examples=1)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        batch = st.lists(valid_plans(facts(v)), min_size=FIXED_PLANS, max_size=FIXED_PLANS)
        plans = data.draw(batch, label="plans")
        assume(interesting(plans))  # the all-minimal first example splits nothing
        reports = run_and_compare(v, plans)
        assert not reports, "\n\n".join(reports)

    return run


@pytest.mark.parametrize("name", [_param(n, KNOWN) for n in FIXED])
def test_fixed_variant_trains_like_one_process(name: str) -> None:
    _fixed(name)()


@pytest.mark.parametrize("name", [_param(n, KNOWN_WARNINGS) for n in FIXED])
def test_no_item_8_op_gathers_under_tp(name: str) -> None:
    """The shard pass alone (no ranks) under the widest tp each unit allows, with and
    without sp: no ShardWarning for an op of issue 18's item 8."""
    v = FIXED[name]
    f = facts(v)
    found = set()
    for sp in (False, True):
        strategies = tuple(
            (
                u,
                LayerStrategy(
                    tp=max(f.tps[u]), dp=WORLD // max(f.tps[u]), sp=sp and max(f.tps[u]) > 1
                ),
            )
            for u in f.units
        )
        plan = Plan(WORLD, strategies, f.fingerprint)
        analysis = analysis_of(v).copy()
        analysis.context.target = RewriteTarget(plan, rank=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ShardWarning)
            run_passes(analysis.graph_module, analysis.context, [shard])
        found |= {g for g in _gathering_ops(caught) if ITEM_8_OPS.match(g)}
    assert not found, f"{v.name}: item-8 ops gather:\n  " + "\n  ".join(sorted(found))


variants = st.builds(Variant, **{f: st.sampled_from(c) for f, c in BLOCKS.items()}).filter(
    lambda v: not variant_problems(v)
)


@pytest.mark.skipif(not _FUZZ, reason="make fuzz (GFX_FUZZ_EXAMPLES=N) draws random variants")
@settings(_BASE, max_examples=_FUZZ or 1)
@given(data=st.data())
def test_random_variants_train_like_one_process(data: st.DataObject) -> None:
    v = data.draw(variants, label="variant")
    batch = st.lists(valid_plans(facts(v)), min_size=1, max_size=PLANS_PER_FORK)
    plans = data.draw(batch, label="plans")
    for plan in plans:
        note(f"{v.name}: {json.dumps(plan.to_json())}")
    reports = run_and_compare(v, plans)
    print(f"fuzz-arch: {v.name}: {len(plans)} plan(s), {len(reports)} failing")  # -s tallies
    assert not reports, f"{v}\n" + "\n\n".join(reports)

"""Exactness of the rewritten programs on real gloo ranks against the unmodified model.

For every strategy in the space at world sizes 1, 2 and 4 (recomputation cycled through the
list so every mode meets every layout), uniform and mixed per layer, on the reference GPT and
HuggingFace Llama and BERT: the loss and every gathered gradient after one step, and every
parameter after three AdamW steps, equal a single-process run within 1e-5 (relative, in the
2-norm of each tensor), on rank 0; and on every rank, every piece it holds and every whole
tensor it gathers equals, bit for bit, the same piece on the ranks that hold it too (the same
TP position in another dp group or pipeline stage): rank 0 alone can be exact while a
replica that missed a gradient sync is not (`test_a_desynchronised_replica_fails_...`). A
smoke subset runs at world size 8.

Each rank captures once and rewrites deep copies of the analysed graph for every plan, so
one fork serves a whole list of plans.

The reference run, the ranks' steps and the tolerances (and why they are what they are)
are in `tests/exactness.py`, shared with `tests/test_families.py`.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from conftest import SWIN, TINY_GPT, TINY_HF, build
from distributed import run_ranks
from exactness import (
    BATCH,
    RTOL,
    SEQ,
    STEPS,
    adamw,
    check,
    reference,
    replica_disagreements,
    run_steps_and_replicas,
)

from galvatron_fx import parallelize
from galvatron_fx.lowering import analyze
from galvatron_fx.meta import LAYER
from galvatron_fx.plan import DPMode, LayerStrategy, Plan, PlanError, Recompute
from galvatron_fx.runtime.program import get_attr
from galvatron_fx.unit_graph.shapes import layer_shapes
from galvatron_fx.unit_graph.units import model_fingerprint

SPECS = {
    "gpt": TINY_GPT,
    "llama": TINY_HF["llama"],
    "bert": TINY_HF["bert"] + ",hidden_dropout_prob=0.0,attention_probs_dropout_prob=0.0",
}


def strategy_space(world: int) -> list[LayerStrategy]:
    """Every (tp, sp, dp, dp mode, tp order) on `world` devices, recomputation cycled."""
    out = []
    for tp in (t for t in (1, 2, 4, 8) if world % t == 0):
        dp = world // tp
        modes = list(DPMode) if dp > 1 else [DPMode.ALLREDUCE]
        orders = (True, False) if tp > 1 and dp > 1 else (True,)
        for sp, mode, order in itertools.product(
            (False, True) if tp > 1 else (False,), modes, orders
        ):
            out.append(LayerStrategy(tp=tp, sp=sp, dp=dp, dp_mode=mode, tp_consecutive=order))
    if len(out) < len(Recompute):  # world 1: one layout, every recomputation mode
        return [dataclasses.replace(out[0], recompute=r) for r in Recompute]
    cycle = itertools.cycle(list(Recompute))
    return [dataclasses.replace(s, recompute=next(cycle)) for s in out]


def uniform(units: list[str], s: LayerStrategy) -> dict[str, LayerStrategy]:
    return dict.fromkeys(units, s)


def mixed_plans(units: list[str], world: int) -> list[dict[str, LayerStrategy]]:
    """Per-layer mixes: layers alternate between two strategies, segments a third."""
    layers = [u for u in units if "." in u]
    space = strategy_space(world)
    plans = []
    for k in range(min(3, len(space))):
        a, b, seg = space[k], space[-1 - k], space[len(space) // 2 - k]
        plan = uniform(units, seg)
        for i, unit in enumerate(layers):
            plan[unit] = a if i % 2 == 0 else b
        plans.append(plan)
    return plans


def vocab_plans(units: list[str], world: int) -> list[dict[str, LayerStrategy]]:
    """Segments vocab-parallel (embedding rows, head columns, cross-entropy split on the
    vocabulary) around TP layers, plain and with SP + ZeRO-3."""
    dp = world // 2
    plans = []
    for extra in ({}, {"sp": True, "dp_mode": DPMode.ZERO3 if dp > 1 else DPMode.ALLREDUCE}):
        layer = LayerStrategy(tp=2, dp=dp, **extra)
        seg = dataclasses.replace(layer, vocab_parallel=True)
        plans.append({u: layer if "." in u else seg for u in units})
    return plans


def _run_plans(rank: int, world: int, spec: str, plans: list[dict[str, LayerStrategy]]) -> list:
    """Per plan, rank 0's losses, gathered gradients and parameters; every rank's checksums
    of what it holds and gathered (`exactness.run_steps_and_replicas`)."""
    model, args, kwargs = build(spec, batch=BATCH, seq=SEQ)
    analysis = analyze(model, args, kwargs)
    results = []
    for strategies in plans:
        plan = analysis.plan(strategies, world_size=world)
        compiled = parallelize(analysis.copy(), plan=plan, optimizer=adamw)
        results.append(run_steps_and_replicas(compiled, args, kwargs, keep=rank == 0))
    return results


def check_all(ref: dict, per_rank: list[list[dict]], labels: list[str]) -> None:
    """Rank 0's results against one process (`exactness.check`), and every rank's pieces
    against their replicas on the other ranks, plan by plan."""
    for i, label in enumerate(labels):
        check(ref, per_rank[0][i], label)
        bad = replica_disagreements([r[i]["replicas"] for r in per_rank])
        assert not bad, f"{label}: replicas differ:\n" + "\n".join(bad[:8])


def _label(name: str, strategies: dict[str, LayerStrategy]) -> str:
    return f"{name}: " + ", ".join(f"{u}={s.short()}" for u, s in strategies.items())


def _valid(
    plans: list[dict[str, LayerStrategy]], world: int, fingerprint: str, shapes: dict
) -> list:
    """The plans this model accepts (tp must divide heads, kv heads and split widths)."""
    out = []
    for strategies in plans:
        try:
            Plan(world, tuple(strategies.items()), fingerprint).check_model(fingerprint, shapes)
        except PlanError:
            continue
        out.append(strategies)
    return out


def _model_facts(spec: str) -> tuple[list[str], str, dict]:
    model, args, kwargs = build(spec, batch=BATCH, seq=SEQ)
    gm = analyze(model, args, kwargs).graph_module
    units = list(dict.fromkeys(LAYER.get(n).name for n in gm.graph.nodes))
    return units, model_fingerprint(gm), layer_shapes(gm)


@pytest.fixture(scope="module", params=list(SPECS))
def family(request):
    spec = SPECS[request.param]
    return request.param, spec, _model_facts(spec), reference(spec)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_strategy_uniform_and_mixed(family, world):
    name, spec, (units, fingerprint, shapes), ref = family
    plans = [uniform(units, s) for s in strategy_space(world)]
    if world > 1:
        plans += mixed_plans(units, world) + vocab_plans(units, world)
    plans = _valid(plans, world, fingerprint, shapes)
    assert len(plans) >= 3
    results = run_ranks(_run_plans, world, spec, plans, timeout_s=600)
    check_all(ref, results, [_label(f"{name} world {world}", p) for p in plans])


def test_world_8_smoke():
    spec = SPECS["gpt"]
    units, fingerprint, shapes = _model_facts(spec)
    plans = [
        uniform(units, LayerStrategy(tp=2, sp=True, dp=4, dp_mode="zero3", recompute="full")),
        *mixed_plans(units, 8),
    ]
    plans = _valid(plans, 8, fingerprint, shapes)[:2]
    results = run_ranks(_run_plans, 8, spec, plans, timeout_s=600)
    check_all(reference(spec), results, [_label("gpt world 8", p) for p in plans])


def test_swin_stages_of_different_widths():
    """Swin (shifted windows: roll, pad, window partition views; stages of widths 32 and 64,
    each its own layer group, joined by patch merging, a segment) under data, ZeRO-3 with
    recomputation, tensor and Megatron sequence parallelism on 2 ranks. (Sequence
    parallelism once gave wrong gradients on the second stage: while patch merging was part
    of the first stage its column-parallel linear split the second stage's residual stream
    on channels, and moving a split between dims on the tp axis gathered with a backward
    that summed whole gradients as partial ones, x2; such a move is an all-to-all now.)"""
    units, fingerprint, shapes = _model_facts(SWIN)
    plans = [
        uniform(units, s)
        for s in (
            LayerStrategy(dp=2),
            LayerStrategy(dp=2, dp_mode="zero3", recompute="full"),
            LayerStrategy(tp=2, recompute="selective"),
            LayerStrategy(tp=2, sp=True),
        )
    ]
    plans = _valid(plans, 2, fingerprint, shapes)
    assert len(plans) == 4
    results = run_ranks(_run_plans, 2, SWIN, plans, timeout_s=600)
    labels = ["swin: " + next(iter(p.values())).short() for p in plans]
    check_all(reference(SWIN), results, labels)


def test_vocab_parallel_with_tied_embedding_and_head():
    spec = SPECS["gpt"] + ",tied=1"
    units, fingerprint, shapes = _model_facts(spec)
    plans = _valid(vocab_plans(units, 2), 2, fingerprint, shapes)
    results = run_ranks(_run_plans, 2, spec, plans, timeout_s=600)
    check_all(reference(spec), results, [_label("tied gpt, vocab-parallel", p) for p in plans])


OWN_GRADIENT, NUDGED = "blocks.0.mlp.fc.weight", "lm_head.weight"
"""The faults `_with_faults` injects: in the last step rank 2 steps `OWN_GRADIENT` with its
own (unsynchronised) gradient, as a dp rank that missed the all-reduce; after it, rank 3's
ZeRO-1 forward copy of `NUDGED` is one ulp off, as a refresh from the shards that missed it
(the gathered whole, read from the shards, stays right)."""


def _with_faults(rank: int, world: int) -> dict:
    model, args, kwargs = build(SPECS["gpt"], batch=BATCH, seq=SEQ)
    analysis = analyze(model, args, kwargs)
    zero1 = LayerStrategy(tp=2, dp=2, dp_mode="zero1")
    strategies = {
        u: LayerStrategy(tp=2, dp=2) if u == "blocks.0" else zero1 for u in analysis.units
    }
    compiled = parallelize(analysis, plan=analysis.plan(strategies, world_size=4), optimizer=adamw)
    train_step, calls = compiled.train_step, []

    def faulty_train_step(*a: object, **k: object) -> torch.Tensor:
        calls.append(1)
        last = len(calls) == STEPS
        if last and rank == 2:
            param, own = get_attr(compiled.module, OWN_GRADIENT), {}
            param.register_post_accumulate_grad_hook(lambda p: own.update(g=p.grad.clone()))
            step = compiled.sync.step

            def step_with_own_gradient() -> None:
                param.grad = own["g"]
                step()

            compiled.sync.step = step_with_own_gradient
        loss = train_step(*a, **k)
        if last and rank == 3:
            with torch.no_grad():
                w = get_attr(compiled.module, NUDGED).view(-1)
                w[0] = torch.nextafter(w[0], torch.tensor(float("inf")))
        return loss

    compiled.train_step = faulty_train_step
    return run_steps_and_replicas(compiled, args, kwargs, keep=rank == 0)


def test_a_desynchronised_replica_fails_naming_the_rank_and_the_tensor():
    """tp2 x dp2 (TP groups {0, 1} and {2, 3}): rank 0 alone still equals one process, so
    comparing only rank 0 passes; the replica check names rank 2's piece of the layer it
    stepped alone (and the whole tensor ranks 2 and 3 gather from it), and rank 3's ZeRO-1
    copy, which no gathered whole shows."""
    results = run_ranks(_with_faults, 4, timeout_s=600)
    check(reference(SPECS["gpt"]), results[0], "rank 0 of the faulty run")
    bad = replica_disagreements([r["replicas"] for r in results])
    found = {line.split(" is ")[0] for line in bad}
    assert found == {
        f"rank 2: value of {OWN_GRADIENT} (tp piece 0 of 2)",
        f"rank 2: whole value of {OWN_GRADIENT}",
        f"rank 3: whole value of {OWN_GRADIENT}",
        f"rank 3: value of {NUDGED} (replicated)",
    }, "\n".join(bad)


def _zero3_memory(rank: int, world: int, spec: str) -> dict[str, int]:
    from galvatron_fx.runtime import collectives as C

    model, args, kwargs = build(spec, batch=BATCH, seq=SEQ)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    analysis = analyze(model, args, kwargs)
    plan = analysis.plan(LayerStrategy(dp=world, dp_mode="zero3"), world_size=world)
    compiled = parallelize(analysis, plan=plan, optimizer=adamw)
    recipes: list[int] = []
    pack = C._pack

    def counting(t: torch.Tensor) -> object:
        handle = pack(t)
        if handle is not t:
            recipes.append(t.numel() * t.element_size())
        return handle

    C._pack = counting
    try:
        loss = compiled.forward_loss(*args, **kwargs)
    finally:
        C._pack = pack
    loss.backward()
    compiled.sync.finish()
    local = sum(p.numel() * p.element_size() for p in compiled.module.parameters())
    return {"total": total, "local": local, "recipes": len(recipes), "recipe_bytes": sum(recipes)}


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_zero3_keeps_one_dp_th_of_the_parameters(family):
    """Per-rank parameter bytes are total / dp (up to padding), and autograd keeps no
    gathered parameter after the forward: every saved view of one is a recipe to gather it
    again in backward."""
    world = 4
    for got in run_ranks(_zero3_memory, world, SPECS[family]):
        units = 6  # embedding, layers, head, loss: at most one padded flat shard each
        assert got["total"] / world <= got["local"] <= got["total"] / world + units * 4 * world
        assert got["recipes"] > 0 and got["recipe_bytes"] > 0


def _with_loss_fn(rank: int, world: int, strategy: LayerStrategy) -> list[float]:
    model, args, kwargs = build(SPECS["gpt"], batch=BATCH, seq=SEQ)
    idx, targets = args if len(args) == 2 else (args[0], kwargs["targets"])
    analysis = analyze(model, (idx,))  # the model returns logits: the loss is the user's
    plan = analysis.plan(strategy, world_size=world)

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

    compiled = parallelize(analysis, plan=plan, optimizer=adamw, loss_fn=loss_fn)
    return [compiled.train_step(idx, target=targets).item() for _ in range(STEPS)]


@pytest.mark.parametrize("strategy", [LayerStrategy(dp=2), LayerStrategy(tp=2, sp=True)], ids=str)
def test_user_loss_fn_on_the_model_outputs(strategy):
    ref = reference(SPECS["gpt"])
    for rank, losses in enumerate(run_ranks(_with_loss_fn, 2, strategy)):
        assert losses == pytest.approx(ref["losses"], rel=RTOL), f"rank {rank}"


def _padded_batch(rows: tuple[int, ...]):
    model, args, kwargs = build(TINY_GPT, batch=4, seq=16)
    kwargs["targets"][list(rows), :5] = -100
    return model, args, kwargs


def _padded_step(
    rank: int, world: int, strategy: LayerStrategy, pipeline: dict, rows: tuple[int, ...]
) -> float:
    import galvatron_fx as gfx
    from galvatron_fx.plan import PipelineConfig
    from galvatron_fx.runtime import collectives as C

    model, args, kwargs = _padded_batch(rows)
    analysis = analyze(model, args, kwargs)
    if isinstance(strategy, dict):  # per unit, "*" for the rest
        strategy = {u: strategy.get(u, strategy["*"]) for u in analysis.units}
    plan = analysis.plan(strategy, world_size=world, pipeline=PipelineConfig(**pipeline))
    compiled = gfx.compile(model, args, kwargs, plan=plan)
    calls = []
    C._all_reduce = lambda x, ref, f=C._all_reduce: calls.append(ref) or f(x, ref)  # type: ignore[misc]
    loss = float(compiled.train_step(*args, **kwargs))
    assert not calls, "the target count took a collective"
    return loss, compiled.full_grads()


PP2 = {"degree": 2, "stage_starts": ("blocks.1",), "micro_batches": 2}


@pytest.mark.parametrize(
    ("world", "strategy", "pipeline", "rows"),
    [
        # ignored targets in rank 0's half only
        (2, LayerStrategy(dp=2), {}, (0, 1)),
        (2, LayerStrategy(dp=2, dp_mode=DPMode.ZERO3), {}, (0, 1)),
        # in rank 0's piece of each micro-batch: equal counts across micro-batches
        (2, LayerStrategy(dp=2), {"micro_batches": 2}, (0, 2)),
        (4, LayerStrategy(dp=2), PP2, (0, 2)),
        # in the first micro-batch only: a mean of micro-batch means would be off
        (2, LayerStrategy(dp=2), {"micro_batches": 2}, (0, 1)),
        (2, LayerStrategy(dp=2, dp_mode=DPMode.ZERO3), {"micro_batches": 2}, (0,)),
        (4, LayerStrategy(dp=2), PP2, (0, 1)),
        (4, LayerStrategy(tp=2, sp=True), PP2, (0,)),
        # a loss replicated over dp: the head in tp (it took the whole batch), the loss dp
        (2, {"head": LayerStrategy(tp=2), "*": LayerStrategy(dp=2)}, {"micro_batches": 2}, (0,)),
        (4, {"head": LayerStrategy(tp=2), "*": LayerStrategy(dp=2)}, PP2, (0,)),
    ],
    ids=[
        "dp2", "zero3", "dp2-accumulate", "pp2xdp2", "dp2-accumulate-uneven",
        "zero3-accumulate-uneven", "pp2xdp2-uneven", "pp2xtp2-uneven",
        "replicated-loss-accumulate", "replicated-loss-pp2",
    ],
)  # fmt: skip
def test_an_uneven_target_count_is_read_off_the_whole_batch(world, strategy, pipeline, rows):
    """The mean loss over targets ignored unevenly across the dp ranks: each rank counts
    the whole (micro-)batch it was handed, no all-reduce in the forward, and the loss is the
    unsplit model's."""
    model, args, kwargs = _padded_batch(rows)
    loss = model(*args, **kwargs)
    loss.backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    for got, grads in run_ranks(_padded_step, world, strategy, pipeline, rows):
        assert got == pytest.approx(float(loss), rel=1e-5)
        for name, grad in want.items():
            err = (grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
            assert err < 1e-5, (name, float(err))


def ulysses_plans(units: list[str], world: int) -> list[dict[str, LayerStrategy]]:
    """Ulysses alone (degree 2 and 4, either rank order, with dp, ZeRO over all the stage's
    ranks and recomputation), and layers alternating Ulysses with Megatron TP and TP + SP on
    the same mesh."""
    layers = [u for u in units if "." in u]
    u2 = LayerStrategy(tp=2, ulysses=True, dp=world // 2)
    alone = [
        u2,
        dataclasses.replace(u2, tp_consecutive=False, dp_mode="zero2", recompute="selective"),
        dataclasses.replace(u2, dp_mode="zero3", recompute="full"),
        # dp = 1: ZeRO shards the whole weights over the Ulysses group itself
        LayerStrategy(tp=world, ulysses=True, dp_mode="zero3", recompute="selective"),
    ]
    plans = [{u: s if u in layers else LayerStrategy(dp=world) for u in units} for s in alone]
    for other in (LayerStrategy(tp=2, sp=True, dp=world // 2), LayerStrategy(tp=2, dp=world // 2)):
        seg = LayerStrategy(tp=2, dp=world // 2, vocab_parallel=True)
        plan = {u: seg for u in units}
        for i, u in enumerate(layers):
            plan[u] = u2 if i % 2 == 0 else dataclasses.replace(other, recompute="selective")
        plans.append(plan)
    return plans


def test_ulysses_alone_mixed_with_tp_and_recomputed(family):
    """Ulysses sequence parallelism: the sequence split across the group, an all-to-all to
    heads before attention and back after it, whole weights with gradients summed over the
    group and the batch (one data-parallel group of every rank, ZeRO included); on GPT, Llama
    (rotary, grouped-query heads) and BERT (a padding mask)."""
    name, spec, (units, fingerprint, shapes), ref = family
    plans = _valid(ulysses_plans(units, 4), 4, fingerprint, shapes)
    assert len(plans) >= 5  # Llama's 2 key/value heads refuse degree 4
    results = run_ranks(_run_plans, 4, spec, plans, timeout_s=600)
    check_all(ref, results, [_label(f"{name} ulysses", p) for p in plans])

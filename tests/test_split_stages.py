"""Split stages: the stage submodules, run in order in one process, are the model; on ranks,
pipeline plans train like it.

The reference is the unmodified model in one process (`tests/exactness.py`): the loss and
every gradient after one AdamW step, every parameter after three, within 1e-5.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TINY_GPT, build
from exactness import BATCH, SEQ, STEPS, adamw, check, reference, reference_of, run_steps

from galvatron_fx.lowering import analyze
from galvatron_fx.passes.split_stages import cut_stages, unit_stages
from galvatron_fx.plan import LayerStrategy, PipelineConfig, Plan, PlanError

SPEC = "gpt:layers=4,hidden=64,heads=4,vocab=128,seq=32"


def _plan(
    analysis, starts: tuple[str, ...], chunks: int = 1, schedule: str = "", micro_batches: int = 4
) -> Plan:
    n = (len(starts) + 1) // chunks
    strategies = tuple((u, LayerStrategy()) for u in analysis.units)
    fingerprint = analysis.plan(LayerStrategy(), world_size=1).model_fingerprint
    schedule = schedule or ("interleaved-1f1b" if chunks > 1 else "1f1b")
    pipeline = PipelineConfig(
        degree=n,
        stage_starts=starts,
        schedule=schedule,
        virtual_stages=chunks,
        micro_batches=micro_batches,
    )
    return Plan(n, strategies, fingerprint, pipeline)


def _cut(analysis, plan):
    return cut_stages(analysis.copy().graph_module, plan.units, plan.pipeline)


def _flat(args, kwargs):
    return [*args, *kwargs.values()]


def _canonical(model: torch.nn.Module) -> dict[str, str]:
    """Every name of a parameter of `model` -> the name `named_parameters` gives it (a tied
    weight has several)."""
    first: dict[int, str] = {}
    return {
        n: first.setdefault(id(p), n) for n, p in model.named_parameters(remove_duplicate=False)
    }


def _train_split(split, model: torch.nn.Module, args, kwargs) -> dict[str, Any]:
    """What `reference` returns, from the stage submodules run in order in this process,
    named as `model` names its parameters."""
    canonical = _canonical(model)
    held: dict[str, torch.nn.Parameter] = {}
    for k in range(len(split.stages)):
        for name, original in split.param_names[k].items():
            param = split.stage(k).get_parameter(name)
            assert held.setdefault(canonical[original], param) is param, f"{original}: 2 copies"
    opt = adamw(list({id(p): p for p in held.values()}.values()))
    losses, grads = [], {}
    for step in range(STEPS):
        opt.zero_grad()
        out = split.graph_module(*_flat(args, kwargs))
        loss = out if isinstance(out, torch.Tensor) else out[0]
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in held.items() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads, "params": {n: p.detach() for n, p in held.items()}}


@pytest.mark.parametrize("starts", [("blocks.2",), ("blocks.1", "blocks.3"), ("blocks.0", "head")])
def test_stages_in_order_train_like_the_model(starts):
    ref = reference(SPEC)
    model, args, kwargs = build(SPEC, batch=BATCH, seq=SEQ)
    analysis = analyze(model, args, kwargs)
    split = _cut(analysis, _plan(analysis, starts))
    assert len(split.stages) == len(starts) + 1
    covered = [o for names in split.param_names for o in names.values()]
    assert sorted(covered) == sorted(ref["params"])  # every parameter in exactly one stage
    check(ref, _train_split(split, model, args, kwargs), f"stages from {starts}")


def test_unit_stages_and_errors():
    assert unit_stages(["a", "b", "c", "d"], ["c"]) == {"a": 0, "b": 0, "c": 1, "d": 1}
    with pytest.raises(PlanError, match=r"\['x'\] are not units"):
        unit_stages(["a", "b"], ["x"])


def test_a_weight_tied_across_stages_is_held_by_both():
    """The embedding's stage and the head's hold the one tied Parameter (each pipeline rank
    then steps its own copy, their gradients summed: `runtime.pipeline.shared_params`); run
    in one process, its gradient is the sum of both uses, the model's."""
    tied = TINY_GPT + ",tied=1"
    ref = reference_of(lambda: build(tied, batch=BATCH, seq=SEQ))
    model, args, kwargs = build(tied, batch=BATCH, seq=SEQ)
    analysis = analyze(model, args, kwargs)
    split = _cut(analysis, _plan(analysis, ("blocks.1",)))
    first, last = ({id(p): p for p in split.stage(k).parameters()} for k in (0, 1))
    (shared,) = [p for i, p in first.items() if i in last]  # one object in both stages
    assert shared.shape == ref["params"]["wte.weight"].shape
    check(ref, _train_split(split, model, args, kwargs), "tied weight over two stages")


def _steps(rank: int, world: int, plan: Plan) -> dict[str, Any]:
    """Three AdamW steps of `plan`: what `reference` returns, gathered on this rank."""
    import galvatron_fx as gfx

    model, args, kwargs = build(SPEC, batch=BATCH, seq=SEQ)
    compiled = gfx.compile(model, args, kwargs, plan=plan, optimizer=adamw)
    return run_steps(compiled, args, kwargs)


def check_against_one_process(plan: Plan) -> None:
    """Every rank's losses, gathered gradients and parameters equal the unmodified model's
    in one process on the batch (`exactness.check`)."""
    from distributed import run_ranks

    ref = reference(SPEC)
    for rank, got in enumerate(run_ranks(_steps, plan.world_size, plan)):
        check(ref, got, f"rank {rank}")


@pytest.mark.parametrize(
    ("world", "schedule"),
    [(2, "gpipe"), (2, "1f1b"), (4, "1f1b"), (2, "interleaved-1f1b"), (2, "interleaved-zb")],
    ids=str,
)
def test_stages_on_ranks_match_one_process(world, schedule):
    """Each rank runs its stages through torch.distributed.pipelining (4 micro-batches): the
    mean micro-batch loss, every gradient and the parameters after three steps equal the
    unmodified model's on the whole batch."""
    model, args, kwargs = build(SPEC, batch=BATCH, seq=SEQ)
    analysis = analyze(model, args, kwargs)
    chunks = 2 if schedule.startswith("interleaved") else 1
    n = world * chunks
    starts = ("blocks.2",) if n == 2 else ("blocks.1", "blocks.2", "blocks.3")[: n - 1]
    check_against_one_process(_plan(analysis, starts, chunks, schedule, 4))


@pytest.mark.parametrize(
    ("world", "chunks", "starts"),
    [
        (3, 1, ("blocks.1", "blocks.3")),
        (2, 3, ("blocks.0", "blocks.1", "blocks.2", "blocks.3", "head")),
    ],
    ids=["pp3", "pp2xv3"],
)
def test_three_stages_or_three_chunks_match_one_process(world, chunks, starts):
    """Degrees that are not powers of two run: 3 stages on 3 ranks (1F1B), and 3 chunks
    per rank on 2 (interleaved: 2 x 3 = 6 stages, one unit each of the embedding, the four
    blocks and the head), 4 micro-batches of the batch of 8. Each trains like the
    unmodified model in one process."""
    model, args, kwargs = build(SPEC, batch=BATCH, seq=SEQ)
    analysis = analyze(model, args, kwargs)
    assert len(starts) + 1 == world * chunks
    plan = _plan(analysis, starts, chunks, "", micro_batches=4)
    assert (plan.world_size, plan.pipeline.degree, plan.pipeline.virtual_stages) == (
        world,
        world,
        chunks,
    )
    check_against_one_process(plan)


def _compiled_pipeline(rank: int, world: int, schedule: str) -> dict[str, Any]:
    import galvatron_fx as gfx

    model, args, kwargs = build(SPEC, batch=BATCH, seq=SEQ)
    analysis = analyze(model, args, kwargs)
    chunks = 2 if schedule.startswith("interleaved") else 1
    n = world * chunks
    starts = ("blocks.2",) if n == 2 else ("blocks.1", "blocks.2", "blocks.3")[: n - 1]
    plan = _plan(analysis, starts, chunks)
    compiled = gfx.compile(model, args, kwargs, plan=plan, optimizer=adamw)
    got = run_steps(compiled, args, kwargs)
    module, _, held, _ = compiled.state_parts()
    real = {n for n, q in module.named_parameters() if q.device.type != "meta"}
    return {**got, "real": real, "held": set(held)}


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b"])
def test_compile_trains_a_pipeline_plan_like_one_process(schedule):
    """compile(plan=...) with pipeline stages: three AdamW steps on 2 ranks give every rank
    the losses, gradients and parameters of the unmodified model in one process."""
    from distributed import run_ranks

    ref = reference(SPEC)
    results = run_ranks(_compiled_pipeline, 2, schedule)
    for rank, got in enumerate(results):
        check(ref, got, f"{schedule}, rank {rank}")
    # each rank keeps only its own stages' weights (the others' are meta tensors)
    assert results[0]["real"] == results[0]["held"] and results[1]["real"] == results[1]["held"]
    assert not results[0]["held"] & results[1]["held"]
    assert results[0]["held"] | results[1]["held"] == set(ref["params"])


def test_a_pipeline_plan_for_another_model_is_refused():
    import galvatron_fx as gfx

    model, args, kwargs = build(SPEC, batch=8, seq=16)
    plan = _plan(analyze(model, args, kwargs), ("blocks.2",))
    wider, args, kwargs = build(SPEC.replace("hidden=64", "hidden=128"), batch=8, seq=16)
    with pytest.raises(PlanError, match=r"was made for model \w+, this model is \w+"):
        gfx.compile(wider, args, kwargs, plan=plan)


@pytest.mark.parametrize("strategy", [LayerStrategy(dp=2), LayerStrategy(tp=2, sp=True)], ids=str)
def test_micro_batches_without_stages_accumulate_gradients(strategy):
    """A plan with 4 micro-batches and one stage (what the search picks when activations
    do not fit): captured at the micro-batch size, gradients summed over the pieces."""
    model, args, kwargs = build(SPEC, batch=8, seq=16)
    analysis = analyze(model, args, kwargs)
    plan = analysis.plan(strategy, world_size=2, pipeline=PipelineConfig(micro_batches=4))
    check_against_one_process(plan)

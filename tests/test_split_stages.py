"""Split stages: the stage submodules, run in order in one process, are the model."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_GPT, build

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


@pytest.mark.parametrize("starts", [("blocks.2",), ("blocks.1", "blocks.3"), ("blocks.0", "head")])
def test_stages_in_order_give_the_loss_and_gradients_of_the_model(starts):
    model, args, kwargs = build(SPEC, batch=4, seq=16)
    analysis = analyze(model, args, kwargs)
    want = analysis.graph_module(*args, **kwargs)
    loss = want if isinstance(want, torch.Tensor) else want[0]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in analysis.graph_module.named_parameters()}
    analysis.graph_module.zero_grad(set_to_none=True)

    split = _cut(analysis, _plan(analysis, starts))
    assert len(split.stages) == len(starts) + 1
    got = split.graph_module(*_flat(args, kwargs))
    got_loss = got if isinstance(got, torch.Tensor) else got[0]
    assert got_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    got_loss.backward()
    for k in range(len(split.stages)):
        for name, original in split.param_names[k].items():
            g = split.stage(k).get_parameter(name).grad
            assert torch.allclose(g, grads[original], rtol=1e-5, atol=1e-8), original
    covered = [o for names in split.param_names for o in names.values()]
    assert sorted(covered) == sorted(grads)  # every parameter in exactly one stage


def test_unit_stages_and_errors():
    assert unit_stages(["a", "b", "c", "d"], ["c"]) == {"a": 0, "b": 0, "c": 1, "d": 1}
    with pytest.raises(PlanError, match=r"\['x'\] are not units"):
        unit_stages(["a", "b"], ["x"])


def test_a_weight_tied_across_stages_is_held_by_both():
    """The embedding's stage and the head's hold the one tied Parameter (each pipeline rank
    then steps its own copy, their gradients summed: `runtime.pipeline.shared_params`); run
    in one process, its gradient is the sum of both uses, the model's."""
    model, args, kwargs = build(TINY_GPT + ",tied=1", batch=2, seq=16)
    analysis = analyze(model, args, kwargs)
    out = analysis.graph_module(*args, **kwargs)
    (out if isinstance(out, torch.Tensor) else out[0]).backward()
    want = next(p.grad.clone() for n, p in analysis.graph_module.named_parameters() if "wte" in n)
    analysis.graph_module.zero_grad(set_to_none=True)

    split = _cut(analysis, _plan(analysis, ("blocks.1",)))
    first, last = ({id(p): p for p in split.stage(k).parameters()} for k in (0, 1))
    (tied,) = [p for i, p in first.items() if i in last]  # one object in both stages
    assert tied.shape == want.shape
    got = split.graph_module(*_flat(args, kwargs))
    (got if isinstance(got, torch.Tensor) else got[0]).backward()
    assert torch.allclose(tied.grad, want, rtol=1e-6, atol=1e-9)


def _one_step(rank: int, world: int, plan: Plan) -> dict:
    """One step of `plan` with a frozen optimizer: the loss and the whole gradients."""
    import galvatron_fx as gfx

    model, args, kwargs = build(SPEC, batch=8, seq=16)
    frozen = lambda params: torch.optim.SGD(params, lr=0.0)  # noqa: E731  (gradients only)
    compiled = gfx.compile(model, args, kwargs, plan=plan, optimizer=frozen)
    loss = compiled.train_step(*args, **kwargs).item()
    return {"loss": loss, "grads": compiled.full_grads()}


def check_against_one_process(plan: Plan) -> None:
    """Every rank's loss and the gathered gradients equal the unsplit model's on the batch."""
    from distributed import run_ranks

    model, args, kwargs = build(SPEC, batch=8, seq=16)
    analysis = analyze(model, args, kwargs)
    out = analysis.graph_module(*args, **kwargs)
    loss = out if isinstance(out, torch.Tensor) else out[0]
    loss.backward()
    want = {n: p.grad for n, p in analysis.graph_module.named_parameters()}
    results = run_ranks(_one_step, plan.world_size, plan)
    for r in results:
        assert r["loss"] == pytest.approx(loss.item(), rel=1e-5)
    got = results[0]["grads"]
    assert sorted(got) == sorted(want)
    for name, g in got.items():
        assert torch.allclose(g, want[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize(
    ("world", "schedule"),
    [(2, "gpipe"), (2, "1f1b"), (4, "1f1b"), (2, "interleaved-1f1b"), (2, "interleaved-zb")],
    ids=str,
)
def test_stages_on_ranks_match_one_process(world, schedule):
    """Each rank runs its stages through torch.distributed.pipelining (4 micro-batches): the
    mean micro-batch loss and every gradient equal the unsplit model's on the whole batch."""
    model, args, kwargs = build(SPEC, batch=8, seq=16)
    analysis = analyze(model, args, kwargs)
    chunks = 2 if schedule.startswith("interleaved") else 1
    n = world * chunks
    starts = ("blocks.2",) if n == 2 else ("blocks.1", "blocks.2", "blocks.3")[: n - 1]
    check_against_one_process(_plan(analysis, starts, chunks, schedule, 4))


def _compiled_pipeline(rank: int, world: int, schedule: str) -> dict:
    import galvatron_fx as gfx

    model, args, kwargs = build(SPEC, batch=8, seq=16)
    analysis = analyze(model, args, kwargs)
    chunks = 2 if schedule.startswith("interleaved") else 1
    n = world * chunks
    starts = ("blocks.2",) if n == 2 else ("blocks.1", "blocks.2", "blocks.3")[: n - 1]
    plan = _plan(analysis, starts, chunks)
    compiled = gfx.compile(model, args, kwargs, plan=plan, optimizer=_adamw)
    losses = [compiled.train_step(*args, **kwargs).item() for _ in range(3)]
    module, _, held, _ = compiled.state_parts()
    real = {n for n, q in module.named_parameters() if q.device.type != "meta"}
    return {"losses": losses, "params": compiled.full_params(), "real": real, "held": set(held)}


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, eps=1e-5)


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b"])
def test_compile_trains_a_pipeline_plan_like_one_process(schedule):
    """compile(plan=...) with pipeline stages: three AdamW steps on 2 ranks give the loss
    sequence and the parameters of one process."""
    from distributed import run_ranks

    import galvatron_fx as gfx

    model, args, kwargs = build(SPEC, batch=8, seq=16)
    single = gfx.compile(model, args, kwargs, optimizer=_adamw)
    want = [single.train_step(*args, **kwargs).item() for _ in range(3)]
    results = run_ranks(_compiled_pipeline, 2, schedule)
    for r in results:
        assert r["losses"] == pytest.approx(want, rel=1e-5)
    params = single.full_params()
    assert sorted(results[0]["params"]) == sorted(params)
    # each rank keeps only its own stages' weights (the others' are meta tensors)
    assert results[0]["real"] == results[0]["held"] and results[1]["real"] == results[1]["held"]
    assert not results[0]["held"] & results[1]["held"]
    assert results[0]["held"] | results[1]["held"] == set(params)
    for name, got in results[0]["params"].items():
        assert torch.allclose(got, params[name], rtol=1e-5, atol=1e-7), name


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

"""A weight tied across pipeline stages (the tiny GPT's embedding and head), as Megatron
runs it: the first and the last stage each hold the weight, its gradient is summed over the
pipeline ranks holding it before the optimizer steps, so both copies stay equal. On 4 gloo
ranks, against the unmodified model in one process: the loss, every gradient (the tied
one's is the sum of both uses) and the parameters after AdamW steps (`exactness.check`);
a checkpoint saved under such a plan resumes under another; the search cuts tied models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TINY_GPT, build
from distributed import run_ranks
from exactness import BATCH, SEQ, adamw, check, reference, run_steps

import galvatron_fx as gfx
from galvatron_fx.lowering import analyze
from galvatron_fx.plan import LayerStrategy, PipelineConfig, Plan
from galvatron_fx.plan_checks import check_plan
from galvatron_fx.runtime.program import get_attr

TIED = TINY_GPT + ",tied=1"
TIED4 = "gpt:layers=4,hidden=64,heads=4,vocab=128,seq=32,tied=1"
SEGMENTS = ("embedding", "head")

STRATEGIES = {
    "dp2": lambda unit: LayerStrategy(dp=2),
    "tp2+vocab": lambda unit: LayerStrategy(tp=2, vocab_parallel=unit in SEGMENTS),
    "tp2": lambda unit: LayerStrategy(tp=2),
    "zero2": lambda unit: LayerStrategy(dp=2, dp_mode="zero2"),
    "zero1,zero3": lambda unit: LayerStrategy(
        dp=2, dp_mode="zero3" if unit not in SEGMENTS else "zero1"
    ),
    "zero3": lambda unit: LayerStrategy(dp=2, dp_mode="zero3"),
}
"""Inside each of the 2 stages of 2 ranks. The embedding and head store the weight alike."""

PIPELINES = {
    # stage 0: embedding, blocks.0; stage 1: blocks.1, head, loss
    "1f1b": (TIED, PipelineConfig(degree=2, stage_starts=("blocks.1",), micro_batches=2)),
    # four stages, pipeline rank 0 runs the embedding's stage and the head's: one rank
    # holds the weight for two backward passes a micro-batch, nothing to sum across ranks
    "interleaved, one holder": (
        TIED4,
        PipelineConfig(
            degree=2,
            stage_starts=("blocks.0", "blocks.1", "loss"),
            micro_batches=2,
            schedule="interleaved-1f1b",
            virtual_stages=2,
        ),
    ),
}


def _plan(spec: str, kind: str, pipeline: str) -> Plan:
    model, args, kwargs = build(spec, batch=BATCH, seq=SEQ)
    analysis = analyze(model, args, kwargs)
    fingerprint = analysis.plan(LayerStrategy(), world_size=1).model_fingerprint
    strategies = tuple((u, STRATEGIES[kind](u)) for u in analysis.units)
    return Plan(4, strategies, fingerprint, PIPELINES[pipeline][1])


def _train(rank: int, world: int, spec: str, plan: Plan) -> dict[str, Any]:
    model, args, kwargs = build(spec, batch=BATCH, seq=SEQ)
    compiled = gfx.compile(model, args, kwargs, plan=plan, optimizer=adamw)
    return run_steps(compiled, args, kwargs)


@pytest.mark.parametrize(
    ("kind", "pipeline"),
    [*((k, "1f1b") for k in STRATEGIES), ("dp2", "interleaved, one holder")],
    ids=str,
)
def test_a_tied_weight_across_stages_matches_one_process(kind, pipeline):
    spec = PIPELINES[pipeline][0]
    plan = _plan(spec, kind, pipeline)
    ref = reference(spec)
    got = run_ranks(_train, 4, spec, plan, timeout_s=600)[0]
    check(ref, got, f"tied, {pipeline}, {kind}:\n{plan.table()}")


def test_the_two_copies_stay_identical():
    """Each holder steps its own copy: after the steps both are bit-identical."""
    plan = _plan(TIED, "zero2", "1f1b")
    copies = run_ranks(_copy_of_tied, 4, plan, timeout_s=600)
    assert all(torch.equal(copies[0], c) for c in copies[1:])


def _copy_of_tied(rank: int, world: int, plan: Plan) -> torch.Tensor:
    model, args, kwargs = build(TIED, batch=BATCH, seq=SEQ)
    compiled = gfx.compile(model, args, kwargs, plan=plan, optimizer=adamw)
    for _ in range(3):
        compiled.train_step(*args, **kwargs)
    module, _, specs, _ = compiled.state_parts()
    (name,) = [n for n, s in specs.items() if "wte" in n and s.alias_of is None]
    return get_attr(module, name).detach().clone()


SAVE_AT, STEPS = 2, 4


def _resume(rank: int, world: int, plan: Plan, root: str, resume: bool) -> dict[str, Any]:
    model, args, kwargs = build(TIED, batch=BATCH, seq=SEQ)
    compiled = gfx.compile(model, args, kwargs, plan=plan, optimizer=adamw)
    start = compiled.load_checkpoint(root)["step"] if resume else 0
    losses = []
    for step in range(start, STEPS):
        losses.append(compiled.train_step(*args, **kwargs).item())
        if step + 1 == SAVE_AT and not resume:
            compiled.save_checkpoint(root, step + 1)
    return {"losses": losses, "params": compiled.full_params()}


def test_a_checkpoint_under_a_tied_pipeline_resumes_under_another_plan(tmp_path):
    """Saved under 2 stages x tp2 (the weight in both), resumed under plain DP over 4
    ranks and under the same pipeline: the loss sequence goes on as uninterrupted."""
    from galvatron_fx.runtime import checkpoint

    pipelined = _plan(TIED, "tp2+vocab", "1f1b")
    whole = run_ranks(_resume, 4, pipelined, str(tmp_path), False, timeout_s=600)[0]
    flat = _flat_plan(pipelined, LayerStrategy(dp=4))
    for plan in (flat, pipelined):
        again = run_ranks(_resume, 4, plan, str(tmp_path), True, timeout_s=600)[0]
        assert again["losses"] == pytest.approx(whole["losses"][SAVE_AT:], rel=1e-6)
    exported = torch.load(checkpoint.export_state_dict(tmp_path), weights_only=True)
    model, _, _ = build(TIED, batch=BATCH, seq=SEQ)
    model.load_state_dict(exported, strict=True)  # one tensor, under both original names


def _flat_plan(plan: Plan, s: LayerStrategy) -> Plan:
    """`plan`'s model and world with one strategy everywhere and no stages."""
    return Plan(plan.world_size, tuple((u, s) for u in plan.units), plan.model_fingerprint)


def test_the_search_cuts_a_tied_model_into_stages():
    """Two nodes of 8 A100s: the search pipelines the tied GPT (as the untied one) and the
    plan separates the embedding and the head, storing the weight alike in both."""
    spec = "gpt:layers=4,hidden=128,heads=4,vocab=256,seq=64,tied=1"
    model, args, kwargs = build(spec, device="meta", batch=8, seq=32)
    analysis = analyze(model, args, kwargs)
    result = gfx.search(
        analysis, cluster="a100-80gb-sxm:nodes=2", memory_budget_gb=0.02, global_batch=8,
        precision="fp32",
    )  # fmt: skip
    plan = result.plan
    assert plan.pipeline.degree > 1, plan.table()
    assert plan.pipeline.stage_starts, plan.table()
    check_plan(plan, analysis.graph_module, 16, micro_batches=True)
    assert max(result.predicted["peak_memory_bytes"]) <= 0.02 * 2**30


T5 = "hf:t5:d_model=64,d_kv=16,d_ff=128,num_layers=2,num_heads=4,vocab_size=128,dropout_rate=0.0"


def _t5_vocab_split(rank: int, world: int) -> dict[str, Any]:
    model, args, kwargs = build(T5, batch=BATCH, seq=SEQ)
    analysis = analyze(model, args, kwargs)
    plan = analysis.plan(LayerStrategy(tp=4, vocab_parallel=True), world_size=4)
    compiled = gfx.compile(model, args, kwargs, plan=plan, optimizer=adamw)
    return run_steps(compiled, args, kwargs)


def test_a_tied_table_split_by_rows_is_looked_up_again_split():
    """T5 reads its tied embedding three times: the encoder's lookup, the decoder's (in the
    glue segment between the stacks) and the head. With the vocabulary split over tp 4 the
    first lookup splits the table by rows; the decoder's lookup must read it as split
    (masked, a partial sum) rather than as the whole table it no longer is (it indexed
    out of range)."""
    ref = reference(T5)
    results = run_ranks(_t5_vocab_split, 4)
    for rank, got in enumerate(results):
        check(ref, got, f"rank {rank}, t5 tp4+vocab")

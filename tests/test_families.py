"""The papers' model families end to end: HuggingFace BERT, T5, ViT and Swin.

- `compile(model, inputs, cluster=..., memory_budget_gb=...)` searches a plan on rank 0 of 4
  forked gloo ranks and runs it; the loss and every gathered gradient after one step, and
  every parameter after a few AdamW steps, match the unmodified model in one process
  (`tests/exactness.py`). Each budget sits below what plain data parallelism needs on that
  family, so the search picks ZeRO, recomputation or tensor parallelism for some units; T5's
  encoder and decoder and Swin's stages are layer groups of their own, joined by a glue
  segment (T5's final encoder norm and decoder inputs, Swin's patch merging), each unit with
  its own strategy. T5's embedding, glue and head share the embedding: the searched plan
  must give them one layout, or compile refuses it.
- `galvatron-fx plan` on the families' full-size default configs, built on the meta device,
  for the 8 A100s of one node.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import LAYER_GROUPS, SWIN, TINY_HF, build
from distributed import run_ranks
from exactness import BATCH, SEQ, adamw, check, reference, run_steps

import galvatron_fx as gfx
from galvatron_fx.cli import main
from galvatron_fx.plan import LayerStrategy, Plan

NO_DROPOUT = ",hidden_dropout_prob=0.0,attention_probs_dropout_prob=0.0"
FAMILIES = {
    "bert": (TINY_HF["bert"] + NO_DROPOUT, 0.0015),
    "t5": (TINY_HF["t5"] + ",dropout_rate=0.0", 0.0015),
    "vit": (TINY_HF["vit"] + NO_DROPOUT, 0.001),
    "swin": (SWIN, 0.0015),
}
"""Family -> (tiny spec with dropout off, memory budget in GB per device). Plain data
parallelism needs about 2.4, 3.6, 1.6 and 3.0 MiB per device on these (the search's memory
model, batch 8 on 4 A100s); the budgets are below that."""
WORLD = 4
CLUSTER = "a100-80gb-sxm"
PLAIN_DP = LayerStrategy(dp=WORLD)


def _searched(rank: int, world: int, spec: str, budget_gb: float) -> dict[str, Any]:
    model, args, kwargs = build(spec, batch=BATCH, seq=SEQ)
    compiled = gfx.compile(
        model, args, kwargs, cluster=CLUSTER, memory_budget_gb=budget_gb, optimizer=adamw
    )
    return {"plan": compiled.plan, **run_steps(compiled, args, kwargs)}


def _units_of_groups(groups: list[tuple[str, int]]) -> list[str]:
    """embedding, each group's blocks with a glue segment between two groups, head, loss."""
    units = ["embedding"]
    for i, (group, blocks) in enumerate(groups):
        units += ([f"glue_{i - 1}"] if i else []) + [f"{group}.{b}" for b in range(blocks)]
    return [*units, "head", "loss"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_searched_plan_matches_one_process(family):
    spec, budget_gb = FAMILIES[family]
    ref = reference(spec)  # first: the forked ranks inherit the imported model code
    results = run_ranks(_searched, WORLD, spec, budget_gb, timeout_s=600)
    plan = results[0]["plan"]
    assert all(r["plan"] == plan for r in results)
    assert list(plan.units) == _units_of_groups([(g, 2) for g in LAYER_GROUPS[family]])
    assert plan.pipeline.degree > 1 or any(s != PLAIN_DP for _, s in plan.strategies), (
        f"{family}: the budget should rule out plain data parallelism:\n{plan.table()}"
    )
    check(ref, results[0], f"{family} searched:\n{plan.table()}")


FULL_SIZE = {
    "bert": [("bert.encoder.layer", 12)],
    "t5": [("encoder.block", 6), ("decoder.block", 6)],
    "vit": [("vit.layers", 12)],
    "swin": [(f"swin.encoder.layers.{i}.blocks", d) for i, d in enumerate([2, 2, 6, 2])],
}
"""The layer groups of each family's default config (BERT-base, t5-small, ViT-B/16,
Swin-T)."""


@pytest.mark.parametrize("family", list(FULL_SIZE))
def test_plan_on_full_size_shapes(family, tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", f"hf:{family}", "--cluster", CLUSTER, "--memory-gb", "40", "-q"]
    # the baselines price six more plans (about 2 s a family): once, on Swin's four groups
    argv += [] if family == "swin" else ["--no-baselines"]
    assert main([*argv, "--global-batch", "64", "--json", str(out)]) == 0
    assert "predicted step time" in capsys.readouterr().out
    result = json.loads(out.read_text())
    plan = Plan.load(out)
    assert list(plan.units) == _units_of_groups(FULL_SIZE[family])
    assert plan.world_size == 8 and plan.model_fingerprint == result["plan"]["model_fingerprint"]
    assert max(result["predicted"]["peak_memory_bytes"]) <= 40 * 2**30
    assert family != "swin" or result["baselines"]["dp"] is not None

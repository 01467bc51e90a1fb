"""Plan quality: the searched plan's predicted throughput against every baseline.

GPT shapes of 1.3B, 7B, 13B and 70B parameters and a BERT-Huge-32 shape, on 8 and 64
A100-80GB (NVLink nodes of 8, InfiniBand across) and on 8 RTX TITAN (PCIe), at 16, 24, 40 and
80 GB per device (budgets above a device's memory are skipped). Every number is a prediction
of the same cost model (`search/option_cost.py`); the baselines are in `search/baselines.py`.
Each row: the plan's samples/s, each baseline's as a ratio plan / baseline ("-": does not
fit; "= plan": the baseline's plan is the searched plan, which is not a comparison), and the
plan against the best baseline whose plan differs ("n/a" where none fits).

A second table is about Ulysses sequence parallelism: a 7B GPT at 2K, 8K and 32K tokens on
8 and 64 A100s with small global batches (long-context training: 1 sample for 8 devices), searched with and without
Ulysses among the candidates; the `ulysses` column is the searched plan against the search
without it (what Ulysses adds), beside Megatron-style TP + SP and the Ulysses baseline.

    python bench/plan_quality.py            # the full tables (a few minutes)
    python bench/plan_quality.py --smoke    # one tiny row, for the test suite

`bench/suite.py` (`make bench`) puts the table in bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from galvatron_fx.compile import search
from galvatron_fx.cost_models.hardware import load_cluster
from galvatron_fx.lowering import Analysis, analyze
from galvatron_fx.models.spec import parse_model_spec
from galvatron_fx.plan import Plan, PlanError

MODELS = {
    "gpt-1.3b": "gpt:layers=24,hidden=2048,heads=16,vocab=50257,seq=2048",
    "gpt-7b": "gpt:layers=32,hidden=4096,heads=32,vocab=32000,seq=2048",
    "gpt-13b": "gpt:layers=40,hidden=5120,heads=40,vocab=32000,seq=2048",
    "gpt-70b": "gpt:layers=80,hidden=8192,heads=64,vocab=32000,seq=2048",
    "bert-huge-32": "hf:bert:hidden_size=1280,num_hidden_layers=32,num_attention_heads=16,"
    "intermediate_size=5120,max_position_embeddings=512",
}
SEQ = {"bert-huge-32": 512}
CLUSTERS = {
    "8 x A100": ("a100-80gb-sxm", 8, 64),
    "64 x A100": ("a100-80gb-sxm:nodes=8", 64, 512),
    "8 x RTX TITAN": ("rtx-titan-24gb-pcie", 8, 64),
}
BUDGETS_GB = (16, 24, 40, 80)
BASELINES = (
    "dp", "zero3", "zero3+full-recompute", "tp-in-node", "megatron-3d", "ulysses", "uniform"
)  # fmt: skip
LONG_MODEL = "gpt:layers=32,hidden=4096,heads=32,vocab=32000,seq={seq}"
LONG_SEQS = (2048, 8192, 32768)
LONG_CLUSTERS = {
    "8 x A100, batch 1": ("a100-80gb-sxm", 8, 1),
    "8 x A100, batch 8": ("a100-80gb-sxm", 8, 8),
    "64 x A100, batch 32": ("a100-80gb-sxm:nodes=8", 64, 32),
}
LONG_BUDGETS_GB = (40, 80)


def capture(spec_text: str, batch: int, seq: int | None) -> Analysis:
    spec = parse_model_spec(spec_text)
    model = spec.build("meta")
    args, kwargs = spec.example_inputs(model, batch, seq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyze(model, args, kwargs)


def row(analysis: Analysis, cluster: str, world: int, batch: int, budget: float) -> dict[str, Any]:
    try:
        result = search(
            analysis, cluster=cluster, memory_budget_gb=budget, global_batch=batch, world_size=world
        )
    except PlanError:
        return {"plan": None, "baselines": dict.fromkeys(BASELINES)}
    p = result.plan.pipeline
    shape = f"pp{p.degree}" + (f"x{p.virtual_stages}" if p.virtual_stages > 1 else "")
    kinds = sorted({s.short() for _, s in result.plan.strategies})
    return {
        "plan": result.samples_per_s,
        "baselines": result.baselines,
        "same": same_plan(result.plan, result.baseline_plans),
        "shape": f"{shape} m{p.micro_batches} {p.schedule.value}, {len(kinds)} strategies",
        "search_time_s": result.search_time_s,
    }


def same_plan(plan: Plan, baselines: dict[str, Plan | None]) -> list[str]:
    """The baselines whose plan is `plan` itself (same JSON): no comparison, the search
    found nothing they did not."""
    key = json.dumps(plan.to_json(), sort_keys=True)
    return [n for n, p in baselines.items() if p and json.dumps(p.to_json(), sort_keys=True) == key]


def vs_best_other(r: dict[str, Any]) -> float | None:
    """The plan's samples/s over the best baseline's whose plan differs (None: none fits)."""
    others = [v for n, v in r["baselines"].items() if v and n not in r.get("same", ())]
    return r["plan"] / max(others) if r["plan"] and others else None


def _ratio_cell(r: dict[str, Any], name: str) -> str:
    v = r["baselines"].get(name)
    if name in r.get("same", ()):
        return "= plan"
    return f"{r['plan'] / v:.2f}x" if v else "-"


def table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "cluster", "GB", "plan samples/s", *BASELINES, "vs best other", "plan"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["cluster"], str(r["budget_gb"])]
        if r["plan"] is None:
            cells += ["does not fit", *["-"] * len(BASELINES), "-", "-"]
        else:
            best = vs_best_other(r)
            cells += [
                f"{r['plan']:.1f}",
                *(_ratio_cell(r, b) for b in BASELINES),
                "n/a" if best is None else f"{best:.3f}x",
                r["shape"],
            ]
        lines.append("| " + " | ".join(cells) + " |")
    fitted = [r for r in rows if r["plan"] is not None]
    new = [r for r in fitted if not r.get("same")]
    none = [r for r in fitted if vs_best_other(r) is None]
    lines += [
        "",
        f"The search found a plan no baseline has in {len(new)} of {len(fitted)} rows; in the "
        f"other {len(fitted) - len(new)} its plan is a baseline's (`= plan`). No baseline with "
        f"another plan fits in {len(none)} rows (n/a).",
    ]
    return "\n".join(lines)


def long_row(analysis: Analysis, cluster: str, world: int, batch: int, budget: float) -> dict:
    """The search with Ulysses, without it, and the two sequence-parallel baselines."""
    got: dict[str, Any] = {}
    for key, ulysses in (("plan", True), ("no_ulysses", False)):
        try:
            result = search(
                analysis, cluster=cluster, memory_budget_gb=budget, global_batch=batch,
                world_size=world, ulysses=ulysses, baselines=ulysses,
            )  # fmt: skip
        except PlanError:
            got[key] = None
            continue
        got[key] = result.samples_per_s
        if ulysses:
            got["baselines"] = result.baselines
            got["same"] = same_plan(result.plan, result.baseline_plans)
            layers = [s for u, s in result.plan.strategies if u in _layer_names(analysis)]
            got["uses_ulysses"] = any(s.ulysses for s in layers)
            got["kinds"] = [f"{n} x {k}" for k, n in Counter(s.short() for s in layers).items()]
    return got


def _layer_names(analysis: Analysis) -> set[str]:
    return {u.name for u in analysis.layers if u.kind == "layer"}


def long_table(rows: list[dict[str, Any]]) -> str:
    head = ["seq", "cluster", "GB", "plan samples/s", "ulysses (plan / no-Ulysses search)"]
    head += ["megatron-3d", "ulysses baseline", "plan uses"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["seq"]), r["cluster"], str(r["budget_gb"])]
        if r["plan"] is None:
            lines.append("| " + " | ".join([*cells, "does not fit", "-", "-", "-", "-"]) + " |")
            continue
        gain = f"{r['plan'] / r['no_ulysses']:.3f}x" if r["no_ulysses"] else "only with Ulysses"
        ratios = [_ratio_cell(r, b) for b in ("megatron-3d", "ulysses")]
        uses = ", ".join(r["kinds"]) if r["uses_ulysses"] else "no Ulysses"
        cells += [f"{r['plan']:.2f}", gain, *ratios, uses or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_long(
    seqs: tuple[int, ...] = LONG_SEQS,
    clusters: dict[str, tuple[str, int, int]] = LONG_CLUSTERS,
    budgets: tuple[float, ...] = LONG_BUDGETS_GB,
    model: str = LONG_MODEL,
) -> list[dict[str, Any]]:
    rows = []
    for seq in seqs:
        for label, (cluster, world, batch) in clusters.items():
            analysis = capture(model.format(seq=seq), batch, seq)
            for budget in budgets:
                start = time.perf_counter()
                got = long_row(analysis, cluster, world, batch, budget)
                rows.append({"seq": seq, "cluster": label, "budget_gb": budget, **got})
                print(
                    f"seq {seq:<7}{label:<11}{budget:>4} GB  {time.perf_counter() - start:6.1f} s"
                )
    return rows


def run_long_smoke() -> list[dict[str, Any]]:
    tiny = "gpt:layers=2,hidden=128,heads=8,vocab=256,seq={seq}"
    return run_long((1024,), {"8 x A100": ("a100-80gb-sxm", 8, 2)}, (0.05,), tiny)


def run(
    models: dict[str, str], clusters: dict[str, tuple[str, int, int]], budgets: tuple[float, ...]
) -> list[dict[str, Any]]:
    rows = []
    for name, spec in models.items():
        captured: dict[int, Analysis] = {}
        for label, (cluster, world, batch) in clusters.items():
            if batch not in captured:
                captured[batch] = capture(spec, batch, SEQ.get(name))
            memory_gb = load_cluster(cluster).memory_bytes / 2**30
            for budget in budgets:
                if budget > memory_gb + 1e-9:
                    continue
                start = time.perf_counter()
                got = row(captured[batch], cluster, world, batch, budget)
                rows.append({"model": name, "cluster": label, "budget_gb": budget, **got})
                print(
                    f"{name:<14}{label:<15}{budget:>4} GB  {time.perf_counter() - start:6.1f} s",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.smoke:
        models = {"tiny": "gpt:layers=4,hidden=128,heads=4,vocab=256,seq=64"}
        rows = run(models, {"8 x A100": ("a100-80gb-sxm", 8, 16)}, (0.02,))
        print(table(rows))
        print(long_table(run_long_smoke()))
        return
    rows = run(MODELS, CLUSTERS, BUDGETS_GB)
    text = table(rows)
    print(text)
    worse = [r for r in rows if (best := vs_best_other(r)) is not None and best < 1 - 1e-9]
    print(f"rows where a baseline with another plan beats the plan: {len(worse)}")
    long_rows = run_long()
    print(long_table(long_rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "long": long_rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

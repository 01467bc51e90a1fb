"""The search's cost tables: each distinct unit's terms under each tensor-parallel layout.

Reads: an `Analysis` (`gfx_layer`, `gfx_cost`, `val`). Writes nothing on it: returns
`ModelTerms`, the graph's side of the search's cost model (`search/option_cost.py`).

Repeated layers share one table: the graph is first cut down to one representative of every
layer fingerprint (the segments and the first block of each stack; the later blocks' uses are
rewired to the representative's values), so a 96-layer model costs what a 1-layer one does.
The reduced graph is then rewritten by the compiler's own passes once per layout
(tp, sp, vocabulary split, Ulysses) at dp = 1, and every unit's compute, saved activations,
collectives and parameters are read off the rewrite exactly as `price.price_plan` reads them (`unit_terms`).
Guarantees: every unit of the model maps to a representative with terms for every layout
its heads and widths allow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from galvatron_fx.cost_models.hardware import ClusterSpec
from galvatron_fx.cost_models.memory import Precision
from galvatron_fx.cost_models.traffic import Collective
from galvatron_fx.lowering import Analysis
from galvatron_fx.meta import COST, LAYER, PLACEMENT
from galvatron_fx.passes.recompute import full_region, rerun_nodes
from galvatron_fx.plan import (
    LayerShape,
    LayerStrategy,
    Plan,
    PlanError,
    Recompute,
    check_ulysses,
    check_vocab,
)
from galvatron_fx.planning.collective_list import RECOMPUTED, collectives_of
from galvatron_fx.planning.lowered import LoweredForPricing, lower_for_pricing
from galvatron_fx.planning.unit_terms import (
    graph_value_bytes,
    kernel_work,
    local_params,
    memory_inputs,
    trained_width,
)
from galvatron_fx.runtime.program import ParamSpec
from galvatron_fx.search.option_cost import UnitTerms
from galvatron_fx.unit_graph.attention import attention_cores
from galvatron_fx.unit_graph.shapes import layer_shapes
from galvatron_fx.unit_graph.units import model_fingerprint, unit_nodes

__all__ = ["ModelTerms", "model_terms", "representatives"]

Layout = tuple[int, bool, bool, bool]
"""(tp, sp, vocab_parallel, ulysses)"""


@dataclass(frozen=True)
class ModelTerms:
    """The graph's side of the search: units in order, their representatives, terms."""

    units: tuple[str, ...]
    kinds: tuple[str, ...]
    """`layer` or `segment`, per unit."""
    representative: dict[str, str]
    terms: dict[tuple[str, Layout], UnitTerms]
    """(representative unit, layout) -> terms."""
    model_fingerprint: str
    refused: dict[int, str]
    """tp degree -> why the model refuses it (heads or widths not divisible)."""
    flops_per_sample: float
    """Training FLOPs of one sample (forward + backward), for TFLOP/s figures."""

    def tps(self) -> list[int]:
        return sorted({layout[0] for (_, layout) in self.terms})

    def has(self, unit: str, s: LayerStrategy) -> bool:
        """Whether `s`'s layout was priced for `unit` (Ulysses needs attention whose heads
        and sequence the degree divides)."""
        return (self.representative[unit], _key(s)) in self.terms

    def unit_terms(self, unit: str, s: LayerStrategy) -> UnitTerms:
        return self.terms[(self.representative[unit], _key(s))]


@dataclass(frozen=True)
class Compute:
    """How the units' kernels are priced: the peak FLOP/s of `dtype`, the cluster's
    efficiencies times `efficiency`, values at `precision`'s width, fused if `compiled`."""

    dtype: str
    efficiency: float
    precision: Precision
    compiled: bool


def _key(s: LayerStrategy) -> Layout:
    return (s.tp, s.sp, s.vocab_parallel, s.ulysses)


def representatives(analysis: Analysis) -> tuple[Analysis, dict[str, str]]:
    """An analysis holding one unit per layer fingerprint (plus every segment), and the map
    from every unit of the model to the unit that stands for it."""
    nodes = unit_nodes(analysis.graph_module)
    seen: dict[str, list[str]] = {}
    rep: dict[str, str] = {}
    for u in analysis.layers:
        kept = seen.setdefault(u.fingerprint, []) if u.kind == "layer" else []
        if len(kept) == 2 and _same_ops(nodes[u.name], nodes[kept[1]]):
            rep[u.name] = kept[1]
        else:
            kept.append(u.name)
            rep[u.name] = u.name
    for kept in seen.values():  # the second block stands for all: the first one also
        if len(kept) == 2:  # carries the switch into the stack, priced apart
            rep[kept[0]] = kept[1]
    mapping = {
        mine: theirs
        for u, r in rep.items()
        if u != r and _after(u, r, analysis.units)
        for mine, theirs in zip(nodes[u], nodes[r], strict=True)
        if mine.op not in ("placeholder", "output")
    }
    if not mapping:
        return analysis, rep
    gm = _without(analysis.graph_module, mapping)
    return analysis.with_graph(gm), rep


def _after(unit: str, rep: str, order: list[str]) -> bool:
    """Only units after their representative are cut (the first block stays in the graph)."""
    return order.index(unit) > order.index(rep)


def _same_ops(a: list[fx.Node], b: list[fx.Node]) -> bool:
    return len(a) == len(b) and all(
        x.op == y.op and (x.op == "get_attr" or x.target == y.target)
        for x, y in zip(a, b, strict=True)
    )


def _without(gm: fx.GraphModule, mapping: dict[fx.Node, fx.Node]) -> fx.GraphModule:
    """A copy of `gm` without the mapped nodes: their users read the mapped-to nodes."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in mapping:
            env[node] = env[mapping[node]]
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(gm, graph)


def model_terms(
    analysis: Analysis,
    cluster: ClusterSpec,
    tps: Iterable[int],
    *,
    dtype: str = "bf16",
    efficiency: float = 1.0,
    precision: Precision = "mixed",
    compiled: bool = False,
) -> ModelTerms:
    """Terms of every distinct unit under every layout with tp in `tps`: compute at the
    trained `precision`'s value width, the cluster's efficiencies times `efficiency`, the
    memory-bound kernels fused as `torch.compile` fuses them where `compiled`."""
    compute = Compute(dtype, efficiency, precision, compiled)
    reduced, rep = representatives(analysis)
    batch = analysis.batch_size
    shapes = layer_shapes(reduced.graph_module)
    flat = dataclasses.replace(cluster, op_overhead_s=0.0)  # overhead is counted by ops
    terms: dict[tuple[str, Layout], UnitTerms] = {}
    refused: dict[int, str] = {}
    for tp in sorted(set(tps)):
        try:
            _check_tp(reduced, shapes, tp)
        except PlanError as err:
            refused[tp] = str(err)
            continue
        for layout in _layouts(tp):
            terms.update(_terms_of(reduced, shapes, layout, batch, flat, compute))
    if batch % 2 == 0:
        by_unit = _dp_collectives(reduced)
        terms = {
            key: dataclasses.replace(t, dp_collectives=by_unit.get(key[0], ()))
            for key, t in terms.items()
        }
    flops = sum(u.fwd_flops + u.bwd_flops for u in analysis.layers) / batch
    return ModelTerms(
        tuple(analysis.units),
        tuple(u.kind for u in analysis.layers),
        rep,
        terms,
        model_fingerprint(analysis.graph_module),
        refused,
        flops,
    )


def _dp_collectives(reduced: Analysis) -> dict[str, tuple[Collective, ...]]:
    """Per unit, the graph collectives of a dp = 2 rewrite (tp = 1: all on the dp group)."""
    plan = reduced.plan(LayerStrategy(dp=2), world_size=2)
    comms = lower_for_pricing(reduced, plan, quiet=True).collectives
    return {
        unit: tuple(c for c in listed if not c.source.startswith("grad_sync"))
        for unit, listed in comms.items()
    }


def _layouts(tp: int) -> Sequence[Layout]:
    """(tp, sp of the layers, vocabulary split of the segments, Ulysses layers) per rewrite:
    three rewrites give each tp every layout (layers plain, with sp and under Ulysses,
    segments with and without the vocabulary split; segments run without sp, their input
    gathered by a layout switch)."""
    if tp == 1:
        return [(1, False, False, False)]
    return [(tp, False, False, False), (tp, True, True, False), (tp, False, False, True)]


def _check_tp(reduced: Analysis, shapes: dict[str, LayerShape], tp: int) -> None:
    plan = reduced.plan(LayerStrategy(tp=tp), world_size=tp)
    plan.check_model(model_fingerprint(reduced.graph_module), shapes)


def _terms_of(
    reduced: Analysis,
    shapes: dict[str, LayerShape],
    layout: Layout,
    batch: int,
    cluster: ClusterSpec,
    compute: Compute,
) -> dict[tuple[str, Layout], UnitTerms]:
    tp, sp, vocab, ulysses = layout
    kinds = {u.name: u.kind for u in reduced.layers}
    strategies = {
        u: LayerStrategy(tp=tp, sp=sp, ulysses=ulysses and _fits(check_ulysses, u, tp, shapes))
        if kind == "layer"
        else LayerStrategy(tp=tp, vocab_parallel=vocab and _fits(check_vocab, u, tp, shapes))
        for u, kind in kinds.items()
    }
    if ulysses and not any(s.ulysses for s in strategies.values()):
        return {}
    plan = reduced.plan(strategies, world_size=tp)
    lowered = lower_for_pricing(reduced, plan, quiet=True)
    params, comms, ratio = lowered.params, lowered.collectives, lowered.ratios
    original, rewritten = unit_nodes(reduced.graph_module), unit_nodes(lowered.graph_module)
    full = _full_recompute_collectives(lowered, rewritten, plan)
    out = {}
    previous = 0
    for unit in reduced.units:
        local = local_params(params, unit)
        before, previous = previous, local
        s = plan.strategy(unit)
        key = _key(s)
        if (ulysses and not s.ulysses) or (
            vocab and kinds[unit] == "segment" and not s.vocab_parallel
        ):
            continue  # priced by the plain tp rewrite
        nodes = [n for n in rewritten.get(unit, []) if COST.has(n) and PLACEMENT.has(n)]
        cores = {n.name for core in attention_cores(original[unit]) for n in core}
        terms = _unit_terms(
            unit, s, nodes, rewritten.get(unit, []), original[unit], cores,
            params, comms.get(unit, []), ratio, batch, cluster, compute,
        )  # fmt: skip
        out[(unit, key)] = dataclasses.replace(
            terms, previous_params=before, full_recompute_collectives=full.get(unit, ())
        )
    return out


def _full_recompute_collectives(
    lowered: LoweredForPricing, rewritten: dict[str, list[fx.Node]], plan: Plan
) -> dict[str, tuple[Collective, ...]]:
    """Per unit, the collectives full recomputation would run again: the program lowered
    without recomputation, listed as if every unit's full region were checkpointed (what
    `lower` and `inline_regions` give a plan with full recomputation, without a second
    rewrite per layout)."""
    again = frozenset(
        n.name for nodes in rewritten.values() for n in rerun_nodes(full_region(nodes))
    )
    listed = collectives_of(lowered.graph_module, lowered.params, plan, again)
    return {
        unit: tuple(c for c in cs if c.source.endswith(RECOMPUTED)) for unit, cs in listed.items()
    }


def _unit_terms(
    unit: str,
    s: LayerStrategy,
    nodes: list[fx.Node],
    all_nodes: list[fx.Node],
    original: list[fx.Node],
    cores: set[str],
    params: dict[str, ParamSpec],
    comms: list[Collective],
    ratio: dict[str, float],
    batch: int,
    cluster: ClusterSpec,
    compute: Compute,
) -> UnitTerms:
    def variant(rc: Recompute) -> LayerStrategy:
        return dataclasses.replace(s, recompute=rc)

    selective = variant(Recompute.SELECTIVE)
    width = trained_width(all_nodes, compute.precision)
    work = kernel_work(
        nodes, cores, selective, cluster, compute.dtype, width, compute.efficiency,
        compute.compiled,
    )  # fmt: skip
    fwd, bwd, rc_full, rc_sel = work.at(1.0)
    local = local_params(params, unit)
    none, sel, full = (
        memory_inputs(nodes, all_nodes, ratio, cores, variant(rc), params, unit, local)
        for rc in (Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL)
    )
    grad_sum = sum(c.size_bytes for c in comms if c.source == "grad_sync_tp")
    return UnitTerms(
        unit=unit,
        tp=s.tp,
        sp=s.sp,
        vocab_parallel=s.vocab_parallel,
        ulysses=s.ulysses,
        ref_batch=batch,
        fwd_s=fwd,
        bwd_s=bwd,
        recompute_selective_s=rc_sel,
        recompute_full_s=rc_full,
        ops=len(nodes),
        selective_ops=sum(1 for n in nodes if n.name in cores),
        # layout switches are the planner's to price (`costs.switch_time_s`)
        collectives=tuple(
            c for c in comms if not c.source.startswith("grad_sync") and c.source != "switch_layout"
        ),
        tp_grad_sum_bytes=float(grad_sum),
        params=local,
        param_bytes=graph_value_bytes(all_nodes),
        largest_param=none.largest_param,
        saved_bytes=none.all_saved_bytes,
        kept_selective_bytes=sel.kept_bytes,
        full_kept_bytes=full.kept_bytes,
        full_live_bytes=full.all_saved_bytes,
        largest_value_bytes=none.largest_value_bytes,
        boundary_bytes=_boundary_bytes(original, unit),
        work=work,
    )


def _fits(
    check: Callable[[str, int, LayerShape], None],
    unit: str,
    degree: int,
    shapes: dict[str, LayerShape],
) -> bool:
    """Whether `check` (Ulysses', the vocabulary split's) accepts `degree` for `unit`."""
    try:
        check(unit, degree, shapes[unit])
    except PlanError:
        return False
    return True


def _boundary_bytes(nodes: list[fx.Node], unit: str) -> float:
    """Whole bytes of the computed values this unit takes from other units."""
    inside = set(nodes)
    feeding = {
        a
        for n in nodes
        for a in n.all_input_nodes
        if a not in inside and a.op == "call_function" and LAYER.get(a).name != unit
    }
    total = 0
    for a in feeding:
        val = a.meta.get("val")
        if isinstance(val, torch.Tensor):
            total += val.numel() * val.element_size()
    return float(total)

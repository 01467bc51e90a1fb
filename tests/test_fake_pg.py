"""Rank-specific rewrites at large world sizes, in one process with the fake process group.

At world size 64 (tp up to 8, dp up to 64) the rewritten graph of a given rank must have the
local shapes and the collective counts Megatron and FSDP would have: one forward and one
backward all-reduce per attention block and per MLP under TP, all-gather / reduce-scatter
pairs under SP, one gather per parameter under ZeRO-3, parameters cut to this rank's piece.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_HF, build
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from galvatron_fx import parallelize
from galvatron_fx.cost_models.communication import collectives_time, spans_nodes
from galvatron_fx.cost_models.hardware import PRESETS
from galvatron_fx.lowering import analyze
from galvatron_fx.plan import LayerStrategy, Plan, Recompute
from galvatron_fx.planning.collective_list import RECOMPUTED
from galvatron_fx.planning.lowered import plan_collectives
from galvatron_fx.planning.price import price_plan
from galvatron_fx.runtime import collectives as C
from galvatron_fx.runtime.program import get_attr
from galvatron_fx.runtime.state import take_shard

WORLD = 64
GPT = "gpt:layers=2,hidden=64,heads=8,vocab=128,seq=16"
BATCH, SEQ = 64, 8


@pytest.fixture(scope="module")
def fake_world():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    yield
    dist.destroy_process_group()
    C.GROUPS.clear()


@pytest.fixture(scope="module")
def gpt():
    model, args, kwargs = build(GPT, batch=BATCH, seq=SEQ)
    return analyze(model, args, kwargs), model


def _plan(analysis, strategy: LayerStrategy, world: int = WORLD) -> Plan:
    return analysis.plan(strategy, world_size=world)


def _ops(gm, unit: str) -> Counter:
    from galvatron_fx.meta import LAYER

    return Counter(
        n.target.__name__
        for n in gm.graph.nodes
        if n.op == "call_function"
        and LAYER.get(n).name == unit
        and getattr(n.target, "__module__", "") == C.__name__
    )


CASES = [
    (LayerStrategy(dp=64), {}),
    (LayerStrategy(tp=2, dp=32), {"tp_copy": 2, "tp_reduce": 2}),
    (LayerStrategy(tp=4, dp=16, tp_consecutive=False), {"tp_copy": 2, "tp_reduce": 2}),
    (LayerStrategy(tp=8, dp=8), {"tp_copy": 2, "tp_reduce": 2}),
    (LayerStrategy(tp=8, sp=True, dp=8), {"gather_partial": 2, "reduce_scatter": 2}),
    (LayerStrategy(dp=64, dp_mode="zero3"), {"zero3_issue": 1, "zero3_use": 1, "zero3_views": 1}),
    (
        LayerStrategy(tp=4, sp=True, dp=16, dp_mode="zero3"),
        {
            "gather_partial": 2,
            "reduce_scatter": 2,
            "zero3_issue": 1,
            "zero3_use": 1,
            "zero3_views": 1,
        },
    ),
]


@pytest.mark.parametrize(
    ("strategy", "per_block"), CASES, ids=lambda x: getattr(x, "short", lambda: "")()
)
@pytest.mark.parametrize("rank", [0, 37])
def test_world_64_local_shapes_and_collectives(fake_world, gpt, strategy, per_block, rank):
    analysis, model = gpt
    compiled = parallelize(analysis.copy(), plan=_plan(analysis, strategy), rank=rank)
    gm, tp, dp = compiled.module, strategy.tp, strategy.dp
    assert _ops(gm, "blocks.1") == Counter(per_block)
    # the first layer also splits the embedding's output on the sequence (Megatron's scatter)
    entry = {"split_local": 1} if strategy.sp else {}
    assert _ops(gm, "blocks.0") == Counter(per_block) + Counter(entry)
    h = 64
    spec = compiled.params["blocks.0.attn.qkv.weight"]
    tp_index = spec.tp_group.index(rank)
    want = take_shard(model.blocks[0].attn.qkv.weight.detach(), 0, (h, h, h), tp, tp_index)
    if strategy.dp_mode.value == "zero3":  # one flat 1/dp shard of the block's pieces
        # qkv, attention proj, fc, MLP proj weights and the qkv, fc biases are split by tp;
        # the two row-parallel biases and two LayerNorms (6h) are whole
        block = (12 * h * h + 7 * h) // tp + 6 * h
        assert get_attr(gm, spec.zero3_flat).numel() == -(-block // dp)
        assert spec.zero3_shape == tuple(want.shape)
    else:
        qkv = get_attr(gm, "blocks.0.attn.qkv.weight")
        assert torch.equal(qkv, want)  # this rank's q, k and v heads, block by block
        assert tuple(get_attr(gm, "blocks.0.mlp.proj.weight").shape) == (h, 4 * h // tp)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert placeholder.meta["val"].shape[0] == BATCH // dp
    views = [
        n for n in gm.graph.nodes if n.target == torch.ops.aten.view.default and len(n.args[1]) == 4
    ]
    assert views and all(list(v.args[1]) == [BATCH // dp, SEQ, 8 // tp, 8] for v in views[:3])


def test_zero3_parameter_bytes_are_total_over_dp(fake_world, gpt):
    analysis, model = gpt
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for dp in (8, 64):
        strategy = LayerStrategy(tp=WORLD // dp, dp=dp, dp_mode="zero3")
        compiled = parallelize(analysis.copy(), plan=_plan(analysis, strategy), rank=5)
        local = sum(p.numel() * p.element_size() for p in compiled.module.parameters())
        tp = WORLD // dp
        # tp splits the layers' weights, dp shards everything; padding: < 4 bytes x dp a tensor
        assert local <= total / dp + 4 * 64
        if tp == 1:
            assert local == pytest.approx(total / dp, rel=0.01)


@pytest.mark.parametrize("family", ["gpt", "llama", "bert"])
def test_one_all_reduce_forward_and_backward_per_block(family):
    spec = {"gpt": GPT, "llama": TINY_HF["llama"], "bert": TINY_HF["bert"]}[family]
    model, args, kwargs = build(spec, batch=4, seq=8)
    analysis = analyze(model, args, kwargs)
    listed = plan_collectives(analysis, _plan(analysis, LayerStrategy(tp=2), world=2))
    layers = [u.name for u in analysis.layers if u.kind == "layer"]
    for unit in layers:
        graph_ops = [c for c in listed[unit] if not c.source.startswith("grad_sync")]
        fwd = [c for c in graph_ops if c.phase == "forward"]
        bwd = [c for c in graph_ops if c.phase == "backward"]
        # attention + MLP: one all-reduce each way per block, nothing else
        assert [c.kind for c in fwd] == ["all_reduce"] * 2, (unit, fwd)
        assert [c.kind for c in bwd] == ["all_reduce"] * 2, (unit, bwd)
        hidden = fwd[0].size_bytes
        assert all(c.size_bytes == hidden and c.group_size == 2 for c in graph_ops)


def test_sequence_parallel_collectives_and_grad_sync():
    model, args, kwargs = build(GPT, batch=4, seq=8)
    analysis = analyze(model, args, kwargs)
    plan = _plan(analysis, LayerStrategy(tp=2, sp=True, dp=4), world=8)
    listed = plan_collectives(analysis, plan)["blocks.1"]  # steady state: after the entry split
    kinds = Counter((c.kind, c.phase) for c in listed if not c.source.startswith("grad_sync"))
    assert kinds == {
        ("all_gather", "forward"): 2,
        ("reduce_scatter", "forward"): 2,
        ("reduce_scatter", "backward"): 2,
        ("all_gather", "backward"): 2,
    }
    sync = {c.group_size: c for c in listed if c.source.startswith("grad_sync")}
    # the norms' weights and biases (4 x 64) and the row-parallel biases (2 x 64) see only
    # their sequence slice: summed over the TP group; every parameter (this rank's TP pieces)
    # is all-reduced over dp; each as one bucketed call
    assert set(sync) == {2, 4} and all(c.kind == "all_reduce" for c in sync.values())
    assert sync[2].size_bytes == 6 * 64 * 4
    h = 64
    assert sync[4].size_bytes == ((12 * h * h + 7 * h) // 2 + 6 * h) * 4


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_ulysses_collectives_and_grad_sync(family):
    """Per block in the steady state: one all-to-all each way for q, k, v and the output,
    nothing for Llama's rotary tables sliced onto the sequence (they take no gradient), and
    the whole weights synced once over every rank of the stage (tp x dp)."""
    spec = {"gpt": GPT, "llama": TINY_HF["llama"]}[family]
    model, args, kwargs = build(spec, batch=4, seq=8)
    analysis = analyze(model, args, kwargs)
    layers = [u.name for u in analysis.layers if u.kind == "layer"]
    strategies = {
        u.name: LayerStrategy(tp=2, ulysses=True, dp=2)
        if u.kind == "layer"
        else LayerStrategy(dp=4)
        for u in analysis.layers
    }
    listed = plan_collectives(analysis, analysis.plan(strategies, world_size=4))[layers[1]]
    kinds = Counter((c.kind, c.phase) for c in listed if not c.source.startswith("grad_sync"))
    assert kinds == {("all_to_all", "forward"): 4, ("all_to_all", "backward"): 4}
    sync = [c for c in listed if c.source.startswith("grad_sync")]
    assert [(c.kind, c.group_size) for c in sync] == [("all_reduce", 4)]


def test_vocab_parallel_segments_split_the_vocabulary(fake_world, gpt):
    analysis, _ = gpt
    layer = LayerStrategy(tp=8, dp=8)
    vocab = LayerStrategy(tp=8, dp=8, vocab_parallel=True)
    plan = analysis.plan(
        {u: layer if "." in u else vocab for u in analysis.units}, world_size=WORLD
    )
    compiled = parallelize(analysis.copy(), plan=plan, rank=13)
    gm = compiled.module
    assert tuple(get_attr(gm, "wte.weight").shape) == (128 // 8, 64)
    assert tuple(get_attr(gm, "lm_head.weight").shape) == (128 // 8, 64)
    assert tuple(get_attr(gm, "wpe.weight").shape) == (16, 64)  # positions are not the vocabulary
    listed = plan_collectives(analysis, plan, rank=13)
    loss = [(c.kind, c.phase) for c in listed["loss"] if not c.source.startswith("grad_sync")]
    # max, sum of exponentials and target logit: one value per row each, never the logits
    assert loss.count(("all_reduce", "forward")) >= 3
    assert all(
        c.size_bytes <= BATCH // 8 * SEQ * 4 * 2 for c in listed["loss"] if c.kind == "all_reduce"
    )


def test_collective_list_of_sharded_data_parallel(fake_world, gpt):
    analysis, _ = gpt
    plan = _plan(analysis, LayerStrategy(tp=4, sp=True, dp=16, dp_mode="zero3"))
    listed = plan_collectives(analysis, plan, rank=21)["blocks.1"]
    kinds = Counter((c.kind, c.phase, c.source) for c in listed)
    # the prefetch of the next unit (head) starts here; this block is gathered again in
    # backward and its gradient reduce-scattered once, asynchronously
    assert kinds[("all_gather", "forward", "zero3_issue")] == 1
    assert kinds[("all_gather", "backward", "zero3_use")] == 1
    assert kinds[("reduce_scatter", "backward", "zero3_use")] == 1
    (rs,) = [c for c in listed if c.kind == "reduce_scatter" and c.source == "zero3_use"]
    assert rs.overlappable and rs.group_size == 16
    # sequence-parallel norms and biases: their shard ranges, summed over the TP group
    assert kinds[("all_reduce", "backward", "grad_sync_tp")] == 1


def test_batch_not_divisible_by_dp_is_refused_with_the_unit_named():
    model, args, kwargs = build(GPT, batch=8, seq=SEQ)
    analysis = analyze(model, args, kwargs)
    plan = _plan(analysis, LayerStrategy(dp=16), world=16)
    with pytest.raises(Exception, match=r"unit 'embedding': dp=16 does not divide the batch of 8"):
        plan_collectives(analysis, plan)


class _FlipBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.flip(torch.nn.functional.gelu(self.fc1(x)), dims=[-1]))


class _FlipModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_FlipBlock() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.square().mean()


def test_an_op_without_a_rule_gathers_its_inputs_and_says_so():
    from galvatron_fx.passes.shard import ShardWarning

    analysis = analyze(_FlipModel(), (torch.randn(4, 8, 16),))
    plan = _plan(analysis, LayerStrategy(tp=2), world=2)
    with pytest.warns(ShardWarning) as caught:
        listed = plan_collectives(analysis, plan)
    flips = [str(w.message) for w in caught if "aten.flip" in str(w.message)]
    assert len(flips) == 1, flips  # once, naming every layer it happens in
    assert "aten.flip.default (tp axis)" in flips[0]
    assert "layer 'blocks.0' (nodes ['flip'])" in flips[0] and "layer 'blocks.1'" in flips[0]
    fwd = [c.source for c in listed["blocks.0"] if c.phase == "forward"]
    assert "gather_whole" in fwd or "gather_partial" in fwd


class _CountAllReduce(TorchDispatchMode):
    """Counts the functional all-reduces a step dispatches (the TP collectives' op)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops._c10d_functional.all_reduce.default
        return func(*args, **(kwargs or {}))


def test_full_recomputation_lists_runs_and_prices_its_forward_collectives_again(fake_world, gpt):
    """Backward re-runs a fully recomputed block's forward, TP all-reduces included, up to
    its last tensor saved for backward: the listing has those once more (in backward, in
    line), the price counts them, and a step on the fake group dispatches exactly that many
    more all-reduces."""
    analysis, _ = gpt
    layers = [u.name for u in analysis.layers if u.kind == "layer"]
    tp = LayerStrategy(tp=2, dp=WORLD // 2)
    full = LayerStrategy(tp=2, dp=WORLD // 2, recompute=Recompute.FULL)
    plain_plan = _plan(analysis, tp)
    full_plan = analysis.plan(
        {u: full if u in layers else tp for u in analysis.units}, world_size=WORLD
    )
    plain, again = plan_collectives(analysis, plain_plan), plan_collectives(analysis, full_plan)
    cluster = PRESETS["a100-80gb-sxm"]
    priced = {c.unit: c for c in price_plan(analysis, plain_plan, cluster)}
    priced_full = {c.unit: c for c in price_plan(analysis, full_plan, cluster)}
    recomputed_total = 0
    for unit in layers:
        forward = [c for c in plain[unit] if c.phase == "forward"]
        redone = [c for c in again[unit] if c.source.endswith(RECOMPUTED)]
        assert [c.kind for c in forward] == ["all_reduce"] * 2, forward
        # checkpoint stops recomputing at the last tensor saved for backward: the MLP's
        # row-parallel output (summed by the second all-reduce) is saved by nothing inside
        assert [(c.kind, c.size_bytes, c.phase, c.overlappable) for c in redone] == [
            (c.kind, c.size_bytes, "backward", False) for c in forward[:1]
        ]
        assert [c for c in again[unit] if not c.source.endswith(RECOMPUTED)] == plain[unit]
        extra_s = collectives_time(tuple(redone), cluster, spans_nodes(full, cluster)).total_s
        assert extra_s > 0
        assert priced_full[unit].comm_total_s == pytest.approx(priced[unit].comm_total_s + extra_s)
        recomputed_total += len(redone)
    counts = []
    for plan in (plain_plan, full_plan):
        compiled = parallelize(analysis.copy(), plan=plan, rank=0)
        args, kwargs = analysis.context.example_inputs, analysis.context.example_kwargs
        with _CountAllReduce() as counter:
            compiled.train_step(*args, **kwargs)
        counts.append(counter.count)
    assert counts[1] - counts[0] == recomputed_total


@pytest.mark.parametrize(("family", "repeated"), [("llama", 1), ("bert", 2)])
def test_full_recomputation_is_priced_on_hf_families(family, repeated):
    """The priced program holds every parameter and buffer of the compiled one, also those
    no node reads once the regions are inlined (Llama's unused rotary `original_inv_freq`
    broke pricing). Backward repeats a layer's TP all-reduces up to its last saved tensor:
    Llama's first (pre-norm: nothing after the MLP's all-reduce saves a tensor), both of
    BERT's (post-norm: the closing layer norm saves the sum the second one produces)."""
    model, args, kwargs = build(TINY_HF[family], batch=4, seq=8)
    analysis = analyze(model, args, kwargs)
    plan = analysis.plan(LayerStrategy(tp=2, dp=2, recompute=Recompute.FULL), world_size=4)
    listed = plan_collectives(analysis, plan)
    costs = {c.unit: c for c in price_plan(analysis, plan, PRESETS["a100-80gb-sxm"])}
    for unit in (u.name for u in analysis.layers if u.kind == "layer"):
        again = [c for c in listed[unit] if c.source.endswith(RECOMPUTED)]
        assert [c.kind for c in again] == ["all_reduce"] * repeated, (unit, again)
        assert costs[unit].collectives == tuple(listed[unit])


class _RecordGathers(TorchDispatchMode):
    """The bytes every all-gather and reduce-scatter of a step moves, in nccl-tests' sizes:
    an all-gather's output, a reduce-scatter's input (the whole buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.moved: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ops = torch.ops._c10d_functional
        if func is ops.all_gather_into_tensor.default:
            x, n = args[0], args[1]
            self.moved["all_gather", x.numel() * x.element_size() * n] += 1
        elif func is ops.reduce_scatter_tensor.default:
            x = args[0]
            self.moved["reduce_scatter", x.numel() * x.element_size()] += 1
        return func(*args, **(kwargs or {}))


def test_sequence_parallel_collectives_are_sized_as_the_runtime_moves_them(fake_world, gpt):
    """Megatron-SP's reduce-scatter after a row-parallel linear reads the whole partial sum
    (local batch x sequence x hidden) and its backward all-gather writes it whole: at tp=2,
    dp=32 a block's 64 samples of 8 tokens split to 2 a rank, 2 x 8 x 64 fp32 values =
    4096 bytes each, not the scattered half. The listing equals what a step dispatches."""
    analysis, _ = gpt
    plan = _plan(analysis, LayerStrategy(tp=2, sp=True, dp=WORLD // 2))
    listed = plan_collectives(analysis, plan)
    whole = (BATCH // (WORLD // 2)) * SEQ * 64 * 4
    for unit in ("blocks.0", "blocks.1"):
        pair = [c for c in listed[unit] if c.source == "reduce_scatter"]
        assert [(c.kind, c.phase, c.size_bytes) for c in pair] == [
            ("reduce_scatter", "forward", whole),
            ("all_gather", "backward", whole),
        ] * 2
    expected = Counter(
        (c.kind, c.size_bytes)
        for cs in listed.values()
        for c in cs
        if c.kind in ("all_gather", "reduce_scatter") and not c.source.startswith("grad_sync")
    )
    compiled = parallelize(analysis.copy(), plan=plan, rank=0)
    args, kwargs = analysis.context.example_inputs, analysis.context.example_kwargs
    with _RecordGathers() as recorded:
        compiled.train_step(*args, **kwargs)
    assert recorded.moved == expected


class _ReduceScattersInFlight(TorchDispatchMode):
    """At each functional reduce-scatter a step dispatches: how many reduce-scatters
    launched before it have not been waited for yet."""

    def __init__(self) -> None:
        super().__init__()
        self.unwaited: list[torch.Tensor] = []
        self.at_launch: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops._c10d_functional.reduce_scatter_tensor.default:
            self.at_launch.append(len(self.unwaited))
            self.unwaited.append(out)
        elif func is torch.ops._c10d_functional.wait_tensor.default:
            self.unwaited = [t for t in self.unwaited if t is not args[0]]
        return out


def test_zero3_keeps_one_reduce_scatter_in_flight(fake_world, gpt):
    """ZeRO-3 on a backend that overlaps (not gloo): each unit's reduce-scatter waits for the
    one before it, so no two units' whole padded gradients are alive at once beside the
    unit computing its own, and the last one lands when the gradient sync ends. Every unit
    with parameters (one flat shard each) reduce-scatters once; none may find an earlier
    one still in flight, and none is left unwaited after the step."""
    analysis, _ = gpt
    plan = _plan(analysis, LayerStrategy(dp=WORLD, dp_mode="zero3"))
    compiled = parallelize(analysis.copy(), plan=plan, rank=0)
    args, kwargs = analysis.context.example_inputs, analysis.context.example_kwargs
    with _ReduceScattersInFlight() as seen:
        compiled.train_step(*args, **kwargs)
    launched = len({p.zero3_flat for p in compiled.params.values() if p.zero3_flat})
    assert launched >= 4  # embedding, two blocks, head
    assert seen.at_launch == [0] * launched
    assert seen.unwaited == [] and C.PENDING == []

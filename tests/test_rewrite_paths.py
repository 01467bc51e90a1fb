"""Rewrite paths that real architectures take and the test families did not: each a tiny
hand-written model on gloo ranks against the unmodified model in one process (loss, every
gradient, parameters after AdamW steps: `tests/exactness.py`), and the program checked to be
what the plan says (`passes/check_program.py` runs inside every compile; here also local
batch sizes, per-rank weight shapes and the absence of `ShardWarning`).

- a column-parallel output gathered by an op without a rule, under tp without sp: the
  gradient into the layer's input came back summed over the TP group (every earlier layer
  off by 80-100%): the gather's adjoint was chosen as if the node read it whole, though it
  was split again right after;
- `chunk` of a fused qkv projection (the fallback for ops with several outputs crashed;
  now it keeps the split, the weight sharded block by block), and the fused projection cut
  by aligned slices or a view to (3, heads, head_dim) then `unbind`;
- a data-parallel unit after one that ran the whole batch: it ran the whole batch too;
- linears written `x @ w.T` and `x @ w`: every rank held the whole weight under tp;
- fewer key/value heads than tp (grouped-query and multi-query attention), refused before;
- BLOOM's attention over (batch * heads): it gathered, the merged dim split in strides;
- products with a weight vector (`h @ w`, `w @ h^T`): the matmul rule crashed on them;
- a value with a gradient but not the batch, made by a segment on tp=4 (dp=1) and read by
  layers on tp=2 x dp=2 (T5's decoder input, its batch lost through in-place writes): each
  dp replica's gradient is half of it, and the switch doubled it instead of summing them.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_HF, build
from distributed import run_ranks
from exactness import adamw, check, reference, reference_of, run_steps
from torch import nn
from torch.distributed.tensor import Replicate

import galvatron_fx as gfx
from galvatron_fx import parallelize
from galvatron_fx.cost_models.hardware import load_cluster
from galvatron_fx.lowering import Analysis, analyze
from galvatron_fx.meta import LAYER, PLACEMENT
from galvatron_fx.passes.check_program import ProgramMismatch, check_program
from galvatron_fx.passes.insert_collectives import insert_collectives
from galvatron_fx.passes.manager import RewriteTarget, run_passes
from galvatron_fx.passes.shard import ShardWarning, shard
from galvatron_fx.plan import DPMode, LayerStrategy, PipelineConfig, Plan, PlanError, Recompute
from galvatron_fx.planning.model_terms import model_terms
from galvatron_fx.runtime import collectives as C

H, HEADS, VOCAB, BATCH, SEQ = 16, 4, 32, 4, 8


def _attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, S, H) each -> causal attention over HEADS heads, (B, S, H)."""
    b, s, _ = q.shape
    q, k, v = (t.view(b, s, HEADS, H // HEADS).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, H)


class Unaligned(nn.Module):
    """`fused(x)[..., 1:H+1]`: a slice no rule keeps split, so the output is gathered."""

    def __init__(self) -> None:
        super().__init__()
        self.fused, self.out = nn.Linear(H, 3 * H), nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fused(x)[..., 1 : H + 1])


class Chunked(nn.Module):
    """A fused qkv cut by `chunk`."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(H, 3 * H), nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(_attn(*self.qkv(x).chunk(3, dim=-1)))


class Sliced(nn.Module):
    """A fused qkv cut by slices on block boundaries (Phi-3 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(H, 3 * H), nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        return self.out(_attn(qkv[..., :H], qkv[..., H : 2 * H], qkv[..., 2 * H :]))


class Unbound(nn.Module):
    """A fused qkv viewed as (B, S, 3, heads, head_dim) and unbound."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(H, 3 * H), nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, H // HEADS).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, s, H))


class FusedGQA(nn.Module):
    """A grouped-query fused qkv (H + 2 * 2 heads' widths) cut by unequal slices or by
    `split` with sizes (Phi-3 style), key/value heads repeated by repeat_interleave."""

    def __init__(self, by: str) -> None:
        super().__init__()
        self.by, self.kv = by, 2 * (H // HEADS)
        self.qkv, self.out = nn.Linear(H, H + 2 * self.kv), nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv, kv = self.qkv(x), self.kv
        if self.by == "slice":
            q, k, v = qkv[..., :H], qkv[..., H : H + kv], qkv[..., H + kv :]
        else:
            q, k, v = qkv.split([H, kv, kv], dim=-1)
        q = q.view(b, s, HEADS, H // HEADS).transpose(1, 2)
        k, v = (t.view(b, s, 2, H // HEADS).transpose(1, 2) for t in (k, v))
        k, v = (t.repeat_interleave(HEADS // 2, dim=1) for t in (k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, s, H))


class MergedHeads(nn.Module):
    """BLOOM's attention: (B, heads) merged into one dim for baddbmm (ALiBi's slopes as
    its input) and bmm, the scores viewed back to (B, heads, S, S) in between."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(H, H) for _ in range(4))
        slopes = torch.tensor([2.0 ** -(i + 1) for i in range(HEADS)])
        self.register_buffer("slopes", slopes[:, None, None])  # (heads, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        hd = H // HEADS
        q, k, v = (f(x).view(b, s, HEADS, hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        alibi = (self.slopes * torch.arange(s, dtype=x.dtype)).expand(b, HEADS, 1, s)
        scores = torch.baddbmm(
            alibi.reshape(b * HEADS, 1, s),
            q.reshape(b * HEADS, s, hd),
            k.reshape(b * HEADS, s, hd).transpose(1, 2),
            alpha=hd**-0.5,
        ).view(b, HEADS, s, s)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.bmm(probs.view(b * HEADS, s, s), v.reshape(b * HEADS, s, hd))
        return self.out(o.view(b, HEADS, s, hd).transpose(1, 2).reshape(b, s, H))


class MatmulLinears(nn.Module):
    """An MLP whose linears are written `x @ w.T` (weight (out, in)) and `x @ w` ((in, out))."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(4 * H, H) / H**0.5)
        self.w_out = nn.Parameter(torch.randn(4 * H, H) / (4 * H) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x @ self.w_in.T) @ self.w_out


class VectorProducts(nn.Module):
    """Products with weight vectors, `h @ w` and `w @ h^T` (attention-pooling scores and a
    gate): torch promotes the vector to a matrix and drops its dim from the result. The
    rule crashed on the 1-D weight (it took it for a linear's) and named a dim -1."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(H, H), nn.Linear(H, H)
        self.score = nn.Parameter(torch.randn(H) / H**0.5)
        self.gate = nn.Parameter(torch.randn(H) / H**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.proj(x))  # (B, S, H)
        w = torch.softmax(h @ self.score, -1)  # (B, S)
        g = torch.sigmoid(self.gate @ h.transpose(1, 2))  # (B, S)
        return self.out(h * (w * g).unsqueeze(-1))


class Block(nn.Module):
    def __init__(self, mixer: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.ln, self.mix = nn.LayerNorm(H), mixer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(self.ln(x))


class LM(nn.Module):
    def __init__(self, mixer: Callable[[], nn.Module], layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, H)
        self.blocks = nn.ModuleList([Block(mixer) for _ in range(layers)])
        self.head = nn.Linear(H, VOCAB)

    def forward(self, idx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(x).flatten(0, 1), target.flatten())


MIXERS: dict[str, Callable[[], nn.Module]] = {
    "unaligned": Unaligned,
    "chunked": Chunked,
    "sliced": Sliced,
    "unbound": Unbound,
    "matmul": MatmulLinears,
    "gqa-slices": lambda: FusedGQA("slice"),
    "gqa-split": lambda: FusedGQA("split"),
    "merged-heads": MergedHeads,
    "vector": VectorProducts,
}


def _model(name: str) -> tuple[LM, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = LM(MIXERS[name])
    idx, target = torch.randint(0, VOCAB, (2, BATCH, SEQ))
    return model, (idx, target)


def _reference(name: str) -> dict:
    return reference_of(lambda: (*_model(name), {}))


Strategies = Callable[[list[str]], dict[str, LayerStrategy]]


def _uniform(s: LayerStrategy) -> Strategies:
    return lambda units: dict.fromkeys(units, s)


def _dp_after_whole_batch(units: list[str]) -> dict[str, LayerStrategy]:
    """blocks.0 (and the embedding) tp=2 on the whole batch; blocks.1 onwards dp=2."""
    whole = {"emb", "embedding", "blocks.0"}
    return {u: LayerStrategy(tp=2) if u in whole else LayerStrategy(dp=2) for u in units}


def _run(rank: int, world: int, cases: list[tuple[str, Strategies]]) -> list[dict]:
    out = []
    for name, strategies in cases:
        model, args = _model(name)
        analysis = analyze(model, args, {})
        plan = analysis.plan(strategies(analysis.units), world_size=world)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ShardWarning)
            compiled = parallelize(analysis, plan=plan, optimizer=adamw)
        got = run_steps(compiled, args, {})
        got["warnings"] = [str(w.message) for w in caught if w.category is ShardWarning]
        got["shapes"] = {k: tuple(v.shape) for k, v in compiled.module.named_parameters()}
        got["batch"] = {  # per unit, the dim-0 sizes its batch-carrying nodes run at
            LAYER.get(n).name: n.meta["val"].shape[0]
            for n in compiled.module.graph.nodes
            if PLACEMENT.get(n).batch and isinstance(n.meta.get("val"), torch.Tensor)
        }
        out.append(got)
    return out


CASES: list[tuple[str, Strategies]] = [
    ("unaligned", _uniform(LayerStrategy(tp=2))),
    ("unaligned", _uniform(LayerStrategy(tp=2, sp=True))),
    ("chunked", _uniform(LayerStrategy(tp=2))),
    ("sliced", _uniform(LayerStrategy(tp=2))),
    ("unbound", _uniform(LayerStrategy(tp=2, sp=True))),
    ("matmul", _uniform(LayerStrategy(tp=2))),
    ("chunked", _dp_after_whole_batch),
    ("gqa-slices", _uniform(LayerStrategy(tp=2, sp=True))),
    ("gqa-split", _uniform(LayerStrategy(tp=2))),
    ("merged-heads", _uniform(LayerStrategy(tp=2, sp=True))),
    ("vector", _uniform(LayerStrategy(tp=2))),
    ("vector", _uniform(LayerStrategy(tp=2, sp=True))),
]


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_run, 2, CASES)[0]


@pytest.mark.parametrize("k", range(len(CASES)), ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_exact(results: list[dict], k: int) -> None:
    name = CASES[k][0]
    check(_reference(name), results[k], f"{name} case {k}")


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 8, 9, 10, 11])
def test_kept_split(results: list[dict], k: int) -> None:
    """chunk, block slices (equal or not), split with sizes, view + unbind, matmul linears,
    (B * heads) baddbmm / bmm and products with weight vectors keep tp: no gather warned,
    and every 2-D block weight is halved on each rank."""
    got = results[k]
    assert got["warnings"] == []
    whole = {n: s for n, s in got["shapes"].items() if n.startswith("blocks.") and len(s) == 2}
    model, _ = _model(CASES[k][0])
    params = dict(model.named_parameters())
    for name, local in whole.items():
        assert local[0] * local[1] * 2 == params[name].numel(), name


def test_unaligned_gather_is_warned(results: list[dict]) -> None:
    assert any("slice" in w for w in results[0]["warnings"])


def test_data_parallel_after_whole_batch(results: list[dict]) -> None:
    batch = results[6]["batch"]
    assert batch["blocks.0"] == BATCH
    assert batch["blocks.1"] == BATCH // 2
    assert batch["head"] == BATCH // 2


def test_check_program_names_unit_and_node() -> None:
    """A batch-carrying node left whole in a dp=2 unit is refused by unit and node name."""
    model, args = _model("chunked")
    analysis = analyze(model, args, {})
    plan = analysis.plan(_uniform(LayerStrategy(dp=2))(analysis.units), world_size=2)
    gm, ctx = analysis.graph_module, analysis.context
    ctx.target = RewriteTarget(plan, rank=0, codegen=False)
    gm = run_passes(gm, ctx, (shard, insert_collectives, check_program))  # consistent: passes
    node = next(n for n in gm.graph.nodes if n.name == "layer_norm_1")
    PLACEMENT.set(node, dataclasses.replace(PLACEMENT.get(node), dp=Replicate()))
    with pytest.raises(ProgramMismatch, match=r"unit 'blocks.1', node 'layer_norm_1'.*dp=2"):
        check_program.fn(gm, ctx)


# -- fewer key/value heads than tp ----------------------------------------------------------

GQA = TINY_HF["llama"]  # 4 query heads, 2 key/value heads
MQA = TINY_HF["llama"].replace("num_key_value_heads=2", "num_key_value_heads=1")
KV_CASES = [
    (GQA, LayerStrategy(tp=4)),
    (GQA, LayerStrategy(tp=4, sp=True, recompute=Recompute.FULL)),
    (MQA, LayerStrategy(tp=2, dp=2, dp_mode=DPMode.ZERO3)),
    (MQA, LayerStrategy(tp=4, sp=True)),
]


def _run_kv(rank: int, world: int) -> list[dict]:
    out = []
    for spec, s in KV_CASES:
        model, args, kwargs = build(spec, batch=8, seq=16)
        analysis = analyze(model, args, kwargs)
        plan = analysis.plan(s, world_size=world)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ShardWarning)
            compiled = parallelize(analysis, plan=plan, optimizer=adamw)
        got = run_steps(compiled, args, kwargs)
        got["warnings"] = [str(w.message) for w in caught if w.category is ShardWarning]
        got["shapes"] = {k: tuple(v.shape) for k, v in compiled.module.named_parameters()}
        out.append(got)
    return out


@pytest.fixture(scope="module")
def kv_results() -> list[dict]:
    return run_ranks(_run_kv, 4)[0]


@pytest.mark.parametrize("k", range(len(KV_CASES)))
def test_fewer_kv_heads_than_tp(kv_results: list[dict], k: int) -> None:
    """Megatron's layout: each rank keeps the key/value heads its query heads use (here
    computed whole on every TP rank), queries and the MLP split as usual; exact, nothing
    gathered, and the query projection split tp ways."""
    spec, s = KV_CASES[k]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(reference(spec), kv_results[k], f"{spec} {s}")
    got = kv_results[k]
    assert got["warnings"] == []
    if s.dp_mode != DPMode.ZERO3:  # ZeRO-3 keeps the unit in one flat shard
        q = got["shapes"]["model.layers.0.self_attn.q_proj.weight"]
        assert q[0] * s.tp == 64


def test_search_prices_tp_beyond_kv_heads() -> None:
    """tp = 4 over 2 key/value heads is priced (not refused) and uses whole kv projections."""
    model, args, kwargs = build(GQA, batch=8, seq=16)
    analysis = analyze(model, args, kwargs)
    terms = model_terms(analysis, load_cluster("a100-80gb-sxm"), [1, 2, 4])
    assert 4 not in terms.refused, terms.refused
    assert 4 in terms.tps()
    with pytest.raises(PlanError, match="Ulysses"):  # its all-to-all splits the kv heads
        analysis.plan(LayerStrategy(tp=4, ulysses=True), world_size=4)


# -- a value without the batch, crossing into more data-parallel replicas ---------------------


class PositionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(H), nn.Linear(H, 2 * H), nn.Linear(2 * H, H)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.ln(x + pos))))


class PositionLM(nn.Module):
    """A learned (S, H) table projected once in the embedding segment and added in every
    block: a value that needs a gradient and does not carry the batch, read by every layer
    (T5's relative position bias and, its batch lost, decoder input embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, H)
        self.pos = nn.Parameter(torch.randn(SEQ, H) * 0.5)
        self.pos_proj = nn.Linear(H, H)
        self.blocks = nn.ModuleList([PositionBlock() for _ in range(2)])
        self.head = nn.Linear(H, VOCAB)

    def forward(self, idx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, pos = self.emb(idx), self.pos_proj(self.pos)  # (B, S, H), (S, H)
        for block in self.blocks:
            x = block(x, pos)
        return F.cross_entropy(self.head(x).flatten(0, 1), target.flatten())


def _position_lm() -> tuple[PositionLM, tuple[torch.Tensor, torch.Tensor], dict]:
    torch.manual_seed(0)
    return PositionLM(), tuple(torch.randint(0, VOCAB, (2, BATCH, SEQ))), {}


POSITION_PLANS = {  # (segments, layers[, pipeline])
    "tp4 -> tp2 dp2": (LayerStrategy(tp=4), LayerStrategy(tp=2, dp=2)),
    "dp4 -> tp2 dp2": (LayerStrategy(dp=4), LayerStrategy(tp=2, dp=2)),
    "tp2 dp2 -> strided": (
        LayerStrategy(tp=2, dp=2),
        LayerStrategy(tp=2, dp=2, tp_consecutive=False),
    ),
    "tp2 dp2 -> tp4": (LayerStrategy(tp=2, dp=2), LayerStrategy(tp=4)),
    # blocks.1 on stage 1 (ranks 2, 3) reads the table from stage 0's embedding: the sum's
    # group moves with the stage's ranks
    "pp2, tp2 -> dp2": (
        LayerStrategy(tp=2),
        LayerStrategy(dp=2),
        PipelineConfig(degree=2, stage_starts=("blocks.1",), micro_batches=2),
    ),
}


def _position_plan(analysis: Analysis, name: str, world: int) -> Plan:
    segments, layers, *pipeline = POSITION_PLANS[name]
    units = {u: layers if u.startswith("blocks.") else segments for u in analysis.units}
    return analysis.plan(units, world_size=world, pipeline=pipeline[0] if pipeline else None)


def _run_position(rank: int, world: int) -> list[dict]:
    model, args, kwargs = _position_lm()
    analysis = analyze(model, args, kwargs)
    out = []
    for name in POSITION_PLANS:
        plan = _position_plan(analysis, name, world)
        if plan.pipeline.degree > 1:  # lowered from the capture of one micro-batch
            compiled = gfx.compile(*_position_lm()[:2], plan=plan, optimizer=adamw)
        else:
            compiled = parallelize(analysis.copy(), plan=plan, optimizer=adamw)
        out.append(run_steps(compiled, args, kwargs))
    return out


@pytest.fixture(scope="module")
def position_results() -> list[dict]:
    return run_ranks(_run_position, 4)[0]


@pytest.mark.parametrize("k", range(len(POSITION_PLANS)), ids=list(POSITION_PLANS))
def test_value_without_the_batch_into_other_dp_replicas(
    position_results: list[dict], k: int
) -> None:
    ref = reference_of(_position_lm)
    check(ref, position_results[k], list(POSITION_PLANS)[k])


def test_its_switch_sums_the_gradient_over_the_dp_group() -> None:
    """tp4 -> tp2 x dp2: the table's switch into blocks.0 all-reduces its gradient over
    rank 0's dp group (0, 2), unscaled; the batch-carrying stream needs no sum."""
    model, args, kwargs = _position_lm()
    analysis = analyze(model, args, kwargs)
    plan = _position_plan(analysis, "tp4 -> tp2 dp2", 4)
    gm, ctx = analysis.graph_module, analysis.context
    ctx.target = RewriteTarget(plan, rank=0, codegen=False)
    gm = run_passes(gm, ctx, (shard, insert_collectives))
    switches = {
        tuple(n.args[0].meta["val"].shape): n.args[2:]
        for n in gm.graph.nodes
        if n.target is C.switch_layout and LAYER.get(n).name == "blocks.0"
    }
    assert switches[(SEQ, H)] == ((("reduce", (0, 2)),), 1.0)
    assert switches[(BATCH, SEQ, H)] == ((("gather", 0, (0, 2)),), 1.0)

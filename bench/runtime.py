"""Runtime speed: galvatron_fx's compiled train step against PyTorch's own parallelism.

Three cases, each run on forked gloo CPU ranks with the same GPT, the same global batch, the
same initial weights and the same AdamW (lr 1e-3):

| case  | ours (a uniform Plan)               | PyTorch                                          |
|-------|-------------------------------------|--------------------------------------------------|
| dp    | `LayerStrategy(dp=world)`, 25 MB    | `DistributedDataParallel` (default 25 MB buckets) |
| zero3 | `LayerStrategy(dp=world, zero3)`    | FSDP2 `fully_shard` on every block, then the root |
| tp    | `LayerStrategy(tp=world)`           | DTensor `parallelize_module`, Megatron col/row    |
| pp    | `world` stages, 1F1B, 4 micro-batches | the GPT split by hand into `world` modules,    |
|       |                                     | `PipelineStage` + `Schedule1F1B`                  |

A step is forward, backward, gradient sync, optimizer step and zero_grad. Both sides of a case
are built in the same ranks (one set of forked processes per case) and their steps run in
turns, each started by a barrier, so a noisy machine slows both alike. A step's time is the
slowest rank's; the figure is the median over the timed steps (the table also shows the
fastest-slowest range). The ratio is ours / PyTorch's: <= 1.0 means galvatron_fx is not
slower than PyTorch's implementation of the same parallelism. The first step's loss (before
any update) of both sides is printed and checked to agree to 1e-4 (a MISMATCH is flagged:
the two sides would not be training the same thing). A baseline that fails on this torch
reads "n/a" and the output says why.

    python bench/runtime.py                      # GPT 4 x 256, seq 128, batch 8, 2 ranks
    python bench/runtime.py --world 4 --steps 20
    python bench/runtime.py --smoke              # tiny model, 2 steps: for the test suite
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch._dynamo  # creating an optimizer imports it: import once, before forking
import torch.distributed as dist
import torch.distributed._functional_collectives  # registers the raw ops' autograd
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from galvatron_fx.compile import analyze, compile
from galvatron_fx.models.gpt import GPT, CausalSelfAttention
from galvatron_fx.models.spec import parse_model_spec
from galvatron_fx.plan import DPMode, LayerStrategy, PipelineConfig
from galvatron_fx.runtime.launch import fork_ranks as launch

CASES = ("dp", "zero3", "tp", "pp")
MICRO_BATCHES = 4
"""pp: 1F1B over this many micro-batches, one stage per rank, blocks cut evenly."""
HEADER = ("ours ms/step", "PyTorch ms/step", "ratio", "ours range", "PyTorch range")
LOSS_TOL = 1e-4
Step = Callable[[], float]
Timed = tuple[float, float, list[float]]
"""One rank's (first-step loss, last-step loss, seconds per timed step)."""


@dataclass(frozen=True)
class Config:
    layers: int = 4
    hidden: int = 256
    heads: int = 8
    vocab: int = 1024
    seq: int = 128
    batch: int = 8
    """Global batch: split over the ranks for dp/zero3, whole on every rank for tp."""
    world: int = 2
    warmup: int = 2
    steps: int = 10

    @property
    def spec(self) -> str:
        return (
            f"gpt:layers={self.layers},hidden={self.hidden},heads={self.heads},"
            f"vocab={self.vocab},seq={self.seq}"
        )


SMOKE = Config(layers=2, hidden=64, heads=4, vocab=128, seq=32, batch=4, warmup=1, steps=2)


@dataclass
class SideResult:
    first_loss: float
    """Mean over ranks of the first step's loss (each rank's own slice for dp/zero3)."""
    last_loss: float
    step_ms: float
    """Median over steps of the slowest rank's step time."""
    range_ms: tuple[float, float]
    """The fastest and slowest of those steps: how noisy the machine was."""


# ---------------------------------------------------------------------------------------
# model, batch and timing, the same for both sides


def _model_and_batch(cfg: Config) -> tuple[GPT, torch.Tensor, torch.Tensor]:
    spec = parse_model_spec(cfg.spec)
    torch.manual_seed(0)
    model = spec.build("cpu")
    torch.manual_seed(1)
    (idx,), kwargs = spec.example_inputs(model, cfg.batch, cfg.seq)
    assert isinstance(model, GPT)
    return model, idx, kwargs["targets"]


def _timed_step(step: Step) -> tuple[float, float]:
    """(loss, seconds) of one step, started on all ranks together."""
    dist.barrier()
    start = time.perf_counter()
    loss = step()
    return loss, time.perf_counter() - start


def _interleaved(steps: list[Step], cfg: Config) -> list[Timed]:
    """Run the sides' steps in turns (the first side first on even steps, last on odd ones),
    so that a noisy machine slows every side alike; each side's `Timed`."""
    out: list[Timed] = [(step(), 0.0, []) for step in steps]
    for _ in range(cfg.warmup - 1):
        for step in steps:
            step()
    for i in range(cfg.steps):
        order = range(len(steps)) if i % 2 == 0 else reversed(range(len(steps)))
        for k in order:
            loss, dt = _timed_step(steps[k])
            out[k] = (out[k][0], loss, [*out[k][2], dt])
    dist.barrier()
    return out


def _built(build: Callable[[], Step]) -> Step | str:
    """The side's step function, or why it could not be built (on every rank alike)."""
    try:
        return build()
    except Exception as err:
        return f"{type(err).__name__}: {err}".splitlines()[0]


def _torch_step(model: nn.Module, opt: torch.optim.Optimizer, idx: Any, tgt: Any) -> Step:
    def step() -> float:
        loss = model(idx, targets=tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.item())

    return step


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def _rank_slice(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world)[rank]  # the slice galvatron_fx's train_step keeps on this rank


# ---------------------------------------------------------------------------------------
# our side


_STRATEGY = {
    "dp": lambda w: LayerStrategy(dp=w),
    "zero3": lambda w: LayerStrategy(dp=w, dp_mode=DPMode.ZERO3),
    "tp": lambda w: LayerStrategy(tp=w),  # segments (embeddings, head) run replicated
}


def _even_starts(layers: int, world: int) -> tuple[str, ...]:
    """The first block of every stage after the first: the blocks cut evenly."""
    if layers % world:
        raise ValueError(f"pp: {world} stages must divide the {layers} blocks")
    return tuple(f"blocks.{k * layers // world}" for k in range(1, world))


def ours(rank: int, world: int, case: str, cfg: Config) -> Step:
    model, idx, tgt = _model_and_batch(cfg)
    args, kwargs = (idx,), {"targets": tgt}
    analysis = analyze(model, args, kwargs)
    if case == "pp":
        starts = _even_starts(cfg.layers, world)
        pipeline = PipelineConfig(degree=world, stage_starts=starts, micro_batches=MICRO_BATCHES)
        plan = analysis.plan(LayerStrategy(), world_size=world, pipeline=pipeline)
    else:
        plan = analysis.plan(_STRATEGY[case](world), world_size=world)
    cm = compile(model, args, kwargs, plan=plan, optimizer=_adamw, bucket_mb=25)
    return lambda: float(cm.train_step(*args, **kwargs).item())


# ---------------------------------------------------------------------------------------
# PyTorch's side


def ddp(rank: int, world: int, cfg: Config) -> Step:
    model, idx, tgt = _model_and_batch(cfg)
    ddp_model = DistributedDataParallel(model)  # bucket_cap_mb=25 by default
    idx, tgt = _rank_slice(idx, rank, world), _rank_slice(tgt, rank, world)
    return _torch_step(ddp_model, _adamw(ddp_model.parameters()), idx, tgt)


def fsdp2(rank: int, world: int, cfg: Config) -> Step:
    model, idx, tgt = _model_and_batch(cfg)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    idx, tgt = _rank_slice(idx, rank, world), _rank_slice(tgt, rank, world)
    return _torch_step(model, _adamw(model.parameters()), idx, tgt)


class LocalHeadsAttention(CausalSelfAttention):
    """The reference attention with the head count taken from the local qkv width.

    The DTensor baseline keeps the fused `qkv` Linear (the same GEMM shapes as the reference
    and as our TP rewrite), with its output rows permuted from [q | k | v] to
    [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], so ColwiseParallel's even split of dim 0 gives rank r
    exactly the q, k and v rows of its heads. The reference's `split(C)` and
    `view(B, T, num_heads, hd)` bake in global sizes that the local output no longer has;
    here `chunk(3)` and `view(B, T, -1, hd)` take local sizes, as Megatron and torchtitan
    do. We chose this over `use_local_output=False` (DTensor outputs through split/view),
    which would redistribute activations and measure DTensor's propagation, not the usual
    Megatron-style TP. With tp=1 the permutation is the identity: the same model exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, h), replicated
        hd = C // self.num_heads
        q, k, v = self.qkv(x).chunk(3, dim=2)  # (B, T, h / tp) each
        q = q.view(B, T, -1, hd).transpose(1, 2)  # (B, nh / tp, T, hs)
        k = k.view(B, T, -1, hd).transpose(1, 2)
        v = v.view(B, T, -1, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, h / tp)
        return self.resid_dropout(self.proj(y))


def _local_heads_gpt(model: GPT, tp: int) -> GPT:
    """Swap every block's attention for `LocalHeadsAttention` with permuted qkv rows."""
    C = model.config.hidden
    if model.config.num_heads % tp:
        raise ValueError(f"tp={tp} must divide the {model.config.num_heads} heads")
    for block in model.blocks:
        state = block.attn.state_dict()
        w, b = state["qkv.weight"], state["qkv.bias"]
        state["qkv.weight"] = w.view(3, tp, C // tp, C).transpose(0, 1).reshape(3 * C, C)
        state["qkv.bias"] = b.view(3, tp, C // tp).transpose(0, 1).reshape(3 * C)
        attn = LocalHeadsAttention(model.config)
        attn.load_state_dict(state)
        block.attn = attn
    return model


def dtensor_tp(rank: int, world: int, cfg: Config) -> Step:
    model, idx, tgt = _model_and_batch(cfg)
    model = _local_heads_gpt(model, world)
    mesh = init_device_mesh("cpu", (world,))
    layout = {
        "attn.qkv": ColwiseParallel(),
        "attn.proj": RowwiseParallel(),
        "mlp.fc": ColwiseParallel(),
        "mlp.proj": RowwiseParallel(),
    }
    for block in model.blocks:
        parallelize_module(block, mesh, layout)
    return _torch_step(model, _adamw(model.parameters()), idx, tgt)


class _Stage(nn.Module):
    """A contiguous piece of the GPT, written by hand as a pipelining user would: the first
    piece embeds, the last one ends with the final norm and the head (logits out)."""

    def __init__(self, model: GPT, first: int, stop: int, last: bool) -> None:
        super().__init__()
        self.embed = (model.wte, model.wpe, model.drop) if first == 0 else None
        if self.embed is not None:
            self.wte, self.wpe, self.drop = self.embed
        self.blocks = nn.ModuleList(model.blocks[first:stop])
        self.ln_f, self.lm_head = (model.ln_f, model.lm_head) if last else (None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.drop(self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device)))
        for block in self.blocks:
            x = block(x)
        if self.lm_head is not None and self.ln_f is not None:
            x = self.lm_head(self.ln_f(x))
        return x


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def torch_pipeline(rank: int, world: int, cfg: Config) -> Step:
    """The same stages and schedule with `torch.distributed.pipelining` directly."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    model, idx, tgt = _model_and_batch(cfg)
    _even_starts(cfg.layers, world)
    per = cfg.layers // world
    stage = _Stage(model, rank * per, (rank + 1) * per, rank == world - 1)
    mb = cfg.batch // MICRO_BATCHES
    hidden = torch.zeros(mb, cfg.seq, cfg.hidden, requires_grad=True)
    # activations that need gradients are what make the stages exchange them in backward
    example_in = idx[:mb] if rank == 0 else hidden
    example_out = torch.zeros(mb, cfg.seq, cfg.vocab) if rank == world - 1 else hidden
    pipe = PipelineStage(stage, rank, world, torch.device("cpu"), example_in, example_out)
    schedule = Schedule1F1B(pipe, MICRO_BATCHES, loss_fn=_cross_entropy)
    opt = _adamw(stage.parameters())
    last = rank == world - 1

    def step() -> float:
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(idx, target=tgt if last else None, losses=losses)
        else:
            schedule.step(target=tgt if last else None, losses=losses)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = torch.stack(losses).mean().detach() if losses else torch.zeros(())
        dist.broadcast(loss, src=world - 1)  # every rank reports the loss, as ours does
        return float(loss.item())

    return step


BASELINES: dict[str, tuple[str, Callable[..., Step]]] = {
    "dp": ("DDP", ddp),
    "zero3": ("FSDP2", fsdp2),
    "tp": ("DTensor TP", dtensor_tp),
    "pp": ("pipelining", torch_pipeline),
}


# ---------------------------------------------------------------------------------------
# driver


def sides(rank: int, world: int, case: str, cfg: Config, which: str) -> list[Timed | str]:
    """One rank's results for ours and/or PyTorch's side of `case` (`which`: "both", "ours"
    or "torch"), built in this order and timed in turns; a string says why a side failed."""
    makers = {
        "ours": lambda: ours(rank, world, case, cfg),
        "torch": lambda: BASELINES[case][1](rank, world, cfg),
    }
    built = [_built(makers[k]) for k in (("ours", "torch") if which == "both" else (which,))]
    ok = torch.tensor([int(not isinstance(x, str)) for x in built])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # a side that failed on any rank runs nowhere
    built = [
        x if isinstance(x, str) or f else "failed on another rank"
        for x, f in zip(built, ok, strict=True)
    ]
    timed = iter(_interleaved([b for b in built if not isinstance(b, str)], cfg))
    return [b if isinstance(b, str) else next(timed) for b in built]


def _summarise(per_rank: list[Timed | str]) -> SideResult | str:
    failed = [r for r in per_rank if isinstance(r, str)]
    if failed:  # the rank that failed first says why; its peers only saw it go
        own = [r for r in failed if "another rank" not in r and "closed by peer" not in r]
        return (own or failed)[0]
    timed = [r for r in per_rank if not isinstance(r, str)]
    first = statistics.fmean(r[0] for r in timed)
    last = statistics.fmean(r[1] for r in timed)
    slowest = [max(ts) for ts in zip(*(r[2] for r in timed), strict=True)]
    ms = [1e3 * t for t in slowest]
    return SideResult(first, last, statistics.median(ms), (min(ms), max(ms)))


def _last_line(err: Exception) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else repr(err)


def run_case(case: str, cfg: Config) -> tuple[SideResult | str, SideResult | str]:
    """(ours, PyTorch's) for one case; a string says why that side did not run. Both sides
    run in the same ranks, in turns; if that job dies (a side failed inside a collective),
    each side runs alone so the other's figure survives."""
    try:
        per_rank = launch(sides, cfg.world, case, cfg, "both")
    except Exception:
        return _alone(case, cfg)
    return _summarise([r[0] for r in per_rank]), _summarise([r[1] for r in per_rank])


def _alone(case: str, cfg: Config) -> tuple[SideResult | str, SideResult | str]:
    out = []
    for which in ("ours", "torch"):
        try:
            out.append(_summarise([r[0] for r in launch(sides, cfg.world, case, cfg, which)]))
        except Exception as err:
            out.append(_last_line(err))
    return out[0], out[1]


def _ratio(a: SideResult | str, b: SideResult | str) -> str:
    if isinstance(a, str) or isinstance(b, str):
        return "n/a"
    return f"{a.step_ms / b.step_ms:.2f}"


def _ms(r: SideResult | str) -> str:
    return "n/a" if isinstance(r, str) else f"{r.step_ms:.1f}"


def _range(r: SideResult | str) -> str:
    return "" if isinstance(r, str) else f"{r.range_ms[0]:.0f}-{r.range_ms[1]:.0f}"


def _loss_line(case: str, a: SideResult | str, b: SideResult | str) -> str:
    if isinstance(a, str) or isinstance(b, str):
        return f"  {case}: first-step loss not compared (a side failed)"
    diff = abs(a.first_loss - b.first_loss)
    verdict = "ok" if diff <= LOSS_TOL else f"MISMATCH (> {LOSS_TOL:g}): not apples to apples"
    last = f"(last step: {a.last_loss:.6f} vs {b.last_loss:.6f})"
    return f"  {case}: ours {a.first_loss:.6f}  PyTorch {b.first_loss:.6f}  |diff| {diff:.1e}  {verdict} {last}"


def report(cfg: Config, results: dict[str, tuple[SideResult | str, SideResult | str]]) -> None:
    print(f"model: {cfg.spec}  global batch {cfg.batch}  world {cfg.world} (gloo, CPU)")
    print(f"warm-up {cfg.warmup}, timed {cfg.steps} steps; median of the slowest rank per step\n")
    row = "{:<7}{:<12}{:>14}{:>17}{:>8}{:>13}{:>15}".format
    print(row("case", "baseline", *HEADER))
    for case, (a, b) in results.items():
        print(row(case, BASELINES[case][0], _ms(a), _ms(b), _ratio(a, b), _range(a), _range(b)))
    print("\nfirst-step loss (before any update):")
    for case, (a, b) in results.items():
        print(_loss_line(case, a, b))
    for case, (a, b) in results.items():
        for side, r in (("ours", a), ("PyTorch", b)):
            if isinstance(r, str):
                print(f"  {case} ({side}) did not run: {r}")
    ratios = "  ".join(f"{case} {_ratio(a, b)}" for case, (a, b) in results.items())
    print(f"\nratios (ours / PyTorch, <= 1.0: not slower): {ratios}")


def _config(opts: argparse.Namespace) -> Config:
    sizes = ("layers", "hidden", "heads", "batch", "seq", "world", "steps")
    return Config(**{k: getattr(opts, k) for k in sizes}, warmup=max(1, opts.warmup))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 warm-up, 2 steps")
    default = Config()
    for name in ("world", "layers", "hidden", "heads", "batch", "seq", "steps", "warmup"):
        parser.add_argument(f"--{name}", type=int, default=getattr(default, name))
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset")
    opts = parser.parse_args()
    cfg = SMOKE if opts.smoke else _config(opts)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    cases = [c for c in opts.cases.split(",") if c]
    if unknown := set(cases) - set(CASES):
        parser.error(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    report(cfg, {case: run_case(case, cfg) for case in cases})


if __name__ == "__main__":
    main()

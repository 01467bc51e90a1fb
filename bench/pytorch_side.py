"""The runtime benchmark's shared model and PyTorch's side of every case.

Both sides of a case build the same GPT (`Config`, seeded), the same global batch and the same
AdamW; this module holds what PyTorch's own parallelism needs (DDP, FSDP2, DTensor tensor and
sequence parallelism, `torch.distributed.pipelining`), written as a user of each would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives  # registers the raw ops' autograd
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from galvatron_fx.models.gpt import GPT, CausalSelfAttention
from galvatron_fx.models.spec import parse_model_spec
from galvatron_fx.runtime.profiler import ProfileConfig, profile

MICRO_BATCHES = 4
"""pp: 1F1B over this many micro-batches, one stage per rank, blocks cut evenly."""
Step = Callable[[], float]


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
    device: str = "cpu"
    """`cuda`: one GPU per rank over NCCL (`bench/gpu.sh`)."""

    @property
    def spec(self) -> str:
        return (
            f"gpt:layers={self.layers},hidden={self.hidden},heads={self.heads},"
            f"vocab={self.vocab},seq={self.seq}"
        )


SMOKE = Config(layers=2, hidden=64, heads=4, vocab=128, seq=32, batch=4, warmup=1, steps=2)


def device(cfg: Config) -> torch.device:
    """This rank's device: its GPU under NCCL (`fork_ranks` set it), else the CPU."""
    if cfg.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seeded(spec_text: str, batch: int, seq: int | None = None) -> tuple[Any, tuple, dict]:
    """The model of `spec_text` and an example batch, seeded: the same on every rank, in
    every benchmark and on every run (built on the CPU)."""
    spec = parse_model_spec(spec_text)
    torch.manual_seed(0)
    model = spec.build("cpu")
    torch.manual_seed(1)
    args, kwargs = spec.example_inputs(model, batch, seq)
    return model, args, kwargs


def ensure_profile(path: Path, world: int, smoke: bool) -> None:
    """Profile this machine on `world` ranks into `path` unless it is there (`smoke`: a
    quick profile with small messages, for the test suite)."""
    if path.exists():
        return
    quick = ProfileConfig(world, 2**20, 2, (128, 256), 8 * 2**20)
    profile(quick if smoke else ProfileConfig(world, 16 * 2**20)).save(path)


def model_and_batch(cfg: Config) -> tuple[GPT, torch.Tensor, torch.Tensor]:
    """The seeded GPT and batch, on this rank's device."""
    model, (idx,), kwargs = seeded(cfg.spec, cfg.batch, cfg.seq)
    assert isinstance(model, GPT)
    on = device(cfg)
    return model.to(on), idx.to(on), kwargs["targets"].to(on)


def _torch_step(model: nn.Module, opt: torch.optim.Optimizer, idx: Any, tgt: Any) -> Step:
    def step() -> float:
        loss = model(idx, targets=tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.item())

    return step


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def _rank_slice(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world)[rank]  # the slice galvatron_fx's train_step keeps on this rank


def even_starts(layers: int, world: int) -> tuple[str, ...]:
    """The first block of every stage after the first: the blocks cut evenly."""
    if layers % world:
        raise ValueError(f"pp: {world} stages must divide the {layers} blocks")
    return tuple(f"blocks.{k * layers // world}" for k in range(1, world))


def ddp(rank: int, world: int, cfg: Config) -> Step:
    model, idx, tgt = model_and_batch(cfg)
    ddp_model = DistributedDataParallel(model)  # bucket_cap_mb=25; device from the model
    idx, tgt = _rank_slice(idx, rank, world), _rank_slice(tgt, rank, world)
    return _torch_step(ddp_model, adamw(ddp_model.parameters()), idx, tgt)


def fsdp2(rank: int, world: int, cfg: Config) -> Step:
    model, idx, tgt = model_and_batch(cfg)
    mesh = init_device_mesh(cfg.device, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    idx, tgt = _rank_slice(idx, rank, world), _rank_slice(tgt, rank, world)
    return _torch_step(model, adamw(model.parameters()), idx, tgt)


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
    model, idx, tgt = model_and_batch(cfg)
    model = _local_heads_gpt(model, world)
    mesh = init_device_mesh(cfg.device, (world,))
    layout = {
        "attn.qkv": ColwiseParallel(),
        "attn.proj": RowwiseParallel(),
        "mlp.fc": ColwiseParallel(),
        "mlp.proj": RowwiseParallel(),
    }
    for block in model.blocks:
        parallelize_module(block, mesh, layout)
    return _torch_step(model, adamw(model.parameters()), idx, tgt)


def dtensor_sp(rank: int, world: int, cfg: Config) -> Step:
    """Megatron sequence parallelism as torchtitan writes it: the residual stream between
    the blocks is a DTensor sharded on the sequence, the norms run on their shard
    (`SequenceParallel`), attention and MLP gather it (`PrepareModuleInput`) and their row
    linears reduce-scatter back to it. The embeddings and the head stay replicated, as in
    our `tp=w, sp` plan (its segments are not split)."""
    model, idx, tgt = model_and_batch(cfg)
    model = _local_heads_gpt(model, world)
    mesh = init_device_mesh(cfg.device, (world,))
    gather = PrepareModuleInput(
        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
    )
    layout = {
        "ln_1": SequenceParallel(),
        "attn": gather,
        "attn.qkv": ColwiseParallel(),
        "attn.proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "ln_2": SequenceParallel(),
        "mlp": gather,
        "mlp.fc": ColwiseParallel(),
        "mlp.proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }
    for block in model.blocks:
        parallelize_module(block, mesh, layout)
    into = PrepareModuleInput(
        input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=False
    )
    parallelize_module(model.blocks[0], mesh, into)
    parallelize_module(model.ln_f, mesh, gather)
    return _torch_step(model, adamw(model.parameters()), idx, tgt)


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

    model, idx, tgt = model_and_batch(cfg)
    even_starts(cfg.layers, world)
    per = cfg.layers // world
    stage = _Stage(model, rank * per, (rank + 1) * per, rank == world - 1)
    mb = cfg.batch // MICRO_BATCHES
    hidden = torch.zeros(mb, cfg.seq, cfg.hidden, device=device(cfg), requires_grad=True)
    # activations that need gradients are what make the stages exchange them in backward
    example_in = idx[:mb] if rank == 0 else hidden
    example_out = (
        torch.zeros(mb, cfg.seq, cfg.vocab, device=device(cfg)) if rank == world - 1 else hidden
    )
    pipe = PipelineStage(stage, rank, world, device(cfg), example_in, example_out)
    schedule = Schedule1F1B(pipe, MICRO_BATCHES, loss_fn=_cross_entropy)
    opt = adamw(stage.parameters())
    last = rank == world - 1

    def step() -> float:
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(idx, target=tgt if last else None, losses=losses)
        else:
            schedule.step(target=tgt if last else None, losses=losses)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = torch.stack(losses).mean().detach() if losses else torch.zeros((), device=idx.device)
        dist.broadcast(loss, src=world - 1)  # every rank reports the loss, as ours does
        return float(loss.item())

    return step

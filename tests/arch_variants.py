"""Small transformer LMs assembled from the building blocks of popular decoder families.

A `Variant` is a frozen choice of blocks; `build_variant(v)` gives a seeded model whose
`forward(idx, targets)` returns the mean cross-entropy, and its example inputs. Every block
is written the way its family writes it, since the compiler sees the ATen ops the code
lowers to, not the idea:

- fused q/k/v split by `chunk` (GPT-NeoX), `split` (nanoGPT), slicing (Falcon, Phi),
  `view` + `unbind` (timm/Falcon), or three separate projections (Llama);
- multi-head, multi-query (one key/value head) and grouped-query attention (2 key/value heads
  for 4 query heads), key/value heads repeated by `expand` + `reshape` (HF `repeat_kv`) or
  `repeat_interleave`;
- rotary embeddings, half-split `rotate_half` (Llama), interleaved pairs (GPT-J) or partial
  (`rotary_dim < head_dim`, GPT-NeoX/Phi); ALiBi added through `torch.baddbmm` (BLOOM);
  learned (GPT-2) and sinusoidal (the original Transformer) absolute positions;
- pre- and post-norm; parallel attention + MLP from one norm (GPT-J/NeoX);
- SwiGLU (Llama) or GELU MLPs; eager attention (matmul, causal mask by `masked_fill` or by
  an additive mask, softmax) or `F.scaled_dot_product_attention`;
- biases on or off; LayerNorm, a hand-written RMSNorm (Llama's, in float32 and back by
  `type_as`) or `nn.RMSNorm`; a tied or untied head; linears as `x @ self.weight.T` with
  plain `nn.Parameter`s; the final norm and head registered before the blocks.

Plain `nn.Module`s: nothing here imports the compiler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BLOCKS", "Variant", "build_variant", "variant_problems"]

Qkv = Literal["chunk", "split", "slice", "unbind", "separate"]
Positions = Literal[
    "learned", "sinusoidal", "rope_half", "rope_interleaved", "rope_partial", "alibi"
]
AttnKind = Literal["sdpa", "eager_masked_fill", "eager_additive"]
Norm = Literal["layernorm", "rms_hand", "rms_torch"]

HEADS, LAYERS, MAX_SEQ = 4, 2, 32


@dataclass(frozen=True)
class Variant:
    """One choice per building block (4 query heads and 2 layers always)."""

    qkv: Qkv = "split"
    """How q, k and v come out of the input: one fused projection cut by chunk / split /
    slicing / view+unbind, or three projections."""
    kv_heads: int = HEADS
    """Key/value heads: 4 (multi-head), 2 (grouped-query) or 1 (multi-query)."""
    repeat_kv: Literal["expand", "interleave"] = "expand"
    """How grouped/multi-query attention repeats k and v (unused with 4 kv heads)."""
    positions: Positions = "learned"
    """Absolute positions added to the embedding, rotary on q and k, or ALiBi biases."""
    post_norm: bool = False
    """Norm after the residual add (BERT/GPT-1) instead of before the sublayer."""
    parallel: bool = False
    """Attention and MLP read one norm of the same input and add to one residual."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    attention: AttnKind = "sdpa"
    bias: bool = True
    """Biases of the linears and of LayerNorm."""
    norm: Norm = "layernorm"
    tied: bool = False
    """The head reads the token embedding's weight."""
    matmul_linears: bool = False
    """Every linear (blocks and head) as `x @ self.weight.T (+ bias)` on `nn.Parameter`s."""
    out_of_order: bool = False
    """The final norm and the head are registered before the embedding and the blocks."""
    hidden: int = 64
    vocab: int = 128

    @property
    def name(self) -> str:
        """Short, readable, unique per variant."""
        kv = {HEADS: "mha", 1: "mqa"}.get(self.kv_heads, f"gqa{self.kv_heads}")
        if self.kv_heads != HEADS:  # x: expand + reshape, i: repeat_interleave
            kv += "x" if self.repeat_kv == "expand" else "i"
        parts = [self.qkv, kv, self.positions.replace("_", "-")]
        parts += ["post" if self.post_norm else "pre", "par" if self.parallel else "seq"]
        parts += [self.mlp, self.attention.replace("eager_", "e-").replace("_", "-")]
        parts += ["bias" if self.bias else "nobias", self.norm.replace("_", "-")]
        parts += ["tied" if self.tied else "untied"]
        parts += ["mm"] * self.matmul_linears + ["ooo"] * self.out_of_order
        return f"{'.'.join(parts)}.h{self.hidden}v{self.vocab}"


BLOCKS: dict[str, tuple[object, ...]] = {
    "qkv": ("chunk", "split", "slice", "unbind", "separate"),
    "kv_heads": (HEADS, 2, 1),
    "repeat_kv": ("expand", "interleave"),
    "positions": (
        "learned",
        "sinusoidal",
        "rope_half",
        "rope_interleaved",
        "rope_partial",
        "alibi",
    ),
    "post_norm": (False, True),
    "parallel": (False, True),
    "mlp": ("gelu", "swiglu"),
    "attention": ("sdpa", "eager_masked_fill", "eager_additive"),
    "bias": (False, True),
    "norm": ("layernorm", "rms_hand", "rms_torch"),
    "tied": (False, True),
    "matmul_linears": (False, True),
    "out_of_order": (False, True),
    "hidden": (32, 64),
    "vocab": (64, 128),
}
"""Every field's choices: a fixed set of variants must cover each one."""
assert set(BLOCKS) == {f.name for f in fields(Variant)}


def variant_problems(v: Variant) -> list[str]:
    """Why `v` is not a model (empty when it is one)."""
    out = []
    if v.qkv in ("chunk", "unbind") and v.kv_heads != HEADS:
        out.append(f"qkv={v.qkv} cuts equal pieces: needs kv_heads={HEADS}")
    if v.positions == "alibi" and v.attention == "sdpa":
        out.append("alibi adds its bias through baddbmm: needs eager attention")
    if v.kv_heads not in BLOCKS["kv_heads"]:
        out.append(f"kv_heads={v.kv_heads} is not one of {BLOCKS['kv_heads']}")
    return out


# Pieces ----------------------------------------------------------------------------------


class MatLinear(nn.Module):
    """A linear as `x @ self.weight.T`, initialised like `nn.Linear`."""

    def __init__(self, n_in: int, n_out: int, bias: bool) -> None:
        super().__init__()
        bound = 1 / math.sqrt(n_in)
        self.weight = nn.Parameter(torch.empty(n_out, n_in).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_out).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        return y + self.bias if self.bias is not None else y


def linear(v: Variant, n_in: int, n_out: int) -> nn.Module:
    return MatLinear(n_in, n_out, v.bias) if v.matmul_linears else nn.Linear(n_in, n_out, v.bias)


class HandRMSNorm(nn.Module):
    """Llama's RMSNorm: in float32, back to the input's dtype by `type_as`."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


def norm(v: Variant) -> nn.Module:
    if v.norm == "layernorm":
        return nn.LayerNorm(v.hidden, bias=v.bias)
    if v.norm == "rms_torch":
        return nn.RMSNorm(v.hidden, eps=1e-6)
    return HandRMSNorm(v.hidden)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(v: Variant, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hs); cos, sin: (T, rotary_dim), laid out for the variant's rotation."""
    if v.positions == "rope_interleaved":
        return x * cos + rotate_every_two(x) * sin
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if v.positions == "rope_partial" else x_rot


def repeat_kv(v: Variant, x: torch.Tensor) -> torch.Tensor:
    """(B, kv, T, hs) -> (B, nh, T, hs)."""
    n = HEADS // v.kv_heads
    if n == 1:
        return x
    if v.repeat_kv == "interleave":
        return x.repeat_interleave(n, dim=1)
    b, kv, t, hs = x.shape
    return x[:, :, None, :, :].expand(b, kv, n, t, hs).reshape(b, kv * n, t, hs)


# Attention ---------------------------------------------------------------------------------


class Attention(nn.Module):
    causal: torch.Tensor

    def __init__(self, v: Variant) -> None:
        super().__init__()
        self.v = v
        hs = v.hidden // HEADS
        if v.qkv == "separate":
            self.q = linear(v, v.hidden, v.hidden)
            self.k = linear(v, v.hidden, v.kv_heads * hs)
            self.v_proj = linear(v, v.hidden, v.kv_heads * hs)
        else:
            self.qkv = linear(v, v.hidden, v.hidden + 2 * v.kv_heads * hs)
        self.out = linear(v, v.hidden, v.hidden)
        if v.attention == "eager_masked_fill":
            self.register_buffer(
                "causal", torch.tril(torch.ones(MAX_SEQ, MAX_SEQ, dtype=torch.bool))
            )

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, nh, hs), k and v (B, T, kv, hs)."""
        v, (b, t, c) = self.v, x.shape
        hs, kvw = c // HEADS, self.v.kv_heads * (c // HEADS)
        if v.qkv == "separate":
            q, k, val = self.q(x), self.k(x), self.v_proj(x)
        elif v.qkv == "chunk":
            q, k, val = self.qkv(x).chunk(3, dim=-1)
        elif v.qkv == "split":
            q, k, val = self.qkv(x).split([c, kvw, kvw], dim=2)
        elif v.qkv == "slice":
            fused = self.qkv(x)
            q, k, val = fused[..., :c], fused[..., c : c + kvw], fused[..., c + kvw :]
        else:  # view + unbind
            q, k, val = self.qkv(x).view(b, t, 3, HEADS, hs).unbind(dim=2)
        return (
            q.reshape(b, t, HEADS, hs),
            k.reshape(b, t, v.kv_heads, hs),
            val.reshape(b, t, v.kv_heads, hs),
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, alibi: torch.Tensor):
        v, (b, t, c) = self.v, x.shape
        q, k, val = (y.transpose(1, 2) for y in self.project(x))  # (B, heads, T, hs)
        if v.positions.startswith("rope"):
            q, k = apply_rotary(v, q, cos, sin), apply_rotary(v, k, cos, sin)
        k, val = repeat_kv(v, k), repeat_kv(v, val)
        if v.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, val, is_causal=True)
        else:
            y = self.eager(q, k, val, alibi)
        return self.out(y.transpose(1, 2).reshape(b, t, c))

    def eager(self, q: torch.Tensor, k: torch.Tensor, val: torch.Tensor, alibi: torch.Tensor):
        v, (b, nh, t, hs) = self.v, q.shape
        if v.positions == "alibi":  # BLOOM: (B*nh, T, T) scores, the bias as baddbmm's input
            scores = torch.baddbmm(
                alibi.expand(b, nh, 1, t).reshape(b * nh, 1, t),
                q.reshape(b * nh, t, hs),
                k.reshape(b * nh, t, hs).transpose(1, 2),
                beta=1.0,
                alpha=1 / math.sqrt(hs),
            ).view(b, nh, t, t)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(hs)
        if v.attention == "eager_masked_fill":
            scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        else:
            mask = torch.full((t, t), float("-inf"), device=q.device).triu(1)
            scores = scores + mask
        return F.softmax(scores, dim=-1) @ val


# Block and model ---------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, v: Variant) -> None:
        super().__init__()
        self.v, width = v, 2 * v.hidden
        self.up = linear(v, v.hidden, width)
        if v.mlp == "swiglu":
            self.gate = linear(v, v.hidden, width)
        self.down = linear(v, width, v.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.v.mlp == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, v: Variant) -> None:
        super().__init__()
        self.v = v
        self.norm_1 = norm(v)
        self.attn = Attention(v)
        if not v.parallel:
            self.norm_2 = norm(v)
        self.mlp = MLP(v)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, alibi: torch.Tensor):
        v = self.v
        if v.parallel and v.post_norm:
            return self.norm_1(x + self.attn(x, cos, sin, alibi) + self.mlp(x))
        if v.parallel:
            h = self.norm_1(x)
            return x + self.attn(h, cos, sin, alibi) + self.mlp(h)
        if v.post_norm:
            x = self.norm_1(x + self.attn(x, cos, sin, alibi))
            return self.norm_2(x + self.mlp(x))
        x = x + self.attn(self.norm_1(x), cos, sin, alibi)
        return x + self.mlp(self.norm_2(x))


class VariantLM(nn.Module):
    """Token ids (B, T) and targets (B, T) -> the mean cross-entropy of the next tokens."""

    pe: torch.Tensor
    inv_freq: torch.Tensor
    slopes: torch.Tensor

    def __init__(self, v: Variant) -> None:
        super().__init__()
        self.v = v
        if v.out_of_order:
            self.ln_f, self.head = norm(v), linear(v, v.hidden, v.vocab)
        self.wte = nn.Embedding(v.vocab, v.hidden)
        if v.positions == "learned":
            self.wpe = nn.Embedding(MAX_SEQ, v.hidden)
        self.blocks = nn.ModuleList(Block(v) for _ in range(LAYERS))
        if not v.out_of_order:
            self.ln_f, self.head = norm(v), linear(v, v.hidden, v.vocab)
        # GPT-2's embedding scale: N(0, 1) rows make a tied head's logits (and loss) huge
        for table in (self.wte, getattr(self, "wpe", None)):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
        if v.tied:
            self.head.weight = self.wte.weight
        self._buffers_for_positions(v)

    def _buffers_for_positions(self, v: Variant) -> None:
        hs = v.hidden // HEADS
        if v.positions == "sinusoidal":
            pos = torch.arange(MAX_SEQ, dtype=torch.float32)[:, None]
            freq = torch.exp(torch.arange(0, v.hidden, 2) * (-math.log(10000.0) / v.hidden))
            pe = torch.zeros(MAX_SEQ, v.hidden)
            pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
            self.register_buffer("pe", pe, persistent=False)
        elif v.positions.startswith("rope"):
            rot = hs // 2 if v.positions == "rope_partial" else hs
            inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        elif v.positions == "alibi":  # BLOOM's slopes for a power-of-two head count
            start = 2 ** (-(2 ** -(math.log2(HEADS) - 3)))
            slopes = torch.tensor([start ** (i + 1) for i in range(HEADS)])
            self.register_buffer("slopes", slopes, persistent=False)

    def tables(self, t: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """cos, sin (T, rotary_dim) for rotary; alibi (nh, 1, T); empty tensors otherwise."""
        v, none = self.v, torch.zeros(0, device=device)
        pos = torch.arange(t, device=device, dtype=torch.float32)
        if v.positions.startswith("rope"):
            freqs = torch.outer(pos, self.inv_freq)  # (T, rot/2)
            if v.positions == "rope_interleaved":
                emb = freqs.repeat_interleave(2, dim=-1)
            else:
                emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos(), emb.sin(), none
        if v.positions == "alibi":
            return none, none, (self.slopes[:, None] * pos[None, :])[:, None, :]
        return none, none, none

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        v, (_, t) = self.v, idx.shape
        x = self.wte(idx)  # (B, T, h)
        if v.positions == "learned":
            x = x + self.wpe(torch.arange(t, device=idx.device))
        elif v.positions == "sinusoidal":
            x = x + self.pe[:t]
        cos, sin, alibi = self.tables(t, idx.device)
        for block in self.blocks:
            x = block(x, cos, sin, alibi)
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def build_variant(
    v: Variant, batch: int = 8, seq: int = 16
) -> tuple[VariantLM, tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """(model, (idx, targets), {}), seeded: the same weights and data on every call."""
    problems = variant_problems(v)
    if problems:
        raise ValueError(f"variant {v.name}: {'; '.join(problems)}")
    torch.manual_seed(0)
    model = VariantLM(v)
    idx = torch.randint(0, v.vocab, (batch, seq))
    targets = torch.randint(0, v.vocab, (batch, seq))
    return model, (idx, targets), {}

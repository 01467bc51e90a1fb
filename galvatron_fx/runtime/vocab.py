"""Vocab-parallel embedding and cross-entropy (Megatron): the vocabulary split across the TP
group, so no rank holds the whole table or the whole logits.

`vocab_embedding` looks up only the rows this rank holds (zeros elsewhere: a partial sum the
rewrite reduces with `tp_reduce`). `vocab_cross_entropy` computes the loss of logits split on
the class dimension with three all-reduces of one value per row (max, sum of exponentials,
target logit); its backward is local: softmax minus one-hot on this rank's columns.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from galvatron_fx.runtime.collectives import GROUPS, GroupRef, Ranks, register

__all__ = ["vocab_cross_entropy", "vocab_embedding"]

_c10d = torch.ops._c10d_functional


def vocab_embedding(
    weight: torch.Tensor, idx: torch.Tensor, start: int, padding_idx: int = -1
) -> torch.Tensor:
    """Rows `start .. start + len(weight)` of the table; zeros for other indices. The padding
    row (no gradient, as in `nn.Embedding`) counts only on the rank that holds it."""
    rows = weight.shape[0]
    outside = (idx < start) | (idx >= start + rows)
    local = (idx - start).masked_fill(outside, 0)
    pad = padding_idx - start if start <= padding_idx < start + rows else None
    return F.embedding(local, weight, pad).masked_fill(outside.unsqueeze(-1), 0.0)


def _reduce(x: torch.Tensor, op: str, ref: GroupRef) -> torch.Tensor:
    if ref.size == 1:
        return x
    return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), op, GROUPS.name(ref)))


class _VocabCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        reduction: int,
        ignore: int,
        start: int,
        ref: GroupRef,
    ) -> torch.Tensor:
        width = logits.shape[1]
        shifted = logits - _reduce(logits.detach().amax(dim=1), "max", ref).unsqueeze(1)
        mine = (target >= start) & (target < start + width)
        local = (target - start).clamp(0, width - 1)
        picked = shifted.gather(1, local.unsqueeze(1)).squeeze(1) * mine
        # in place from here: one logits-sized buffer becomes the saved softmax, instead of
        # three alive at once (the forward's memory peak under vocab parallelism)
        exp = shifted.exp_()
        total = _reduce(exp.sum(dim=1), "sum", ref)
        picked = _reduce(picked, "sum", ref)
        valid = target != ignore
        losses = (total.log() - picked) * valid
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(exp.div_(total.unsqueeze(1)), local, mine, valid)
        ctx.reduction, ctx.count = reduction, count
        return losses.sum() / count if reduction == 1 else losses.sum()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        softmax, local, mine, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(1, local.unsqueeze(1), -mine.to(grad.dtype).unsqueeze(1))
        grad *= valid.unsqueeze(1).to(grad.dtype)
        scale = g / ctx.count if ctx.reduction == 1 else g
        return grad * scale, None, None, None, None, None


def vocab_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: None,
    reduction: int,
    ignore_index: int,
    label_smoothing: float,
    start: int,
    ranks: Ranks,
) -> torch.Tensor:
    """`aten.cross_entropy_loss` (mean or sum, no class weights or smoothing) for logits whose
    class dimension is split: this rank holds classes `start .. start + logits.shape[1]`."""
    if weight is not None or label_smoothing or reduction not in (1, 2):
        raise ValueError(
            "vocab_cross_entropy: class weights, label smoothing and reduction='none' are not supported"
        )
    return _VocabCrossEntropy.apply(
        logits, target, reduction, ignore_index, start, GroupRef(tuple(ranks))
    )


register(vocab_cross_entropy, 7)

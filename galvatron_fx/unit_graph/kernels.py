"""Which kernel a graph node runs on a device: a GEMM, fused attention or a memory-bound
kernel, or none (views, checks); a GEMM's output shape and whether an attention is causal.
The cost model prices each class with its own achievable efficiency
(`cost_models/efficiency.py`)."""

from __future__ import annotations

import math

import torch
from torch import fx

from galvatron_fx.cost_models.efficiency import OpClass

__all__ = [
    "ATTENTION_OPS",
    "GEMM_OPS",
    "causal_attention",
    "gemm_shape",
    "launches_kernel",
    "op_class",
]


GEMM_OPS = frozenset(
    {
        torch.ops.aten.linear.default,
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten.baddbmm.default,
        torch.ops.aten.matmul.default,
    }
)
ATTENTION_OPS = frozenset(
    {
        torch.ops.aten.scaled_dot_product_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_cudnn_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    }
)
_IS_CAUSAL_ARG = 5
"""`is_causal`'s position in `scaled_dot_product_attention(q, k, v, mask, dropout, ...)`."""


def op_class(node: fx.Node) -> OpClass | None:
    """The kernel class a node runs as; None for a node that launches no kernel (a view,
    a parameter, an input)."""
    if node.op != "call_function":
        return None
    target = node.target
    if target in GEMM_OPS:
        return "gemm"
    if target in ATTENTION_OPS:
        return "attention"
    return "memory" if launches_kernel(node) else None


def launches_kernel(node: fx.Node) -> bool:
    """Whether a call runs a kernel: not a view (which moves nothing) unless it changes the
    dtype (`aten.to` may alias, but a cast copies), and it makes a tensor (a check such as
    `_assert_tensor_metadata`, or a symbolic size, launches nothing)."""
    if node.op != "call_function":
        return False
    val = node.meta.get("val")
    values = val if isinstance(val, tuple | list) else (val,)
    made = [v for v in values if isinstance(v, torch.Tensor)]
    if not made:
        return False
    if getattr(node.target, "is_view", False):
        read = [a.meta.get("val") for a in node.all_input_nodes]
        return any(isinstance(r, torch.Tensor) and r.dtype != made[0].dtype for r in read)
    return True


def causal_attention(node: fx.Node) -> bool:
    """A causal SDPA: its fused kernels skip the masked half of the score blocks (the FLOP
    counter's formula counts all of them)."""
    if "is_causal" in node.kwargs:
        return bool(node.kwargs["is_causal"])
    return len(node.args) > _IS_CAUSAL_ARG and bool(node.args[_IS_CAUSAL_ARG])


def gemm_shape(node: fx.Node) -> tuple[int, int, int]:
    """(M, N, batch) of a GEMM node's local output: batched when both operands are."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        return 0, 0, 0
    n = int(out.shape[-1])
    operands = [a.meta.get("val") for a in node.all_input_nodes]
    dims = [v.dim() for v in operands if isinstance(v, torch.Tensor)]
    batched = node.target is not torch.ops.aten.linear.default and min(dims, default=2) > 2
    if batched and out.dim() > 2:
        return int(out.shape[-2]), n, math.prod(int(d) for d in out.shape[:-2])
    return out.numel() // max(n, 1), n, 1

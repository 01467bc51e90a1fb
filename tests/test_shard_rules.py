"""The sharding rules against two oracles: plain arithmetic and DTensor's own propagation.

Each case is one ATen op in a one-node fx graph, with the placements of its inputs on one
mesh axis of size N. Three checks per case:

1. the decision is the one written in the case (when the case states one);
2. numerics: every rank runs the op on its local pieces (inputs placed as the decision asks)
   and the pieces put back together per the decision's output placement give the op's
   result on the full tensors (Partial: summed or averaged; row-parallel linears: summed,
   bias added once after the reduction, as `insert_collectives` does);
3. DTensor, on a fake process group: the inputs placed as the decision asks (for cases
   with an empty `need` these are the original placements), the op run on DTensors; DTensor
   must then produce our output placement without communicating. Cases where DTensor
   legitimately chooses otherwise say so in `dtensor=` with a one-line reason, and the test
   checks that DTensor really does choose otherwise (so the notes stay true).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import fx
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.testing._internal.distributed.fake_pg import FakeStore

from galvatron_fx.passes.shard_rules import RULES, OpView, decide, view_groups

aten = torch.ops.aten
N = 4
R = Replicate()
S = Shard
P = Partial
SAME = "same"
FB = "fallback"
ROW = "row"


@dataclass(frozen=True)
class T:
    """An input tensor of a case: its global shape, placement, and whether it is a parameter."""

    shape: tuple[int, ...]
    p: Any = R
    param: bool = False
    kind: str = "float"  # float | idx (ints in [0, 8)) | bool | ignore (targets, one -100)

    def value(self) -> torch.Tensor:
        if self.kind == "idx":
            return torch.randint(0, 8, self.shape)
        if self.kind == "ignore":
            t = torch.randint(0, 8, self.shape)
            t[0] = -100  # only rank 0's piece has an ignored target
            return t
        if self.kind == "bool":
            return torch.rand(self.shape) > 0.5
        return torch.randn(self.shape)


def W(*shape: int) -> T:
    return T(shape, R, param=True)


@dataclass
class Case:
    id: str
    op: Any
    args: tuple[Any, ...]
    out: Any = None
    """Our expected output placement (None: not stated, the numerics decide)."""
    need: dict[int, Any] | None = field(default_factory=dict)
    """Expected `need`, by input index (order of the T's in args); None: not stated."""
    kind: str = ""
    shard_weights: bool = False
    seq_parallel: bool = False
    dtensor: str = SAME
    """SAME, ROW (DTensor gives Partial before the reduction), "differs: why" or "skip: why"."""
    numeric: bool = True
    oracle: Callable[..., Any] | None = None
    """What to run on DTensors instead of `op` (same arguments)."""
    meta: bool = False
    """Run the DTensor oracle on meta local tensors (placement propagation only)."""
    bug: str = ""
    """Non-empty: a known bug in the rules; the case is a strict xfail with this reason."""


def _flash(q: Any, k: Any, v: Any, *rest: Any) -> Any:
    """DTensor's registered attention strategy (the CPU sdpa path decomposes for ~20 s)."""
    return aten._scaled_dot_product_flash_attention.default(q, k, v)[0]


def _efficient(q: Any, k: Any, v: Any, mask: Any) -> Any:
    return aten._scaled_dot_product_efficient_attention.default(q, k, v, mask, False)[0]


X3 = (4, 8, 16)
Q = (4, 4, 8, 16)  # (B, nh, S, hd)

CASES = [
    # -- elementwise, broadcasting --------------------------------------------------------
    Case("add_same_shard", aten.add.Tensor, (T(X3, S(1)), T(X3, S(1))), S(1)),
    Case("add_bias_full_dim", aten.add.Tensor, (T(X3, S(2)), T((16,))), S(2), {1: S(0)}),
    Case("mul_bcast_on_sharded_dim", aten.mul.Tensor, (T(X3, S(2)), T((4, 8, 1))), S(2)),
    Case("mul_missing_leading_dim", aten.mul.Tensor, (T(X3, S(0)), T((8, 16))), S(0)),
    Case("mul_second_sharded", aten.mul.Tensor, (T((8, 16)), T(X3, S(1))), S(1), {0: S(0)}),
    Case("add_replicated", aten.add.Tensor, (T(X3), T(X3)), R),
    Case(
        "sub_shard_mismatch", aten.sub.Tensor, (T((4, 8), S(0)), T((4, 8), S(1))), S(0), {1: S(0)}
    ),
    Case(
        "where_self",
        aten.where.self,
        (T((4, 8), S(0), kind="bool"), T((4, 8)), T((8,))),
        S(0),
        {1: S(0)},
    ),
    Case("eq_tensor", aten.eq.Tensor, (T((4, 8), S(1)), T((4, 8), S(1))), S(1)),
    Case("add_partial_partial", aten.add.Tensor, (T((4, 8), P()), T((4, 8), P())), P()),
    Case("sub_partial_partial", aten.sub.Tensor, (T((4, 8), P()), T((4, 8), P())), P()),
    Case("mul_partial_replicate", aten.mul.Tensor, (T((4, 8), P()), T((4, 8))), R, {0: R}),
    Case("add_partial_replicate", aten.add.Tensor, (T((4, 8), P()), T((4, 8))), R, {0: R}),
    Case(
        "add_partial_avg_losses",
        aten.add.Tensor,
        (T((), P("avg")), T((), P("avg"))),
        P("avg"),
    ),
    Case(
        "add_partial_sum_avg",
        aten.add.Tensor,
        (T((), P("sum")), T((), P("avg"))),
        need=None,
    ),
    # -- unary ----------------------------------------------------------------------------
    Case("roll_other_dims", aten.roll.default, (T((4, 8, 8, 16), S(0)), [2, 2], [1, 2]), S(0)),
    Case("roll_split_dim", aten.roll.default, (T((4, 8, 16), S(1)), [3], [1]), R, {0: R}, FB),
    Case("roll_flat", aten.roll.default, (T((4, 8, 16), S(0)), [3]), R, {0: R}, FB),
    Case("pool_batch", aten.adaptive_avg_pool1d.default, (T((4, 8, 16), S(0)), [1]), S(0)),
    Case(
        "pool_pooled_dim",
        aten.adaptive_avg_pool1d.default,
        (T((4, 8, 16), S(2)), [1]),
        R,
        {0: R},
        FB,
    ),
    Case("gelu", aten.gelu.default, (T(X3, S(1)),), S(1)),
    Case("silu", aten.silu.default, (T(X3, S(0)),), S(0)),
    Case("dropout", aten.dropout.default, (T(X3, S(1)), 0.1, True), S(1), numeric=False),
    Case(
        "native_dropout",
        aten.native_dropout.default,
        (T(X3, S(2)), 0.1, True),
        S(2),
        numeric=False,
    ),
    Case("gelu_partial", aten.gelu.default, (T((4, 8), P()),), R, {0: R}),
    Case("neg_partial", aten.neg.default, (T((4, 8), P()),), P()),
    Case("mul_scalar_partial", aten.mul.Scalar, (T((4, 8), P()), 2.0), R, {0: R}),
    Case("pow_scalar", aten.pow.Tensor_Scalar, (T(X3, S(2)), 2), S(2)),
    Case("square", aten.square.default, (T(X3, S(0)),), S(0)),
    Case(
        "masked_fill_bcast_mask",
        aten.masked_fill.Scalar,
        (T((4, 8), S(0)), T((1, 8), kind="bool"), 0.0),
        S(0),
    ),
    Case(
        "masked_fill_full_mask",
        aten.masked_fill.Scalar,
        (T((4, 8), S(0)), T((4, 8), kind="bool"), 0.0),
        S(0),
        {1: S(0)},
    ),
    # in-place ops write into their first input (through a view, into its base): it keeps
    # its placement, the others come to it (T5's decoder ids: labels copied into new_zeros)
    Case("copy_into_replicated", aten.copy_.default, (T((4, 8)), T((4, 8), S(0))), R, {1: R}),
    Case("copy_into_split", aten.copy_.default, (T((4, 8), S(0)), T((4, 8))), S(0), {1: S(0)}),
    Case(
        "masked_fill_in_place_replicated",
        aten.masked_fill_.Scalar,
        (T((4, 8)), T((4, 8), S(0), kind="bool"), 0.0),
        R,
        {1: R},
    ),
    Case(
        "where_scalar_other",
        aten.where.ScalarOther,
        (T((4, 8), kind="bool"), T((4, 8), S(0)), 0.0),
        S(0),
        {0: S(0)},
    ),
    Case(
        "tanh_backward",
        aten.tanh_backward.default,
        (T((4, 8), S(0)), T((4, 8))),
        S(0),
        {1: S(0)},
    ),
    # -- view / reshape -------------------------------------------------------------------
    Case("view_split_heads", aten.view.default, (T(X3, S(2)), [4, 8, 4, 4]), S(2)),
    Case("view_merge_heads", aten.view.default, (T((4, 8, 4, 4), S(2)), [4, 8, 16]), S(2)),
    Case("view_other_dim", aten.view.default, (T(X3, S(1)), [4, 8, 4, 4]), S(1)),
    Case("view_merge_outer", aten.view.default, (T(X3, S(0)), [32, 16]), S(0)),
    Case(
        "view_merge_inner",
        aten.view.default,
        (T(X3, S(1)), [32, 16]),
        R,
        {0: R},
        "fallback",
    ),
    Case(
        "view_split_uneven",
        aten.view.default,
        (T((4, 8, 12), S(2)), [4, 8, 6, 2]),
        R,
        {0: R},
        "fallback",
    ),
    Case(
        "view_fused_heads",  # (B, S, 3H) -> (B, S, 3, heads, hd): heads split in each block
        aten.view.default,
        (T((4, 8, 48), S(2)), [4, 8, 3, 4, 4]),
        S(3),
        kind="blocks=16,16,16",
        numeric=False,  # correct only with the producer's weight split block by block
        dtensor="differs: DTensor gathers; our rule relies on the producer's blocked weight",
    ),
    Case("reshape_drop_one", aten.reshape.default, (T((1, 8, 16), S(1)), [8, 16]), S(0)),
    Case("unsafe_view", aten._unsafe_view.default, (T((4, 8, 4, 4), S(0)), [32, 16]), S(0)),
    Case("flatten", aten.flatten.using_ints, (T(X3, S(0)), 1, 2), S(0)),
    Case("view_partial", aten.view.default, (T(X3, P()), [32, 16]), R, {0: R}),
    # -- transpose / permute / unsqueeze / squeeze / expand -------------------------------
    Case("transpose", aten.transpose.int, (T(X3, S(1)), 1, 2), S(2)),
    Case("transpose_neg", aten.transpose.int, (T(X3, S(0)), -1, -2), S(0)),
    Case("transpose_partial", aten.transpose.int, (T(X3, P()), 1, 2), P()),
    Case("permute", aten.permute.default, (T((4, 8, 4, 4), S(2)), [0, 2, 1, 3]), S(1)),
    Case("t", aten.t.default, (T((8, 16), S(0)),), S(1)),
    Case("unsqueeze_front", aten.unsqueeze.default, (T((8, 16), S(1)), 0), S(2)),
    Case("unsqueeze_back", aten.unsqueeze.default, (T((8, 16), S(1)), -1), S(1)),
    Case("unsqueeze_at_shard", aten.unsqueeze.default, (T((8, 16), S(1)), 1), S(2)),
    Case("squeeze_dim", aten.squeeze.dim, (T((4, 1, 16), S(2)), 1), S(1)),
    Case("squeeze_dims", aten.squeeze.dims, (T((4, 1, 16, 1), S(0)), [1, 3]), S(0)),
    Case("expand_new_dim", aten.expand.default, (T((8, 16), S(0)), [4, 8, 16]), S(1)),
    Case("expand_ones", aten.expand.default, (T((4, 1, 16), S(0)), [4, 8, 16]), S(0)),
    # -- along one dim / reductions / norms -----------------------------------------------
    Case("softmax", aten.softmax.int, (T(X3, S(0)), -1), S(0)),
    Case("_softmax", aten._softmax.default, (T(X3, S(1)), -1, False), S(1)),
    Case("_softmax_on_shard", aten._softmax.default, (T(X3, S(2)), -1, False), R, {0: R}),
    Case("log_softmax", aten._log_softmax.default, (T(X3, S(0)), 2, False), S(0)),
    Case("cumsum", aten.cumsum.default, (T(X3, S(0)), 1), S(0)),
    Case(
        "layer_norm_s0",
        aten.layer_norm.default,
        (T(X3, S(0)), [16], W(16), W(16), 1e-5),
        S(0),
    ),
    Case(
        "layer_norm_s1",
        aten.layer_norm.default,
        (T(X3, S(1)), [16], W(16), W(16), 1e-5),
        S(1),
    ),
    Case(
        "layer_norm_on_shard",
        aten.layer_norm.default,
        (T(X3, S(2)), [16], W(16), W(16), 1e-5),
        R,
        {0: R},
    ),
    Case("rms_norm", aten.rms_norm.default, (T(X3, S(1)), [16], W(16), 1e-6), S(1)),
    Case("mean_last", aten.mean.dim, (T(X3, S(0)), [-1]), S(0)),
    Case("mean_keepdim", aten.mean.dim, (T(X3, S(2)), [1], True), S(2)),
    Case("mean_drop_before", aten.mean.dim, (T(X3, S(2)), [1]), S(1)),
    Case("mean_on_shard", aten.mean.dim, (T(X3, S(1)), [1]), P("avg")),
    Case("sum_on_shard", aten.sum.dim_IntList, (T(X3, S(1)), [1]), P("sum")),
    Case("mean_all", aten.mean.default, (T(X3, S(0)),), P("avg")),
    Case("sum_all", aten.sum.default, (T(X3, S(2)),), P("sum")),
    Case("sum_all_replicated", aten.sum.default, (T(X3),), R),
    Case(
        "amax_on_shard",
        aten.amax.default,
        (T(X3, S(1)), [1]),
        R,
        {0: R},
    ),
    # -- cat / split / slice / select / pad -----------------------------------------------
    Case("cat_other_dim", aten.cat.default, ([T(X3, S(0)), T(X3, S(0))], 2), S(0)),
    Case("cat_slice_replicated", aten.cat.default, ([T(X3, S(1)), T(X3)], 0), S(1), {1: S(1)}),
    Case(
        "cat_on_shard",
        aten.cat.default,
        ([T(X3, S(2)), T(X3, S(2))], 2),
        R,
        {0: R, 1: R},
        "fallback",
    ),
    Case("split_other_dim", aten.split.Tensor, (T(X3, S(0)), 4, 2), (S(0),) * 4),
    Case(
        "split_with_sizes",
        aten.split_with_sizes.default,
        (T(X3, S(1)), [4, 12], 2),
        (S(1), S(1)),
    ),
    Case(
        "split_fused_qkv",
        aten.split.Tensor,
        (T((4, 8, 48), S(2)), 16, 2),
        (S(2),) * 3,
        kind="blocks=16,16,16",
        numeric=False,  # correct only with the producer's weight split block by block
        dtensor="differs: DTensor gathers; our rule relies on the producer's blocked weight",
    ),
    Case(
        "split_on_shard_uneven",
        aten.split.Tensor,
        (T((4, 8, 16), S(2)), 6, 2),
        (R,) * 3,
        {0: R},
        "fallback",
    ),
    Case("slice_other_dim", aten.slice.Tensor, (T(X3, S(0)), 1, 0, 4), S(0)),
    Case("slice_full_range", aten.slice.Tensor, (T(X3, S(1)), 1, 0, 8), S(1)),
    Case("slice_on_shard", aten.slice.Tensor, (T(X3, S(1)), 1, 1, 5), R, {0: R}, "fallback"),
    Case(
        "slice_one_block",  # qkv[..., 16:32] of a fused (.., 48) projection
        aten.slice.Tensor,
        (T((4, 8, 48), S(2)), 2, 16, 32),
        S(2),
        kind="blocks=16,16,16",
        numeric=False,  # correct only with the producer's weight split block by block
        dtensor="differs: DTensor gathers; our rule relies on the producer's blocked weight",
    ),
    Case(
        "slice_unequal_block",  # a grouped-query fused (H + 2 kv) qkv: k = qkv[..., 32:40]
        aten.slice.Tensor,
        (T((4, 8, 48), S(2)), 2, 32, 40),
        S(2),
        kind="blocks=32,8,8",
        numeric=False,  # correct only with the producer's weight split block by block
        dtensor="differs: DTensor gathers; our rule relies on the producer's blocked weight",
    ),
    Case(
        "split_with_sizes_fused_gqa",
        aten.split_with_sizes.default,
        (T((4, 8, 48), S(2)), [32, 8, 8], 2),
        (S(2),) * 3,
        kind="blocks=32,8,8",
        numeric=False,  # correct only with the producer's weight split block by block
        dtensor="differs: DTensor gathers; our rule relies on the producer's blocked weight",
    ),
    Case(
        "slice_block_too_narrow",  # blocks of 2 cannot be split 4 ways
        aten.slice.Tensor,
        (T((4, 8, 16), S(2)), 2, 2, 4),
        R,
        {0: R},
        "fallback",
    ),
    Case(
        "chunk_fused_qkv",
        aten.chunk.default,
        (T((4, 8, 48), S(2)), 3, -1),
        (S(2),) * 3,
        kind="blocks=16,16,16",
        numeric=False,  # correct only with the producer's weight split block by block
        dtensor="differs: DTensor gathers; our rule relies on the producer's blocked weight",
    ),
    Case("chunk_other_dim", aten.chunk.default, (T(X3, S(0)), 2, 2), (S(0),) * 2),
    Case("unbind_other_dim", aten.unbind.int, (T((4, 8, 3, 16), S(3)), 2), (S(2),) * 3),
    Case("unbind_before_shard", aten.unbind.int, (T((4, 8, 3, 16), S(0)), 2), (S(0),) * 3),
    Case(
        "unbind_on_shard",
        aten.unbind.int,
        (T((4, 4, 16), S(1)), 1),
        (R,) * 4,
        {0: R},
        "fallback",
    ),
    Case("stack_shard", aten.stack.default, ([T(X3, S(2)), T(X3, S(2))], 0), S(3)),
    Case("stack_after", aten.stack.default, ([T(X3, S(0)), T(X3, S(0))], 3), S(0)),
    Case(
        "stack_aligns",
        aten.stack.default,
        ([T(X3, S(1)), T(X3)], 1),
        S(2),
        {1: S(1)},
    ),
    Case(
        "repeat_interleave_heads",  # grouped-query attention: kv heads repeated in place
        aten.repeat_interleave.self_int,
        (T((2, 4, 8, 16), S(1)), 2, 1),
        S(1),
        dtensor="skip: DTensor has no strategy for repeat_interleave",
    ),
    Case(
        "repeat_interleave_other_dim",
        aten.repeat_interleave.self_int,
        (T((2, 4, 8, 16), S(0)), 2, 1),
        S(0),
        dtensor="skip: DTensor has no strategy for repeat_interleave",
    ),
    Case("type_as", aten.type_as.default, (T(X3, S(1)), T(X3)), S(1)),
    Case("type_as_partial", aten.type_as.default, (T(X3, P()), T(X3)), P()),
    Case("bmm_batch", aten.bmm.default, (T((8, 4, 16), S(0)), T((8, 16, 4), S(0))), S(0)),
    Case(
        "baddbmm_alibi",  # BLOOM: alibi (B*heads, 1, S) + q @ k on a batch split
        aten.baddbmm.default,
        (T((8, 1, 4)), T((8, 4, 16), S(0)), T((8, 16, 4), S(0))),
        S(0),
        {0: S(0)},
    ),
    Case(
        "baddbmm_partial_product",  # input added once: the partial product is gathered
        aten.baddbmm.default,
        (T((8, 4, 4)), T((8, 4, 16), S(2)), T((8, 16, 4), S(1))),
        R,
        {1: R, 2: R},
        "fallback",
    ),
    Case(
        "matmul_weight_column",  # x @ W, W stored (in, out): a column-parallel linear
        aten.matmul.default,
        (T(X3), W(16, 32)),
        S(2),
        {1: S(1)},
        "column",
        shard_weights=True,
    ),
    Case(
        "matmul_weight_row",
        aten.matmul.default,
        (T(X3, S(2)), W(16, 32)),
        R,
        {1: S(0)},
        "row",
        shard_weights=True,
        dtensor=ROW,
    ),
    Case(
        "mm_weight_column",
        aten.mm.default,
        (T((32, 16)), W(16, 8)),
        S(1),
        {1: S(1)},
        "column",
        shard_weights=True,
    ),
    Case("select_other_dim", aten.select.int, (T(X3, S(2)), 1, 3), S(1)),
    Case("select_on_shard", aten.select.int, (T(X3, S(2)), 2, 3), R, {0: R}, "fallback"),
    Case("pad_other_dim", aten.constant_pad_nd.default, (T(X3, S(0)), [1, 1], 0.0), S(0)),
    Case(
        "pad_on_shard",
        aten.constant_pad_nd.default,
        (T(X3, S(2)), [1, 1], 0.0),
        R,
        {0: R},
        "fallback",
    ),
    # -- attention ------------------------------------------------------------------------
    Case(
        "sdpa_batch",
        aten.scaled_dot_product_attention.default,
        (T(Q, S(0)), T(Q, S(0)), T(Q, S(0))),
        S(0),
        oracle=_flash,
        meta=True,
    ),
    Case(
        "sdpa_heads",
        aten.scaled_dot_product_attention.default,
        (T(Q, S(1)), T(Q, S(1)), T(Q, S(1))),
        S(1),
        oracle=_flash,
        meta=True,
    ),
    Case(
        "sdpa_heads_causal",
        aten.scaled_dot_product_attention.default,
        (T(Q, S(1)), T(Q, S(1)), T(Q, S(1)), None, 0.0, True),
        S(1),
        oracle=_flash,
        meta=True,
    ),
    Case(
        "sdpa_heads_2d_mask",
        aten.scaled_dot_product_attention.default,
        (T(Q, S(1)), T(Q, S(1)), T(Q, S(1)), T((8, 8))),
        S(1),
        oracle=_efficient,
        meta=True,
    ),
    Case(
        "sdpa_batch_full_mask",
        aten.scaled_dot_product_attention.default,
        (T(Q, S(0)), T(Q, S(0)), T(Q, S(0)), T((4, 1, 8, 8))),
        S(0),
        {3: S(0)},
        oracle=_efficient,
        meta=True,
    ),
    Case(
        "sdpa_replicated_kv",  # kv heads computed whole (fewer than tp): sliced to q's heads
        aten.scaled_dot_product_attention.default,
        (T(Q, S(1)), T(Q), T(Q)),
        S(1),
        {1: S(1), 2: S(1)},
        oracle=_flash,
        meta=True,
    ),
    Case(
        "sdpa_whole_projections",  # a fused qkv run whole in a tp layer: heads split locally
        aten.scaled_dot_product_attention.default,
        (T(Q), T(Q), T(Q)),
        S(1),
        {0: S(1), 1: S(1), 2: S(1)},
        shard_weights=True,
        oracle=_flash,
        meta=True,
    ),
    Case(
        "sdpa_replicated",  # outside a tensor-parallel layer: runs whole
        aten.scaled_dot_product_attention.default,
        (T(Q), T(Q), T(Q)),
        R,
        oracle=_flash,
        meta=True,
    ),
    Case(
        "sdpa_sequence",
        aten.scaled_dot_product_attention.default,
        (T(Q, S(2)), T(Q, S(2)), T(Q, S(2))),
        R,
        {0: R, 1: R, 2: R},
        "fallback",
        oracle=_flash,
        meta=True,
    ),
    Case(
        "sdpa_mixed",
        aten.scaled_dot_product_attention.default,
        (T(Q, S(0)), T(Q, S(1)), T(Q, S(1))),
        R,
        {0: R, 1: R, 2: R},
        "fallback",
        oracle=_flash,
        meta=True,
    ),
    # -- matmul / bmm ---------------------------------------------------------------------
    Case("bmm_batch", aten.bmm.default, (T(X3, S(0)), T((4, 16, 8), S(0))), S(0)),
    Case("bmm_batch_slice_rhs", aten.bmm.default, (T(X3, S(0)), T((4, 16, 8))), S(0), {1: S(0)}),
    Case("bmm_contract", aten.bmm.default, (T(X3, S(2)), T((4, 16, 8), S(1))), P()),
    Case("matmul_contract", aten.matmul.default, (T(X3, S(2)), T((4, 16, 8), S(1))), P()),
    Case("matmul_heads", aten.matmul.default, (T(Q, S(1)), T((4, 4, 16, 8), S(1))), S(1)),
    Case("matmul_rows", aten.matmul.default, (T((8, 16), S(0)), T((16, 8))), S(0)),
    Case("matmul_cols", aten.matmul.default, (T((8, 16)), T((16, 8), S(1))), S(1)),
    Case("matmul_bcast_rows", aten.matmul.default, (T(X3, S(1)), T((16, 8))), S(1)),
    # a vector operand: torch promotes it to a matrix and drops that dim from the result
    Case(
        "mv_contract_slices_matrix",
        aten.matmul.default,
        (T((8, 16)), T((16,), S(0))),
        P(),
        {0: S(1)},
    ),
    Case("mv_contract", aten.matmul.default, (T((8, 16), S(1)), T((16,), S(0))), P()),
    Case(
        "mv_contract_slices_vector",
        aten.matmul.default,
        (T((8, 16), S(1)), T((16,))),
        P(),
        {1: S(0)},
    ),
    Case("mv_rows", aten.matmul.default, (T((8, 16), S(0)), T((16,))), S(0)),
    Case("mv_batch", aten.matmul.default, (T(X3, S(0)), T((16,))), S(0)),
    Case("mv_batch_rows", aten.matmul.default, (T(X3, S(1)), T((16,))), S(1)),
    Case("vm_cols", aten.matmul.default, (T((16,)), T((16, 8), S(1))), S(0)),
    Case("vm_batch", aten.matmul.default, (T((16,)), T((4, 16, 8), S(0))), S(0)),
    Case("vm_batch_cols", aten.matmul.default, (T((16,)), T((4, 16, 8), S(2))), S(1)),
    Case("vm_contract", aten.matmul.default, (T((16,), S(0)), T((4, 16, 8), S(1))), P()),
    Case("dot", aten.matmul.default, (T((16,), S(0)), T((16,), S(0))), P()),
    Case("dot_slices", aten.matmul.default, (T((16,)), T((16,), S(0))), P(), {0: S(0)}),
    Case(
        "bmm_partial",
        aten.bmm.default,
        (T(X3, P()), T((4, 16, 8))),
        R,
        {0: R},
        "fallback",
    ),
    # -- embedding, linear, loss, conv ----------------------------------------------------
    Case(
        "embedding_s0",
        aten.embedding.default,
        (W(16, 8), T((4, 8), S(0), kind="idx")),
        S(0),
    ),
    Case(
        "embedding_s1",
        aten.embedding.default,
        (W(16, 8), T((4, 8), S(1), kind="idx")),
        S(1),
    ),
    Case("linear_batch", aten.linear.default, (T(X3, S(0)), W(32, 16), W(32)), S(0)),
    Case("linear_seq", aten.linear.default, (T(X3, S(1)), W(32, 16), W(32)), S(1)),
    Case(
        "linear_in_features",
        aten.linear.default,
        (T(X3, S(2)), W(32, 16), W(32)),
        R,
        {0: R},
    ),
    Case(
        "linear_column",
        aten.linear.default,
        (T(X3), W(32, 16), W(32)),
        S(2),
        {1: S(0), 2: S(0)},
        "column",
        shard_weights=True,
    ),
    Case(
        "linear_column_gathers_input",
        aten.linear.default,
        (T(X3, S(0)), W(32, 16), W(32)),
        S(2),
        {0: R, 1: S(0), 2: S(0)},
        "column",
        shard_weights=True,
    ),
    Case(
        "linear_row",
        aten.linear.default,
        (T((4, 8, 32), S(2)), W(16, 32)),
        R,
        {1: S(1)},
        "row",
        shard_weights=True,
        dtensor=ROW,
    ),
    Case(
        "linear_row_bias",
        aten.linear.default,
        (T((4, 8, 32), S(2)), W(16, 32), W(16)),
        R,
        {1: S(1)},
        "row",
        shard_weights=True,
        dtensor=ROW,
    ),
    Case(
        "linear_row_seq_parallel",
        aten.linear.default,
        (T((4, 8, 32), S(2)), W(16, 32), W(16)),
        S(1),
        {1: S(1)},
        "row",
        shard_weights=True,
        seq_parallel=True,
        dtensor=ROW,
    ),
    Case(
        "addmm_column",
        aten.addmm.default,
        (W(32), T((8, 16)), W(16, 32)),
        S(1),
        {0: S(0), 2: S(1)},
        "column",
        shard_weights=True,
    ),
    Case(
        "addmm_row",
        aten.addmm.default,
        (W(16), T((8, 32), S(1)), W(32, 16)),
        R,
        {2: S(0)},
        "row",
        shard_weights=True,
        dtensor=ROW,
    ),
    Case(
        "cross_entropy_batch",
        aten.cross_entropy_loss.default,
        (T((8, 10), S(0)), T((8,), S(0), kind="idx")),
        P("sum"),
        {},
        "global_mean",
        dtensor="differs: DTensor averages local means; ours divides local sums by the "
        "all-reduced count of counted targets (exact with uneven padding)",
    ),
    Case(
        "cross_entropy_slice_target",
        aten.cross_entropy_loss.default,
        (T((8, 10), S(0)), T((8,), kind="idx")),
        P("sum"),
        {1: S(0)},
        "global_mean",
        dtensor="differs: DTensor averages local means; ours divides local sums by the "
        "all-reduced count of counted targets",
    ),
    Case(
        "cross_entropy_ignore_index",
        aten.cross_entropy_loss.default,
        (T((8, 10), S(0)), T((8,), S(0), kind="ignore")),
        P("sum"),
        {},
        "global_mean",
        dtensor="differs: DTensor averages local means, wrong when ranks hold different "
        "numbers of ignored targets; ours divides local sums by the global count",
    ),
    Case(
        "conv2d_batch",
        aten.conv2d.default,
        (T((4, 3, 8, 8), S(0)), W(4, 3, 3, 3), W(4)),
        S(0),
    ),
    # -- no rule --------------------------------------------------------------------------
    Case("sort_fallback", aten.sort.default, (T((4, 8), S(0)), 1), (R, R), {0: R}, "fallback"),
    Case("flip_fallback", aten.flip.default, (T((4, 8), S(1)), [0]), R, {0: R}, "fallback"),
    Case("sort_replicated", aten.sort.default, (T((4, 8)), 1), (R, R)),
]


# -- building and running a case ------------------------------------------------------------


def _subst(obj: Any, fn: Callable[[int, T], Any], counter: Iterator[int]) -> Any:
    """`obj` with every T replaced by fn(index, T), indices in argument order."""
    if isinstance(obj, T):
        return fn(next(counter), obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_subst(o, fn, counter) for o in obj)
    return obj


def subst(args: tuple[Any, ...], fn: Callable[[int, T], Any]) -> tuple[Any, ...]:
    return _subst(args, fn, itertools.count())


@dataclass
class Built:
    node: fx.Node
    inputs: list[tuple[T, fx.Node, torch.Tensor]]
    full_out: Any


def build(case: Case) -> Built:
    torch.manual_seed(0)
    g = fx.Graph()
    inputs: list[tuple[T, fx.Node, torch.Tensor]] = []

    def placeholder(i: int, t: T) -> fx.Node:
        node = g.placeholder(f"in{i}")
        node.meta["val"] = t.value()
        inputs.append((t, node, node.meta["val"]))
        return node

    node = g.call_function(case.op, subst(case.args, placeholder))
    full_out = case.op(*subst(case.args, lambda i, _: inputs[i][2]))
    node.meta["val"] = full_out
    g.output(node)
    return Built(node, inputs, full_out)


def run_rule(case: Case, b: Built) -> Any:
    place = {node: t.p for t, node, _ in b.inputs}
    params = frozenset(node for t, node, _ in b.inputs if t.param)
    return decide(OpView(b.node, N, place, case.shard_weights, case.seq_parallel, params))


def effective(b: Built, need: dict[fx.Node, Any]) -> list[Any]:
    """Each input's placement once the decision's needs are met."""
    return [need.get(node, t.p) for t, node, _ in b.inputs]


def _pieces(full: torch.Tensor, p: Any) -> list[torch.Tensor]:
    """What each of the N ranks holds of `full` under placement p."""
    if isinstance(p, Shard):
        return list(full.tensor_split(N, p.dim))
    if isinstance(p, Partial):
        noise = torch.randn((N, *full.shape))
        noise -= noise.mean(0)  # the pieces' sum (or mean) is exactly `full`
        scale = 1.0 if p.reduce_op == "avg" else 1.0 / N
        return [full * scale + noise[r] for r in range(N)]
    return [full] * N


def _outs(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def check_numeric(case: Case, b: Built, decision: Any) -> None:
    places = effective(b, decision.need)
    bias = _row_bias(case, b) if decision.kind == "row" else None
    pieces = [_pieces(full, p) for (_, _, full), p in zip(b.inputs, places, strict=True)]
    if bias is not None:  # insert_collectives adds a row-parallel bias after the reduction
        pieces[bias] = [torch.zeros_like(b.inputs[bias][2])] * N
    args = _local_sizes(case, b, decision.out)
    local = [case.op(*subst(args, lambda i, _, r=r: pieces[i][r])) for r in range(N)]
    if decision.kind == "global_mean":  # what insert_collectives emits: sum / global count
        local = [_global_mean(case, b, pieces, r) for r in range(N)]
    fulls = _outs(b.full_out)
    outs = _outs(decision.out) if isinstance(decision.out, tuple) else [decision.out] * len(fulls)
    for k, (full, p) in enumerate(zip(fulls, outs, strict=True)):
        mine = [_outs(x)[k] for x in local]
        if decision.kind == "row":
            total = sum(mine) + (b.inputs[bias][2] if bias is not None else 0)
            torch.testing.assert_close(total, full, atol=1e-4, rtol=1e-4)
        elif isinstance(p, Partial):
            total = sum(mine) / (N if p.reduce_op == "avg" else 1)
            torch.testing.assert_close(total, full, atol=1e-4, rtol=1e-4)
        else:
            for r in range(N):
                want = _pieces(full, p)[r]
                torch.testing.assert_close(mine[r], want, atol=1e-4, rtol=1e-4)


def _global_mean(case: Case, b: Built, pieces: list[list[torch.Tensor]], r: int) -> Any:
    logits, target = pieces[0][r], pieces[1][r]
    count = sum(int((pieces[1][k] != -100).sum()) for k in range(N))
    return aten.cross_entropy_loss.default(logits, target, None, 2, -100) / count


SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
"""Ops whose second argument bakes in the global output shape: the shard pass rewrites it."""


def _local_sizes(case: Case, b: Built, out: Any) -> tuple[Any, ...]:
    if case.op not in SIZED or not isinstance(out, Shard):
        return case.args
    sizes = list(b.full_out.shape)
    sizes[out.dim] //= N
    return (case.args[0], sizes, *case.args[2:])


def _row_bias(case: Case, b: Built) -> int | None:
    params = [i for i, (t, _, _) in enumerate(b.inputs) if t.param]
    if case.op == aten.addmm.default:
        return 0
    return params[1] if len(params) > 1 else None


# -- DTensor --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=N)
    try:
        yield init_device_mesh("cpu", (N,))
    finally:
        dist.destroy_process_group()


def _dtensor(full: torch.Tensor, p: Any, mesh: Any, meta: bool) -> DTensor:
    if meta:
        local = torch.empty(_pieces(full, p if isinstance(p, Shard) else R)[0].shape, device="meta")
        local = local.to(full.dtype)
        return DTensor.from_local(
            local, mesh, [p], run_check=False, shape=full.shape, stride=full.stride()
        )
    if isinstance(p, Partial):
        return DTensor.from_local(full, mesh, [p], run_check=False)
    return distribute_tensor(full, mesh, [p])


def run_dtensor(case: Case, b: Built, places: list[Any], mesh: Any) -> tuple[Any, int]:
    """DTensor's output(s) and how many collectives it issued."""
    pairs = zip(b.inputs, places, strict=True)
    dts = [_dtensor(full, p, mesh, case.meta) for (_, _, full), p in pairs]
    args = subst(case.args, lambda i, _: dts[i])
    comm = CommDebugMode()
    with comm:
        out = (case.oracle or case.op)(*args)
    return out, comm.get_total_counts()


def placements(out: Any) -> Any:
    got = [o.placements[0] for o in _outs(out)]
    return tuple(got) if isinstance(out, (tuple, list)) else got[0]


def _normalize(p: Any, ndim: int) -> Any:
    if isinstance(p, Shard) and type(p) is Shard:
        return Shard(p.dim % ndim if ndim else p.dim)
    return p


def _same(ours: Any, theirs: Any, full_out: Any) -> bool:
    fulls = _outs(full_out)
    ours_l = _outs(ours) if isinstance(ours, tuple) else [ours] * len(fulls)
    theirs_l = _outs(theirs) if isinstance(theirs, tuple) else [theirs] * len(fulls)
    return all(
        _normalize(a, f.dim()) == _normalize(c, f.dim())
        for a, c, f in zip(ours_l, theirs_l, fulls, strict=True)
    )


def check_dtensor(case: Case, b: Built, decision: Any, mesh: Any) -> None:
    if case.dtensor.startswith("skip"):
        return
    try:
        out, comms = run_dtensor(case, b, effective(b, decision.need), mesh)
        theirs = placements(out)
    except RuntimeError as e:
        out, theirs, comms = None, f"raised {type(e).__name__}", -1
    if case.dtensor == ROW:  # DTensor stops before the reduction that our decision includes
        assert decision.kind == "row" and comms == 0 and theirs == Partial("sum"), theirs
        assert out.redistribute(mesh, [decision.out]).placements[0] == decision.out
        return
    agrees = comms == 0 and _same(decision.out, theirs, b.full_out)
    if case.dtensor == SAME:
        assert agrees, f"ours {decision.out}, DTensor {theirs} with {comms} collectives"
    else:
        assert not agrees, f"note '{case.dtensor}' is stale: DTensor now agrees ({theirs})"


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_rule(case: Case, mesh: Any) -> None:
    b = build(case)
    decision = run_rule(case, b)
    index = {node: i for i, (_, node, _) in enumerate(b.inputs)}
    if case.out is not None:
        assert decision.out == case.out
    if case.need is not None:
        assert {index[a]: p for a, p in decision.need.items()} == case.need
        assert decision.kind == case.kind
    if case.numeric:
        check_numeric(case, b, decision)
    check_dtensor(case, b, decision, mesh)


# -- view_groups, getitem, the rule table ---------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst", "groups"),
    [
        ((4, 8, 16), (4, 8, 4, 4), [([0], [0]), ([1], [1]), ([2], [2, 3])]),
        ((4, 8, 4, 4), (4, 8, 16), [([0], [0]), ([1], [1]), ([2, 3], [2])]),
        ((4, 8, 16), (32, 16), [([0, 1], [0]), ([2], [1])]),
        ((1, 8, 16), (8, 16), [([0, 1], [0]), ([2], [1])]),
        ((4, 1, 8), (4, 8), [([0], [0]), ([1, 2], [1])]),
        ((16,), (1, 16), [([0], [0, 1])]),
        ((6, 4), (4, 6), [([0, 1], [0, 1])]),
        ((4, 8), (4, 8, 1), [([0], [0]), ([1], [1]), ([], [2])]),
        ((2, 3, 4), (24,), [([0, 1, 2], [0])]),
    ],
)
def test_view_groups(src, dst, groups) -> None:
    got = view_groups(src, dst)
    assert got == groups
    for gi, gj in got:  # equal products, every dim used once, in order
        assert math.prod(src[i] for i in gi) == math.prod(dst[j] for j in gj)
    assert [i for gi, _ in got for i in gi] == list(range(len(src)))
    assert [j for _, gj in got for j in gj] == list(range(len(dst)))


def test_getitem_picks_the_output_placement() -> None:
    case = Case("split", aten.split_with_sizes.default, (T(X3, S(1)), [4, 12], 2))
    b = build(case)
    g = b.node.graph
    item = g.call_function(operator.getitem, (b.node, 1))
    item.meta["val"] = b.full_out[1]
    d = decide(OpView(item, N, {b.node: (S(1), R)}))
    assert d.out == R and not d.need


def test_fallback_ops_are_absent_from_rules() -> None:
    assert aten.sort.default not in RULES and aten.flip.default not in RULES


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.op is aten.matmul.default], ids=lambda c: c.id
)
def test_matmul_output_dims_are_in_range(case: Case) -> None:
    """Every matmul decision names a dim of its result (0 <= d < its rank): a negative dim
    would break later rules' dim arithmetic (elementwise's offsets)."""
    b = build(case)
    out = run_rule(case, b).out
    if isinstance(out, Shard):
        assert 0 <= out.dim < b.node.meta["val"].dim(), out


def test_linear_refuses_a_weight_another_use_split() -> None:
    """A tied weight split on the tp axis by one use (vocab-parallel embedding) cannot be
    gathered for a replicated use: the parameter itself is stored split. Refuse, naming it."""
    case = Case("tied", aten.linear.default, (T((4, 8, 16)), T((32, 16), S(0), param=True)))
    with pytest.raises(NotImplementedError, match="split by another use"):
        run_rule(case, build(case))

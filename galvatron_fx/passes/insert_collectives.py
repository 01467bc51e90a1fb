"""Collectives: make the placements concrete for one rank.

Reads: `gfx_placement`, `gfx_layer`, `val`; `ctx.target` (plan, rank, micro-batches).
Writes: new `call_function` nodes for every redistribution (`runtime.collectives`), local
sizes in `view`/`reshape`/`expand`/`split`/`new_*` arguments, this rank's slice of every
tensor-parallel parameter (replacing the parameter on the module), `val` with local shapes,
and `ctx.params`: a `ParamSpec` per parameter (how it is split, which groups its
gradient must be summed over).
Guarantees:
- the graph computes, on every rank, its piece of what the original graph computes;
- row-parallel linears lose their bias, which is added once after the reduction;
- a replicated value that requires grad and feeds split compute goes through `tp_copy`
  (Megatron's f), so gradients of replicated values are whole on every rank;
- conversions of one value to one placement are inserted once and shared by their users.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import fx, nn
from torch.distributed.tensor import Partial, Replicate, Shard

from galvatron_fx.meta import LAYER, PLACEMENT, NodePlacement
from galvatron_fx.passes.annotate_costs import requires_grad_nodes
from galvatron_fx.passes.manager import PassContext, graph_pass
from galvatron_fx.passes.shard import mesh_of, unit_strategies
from galvatron_fx.passes.shard_rules import slice_bounds
from galvatron_fx.plan import LayerStrategy, Plan
from galvatron_fx.runtime import collectives as C
from galvatron_fx.runtime.mesh import Layout, Mesh, plan_switch, plan_switch_grad
from galvatron_fx.runtime.program import ParamSpec, get_attr, set_attr
from galvatron_fx.runtime.state import take_shard
from galvatron_fx.runtime.vocab import vocab_cross_entropy, vocab_embedding

__all__ = ["insert_collectives", "local_shape"]

aten = torch.ops.aten
R = Replicate()
_SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
_NEW = {
    aten.new_ones.default,
    aten.new_zeros.default,
    aten.new_empty.default,
    aten.new_full.default,
}


def local_shape(shape: tuple[int, ...], dp: Any, tp: Any, mesh: Mesh) -> tuple[int, ...]:
    out = list(shape)
    for p, n in ((dp, mesh.dp), (tp, mesh.tp)):
        if isinstance(p, Shard):
            out[p.dim] //= n
    return tuple(out)


@graph_pass(reads=("val", LAYER.name, PLACEMENT.name), writes=(LAYER.name, PLACEMENT.name))
def insert_collectives(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Rewrite the graph into rank `ctx.target.rank`'s program."""
    target = ctx.require_target("insert_collectives")
    rewrite = _Rewrite(gm, target.plan, target.rank)
    rewrite.count_targets = target.micro_batches > 1
    ctx.params = rewrite.run()
    gm.graph.lint()
    if target.codegen:  # a rewrite for pricing never runs the module
        gm.recompile()
    return gm


def _mean_cross_entropy(node: fx.Node) -> bool:
    """A cross-entropy averaged over its counted targets, with no weights or smoothing."""
    if node.target not in (aten.cross_entropy_loss.default, vocab_cross_entropy):
        return False
    args = list(node.args) + [None, 1, -100, 0.0][len(node.args) - 2 :]
    return bool(args[2] is None and args[3] == 1 and not args[5])


class _Rewrite:
    count_targets = False
    """The batch is cut into micro-batches: every mean cross-entropy becomes sum / count."""

    def __init__(self, gm: fx.GraphModule, plan: Plan, rank: int) -> None:
        self.gm, self.plan, self.rank = gm, plan, rank
        self.strategies = unit_strategies(gm, plan)
        self.names = {n.name: n for n in gm.graph.nodes}
        self.cache: dict[tuple[Any, ...], fx.Node] = {}
        self.grad = requires_grad_nodes(gm)
        self.fake_mode = next(
            n.meta["val"].fake_mode
            for n in gm.graph.nodes
            if isinstance(n.meta.get("val"), torch._subclasses.FakeTensor)
        )

    def mesh(self, node: fx.Node) -> Mesh:
        return mesh_of(self.strategy(node), self.plan.world_size)

    def strategy(self, node: fx.Node) -> LayerStrategy:
        return self.strategies[LAYER.get(node).name]

    def group(self, node: fx.Node, axis: str) -> C.GroupRef:
        return C.GroupRef(self.mesh(node).group(axis, self.rank))

    def run(self) -> dict[str, ParamSpec]:
        specs = self._shard_params()
        for node in list(self.gm.graph.nodes):
            if node.op in ("call_function", "output"):
                self._rewrite_node(node)
        self._set_local_vals()
        return specs

    # parameters --------------------------------------------------------------------------

    def _shard_params(self) -> dict[str, ParamSpec]:
        split: dict[fx.Node, tuple[int, tuple[int, ...]]] = {}
        grad_tp: set[fx.Node] = set()
        for node in self.gm.graph.nodes:
            p = PLACEMENT.get(node)
            for name, axis, want in p.needs:
                a = self.names[name]
                if a.op == "get_attr" and axis == "tp" and isinstance(want, Shard):
                    split[a] = (want.dim, p.blocks if "column" in p.kinds else ())
            for a in node.all_input_nodes:
                if a.op == "get_attr" and _split_out(p.tp) and not _wants_shard(p, a.name):
                    grad_tp.add(a)
        specs = {}
        for nodes in _aliases(self.gm).values():
            first = nodes[0]
            self._check_tied(nodes, split)
            used = [n for n in nodes if n in split]  # export may fetch a tied weight once
            how = split.get(used[0]) if used else None
            spec = self._param_spec(first, how, any(n in grad_tp for n in nodes))
            specs[_name(first)] = spec
            for n in nodes[1:]:  # tied parameters: one object under several names
                set_attr(self.gm, _name(n), get_attr(self.gm, _name(first)))
                specs[_name(n)] = replace(spec, name=_name(n), alias_of=_name(first))
        return specs

    def _check_tied(
        self, nodes: list[fx.Node], split: dict[fx.Node, tuple[int, tuple[int, ...]]]
    ) -> None:
        names = [n.target for n in nodes]
        if len({split.get(n) for n in nodes if n.users}) > 1:
            raise ValueError(
                f"tied parameter {names}: its uses need different tensor-parallel splits"
            )
        if len({self.mesh(n) for n in nodes}) > 1:
            units = sorted({LAYER.get(n).name for n in nodes})
            raise NotImplementedError(
                f"tied parameter {names} is used by units {units} with different tp/dp layouts; "
                "give these units the same tp, dp and tp_consecutive"
            )

    def _param_spec(
        self, node: fx.Node, split: tuple[int, tuple[int, ...]] | None, grad_tp: bool
    ) -> ParamSpec:
        param = get_attr(self.gm, _name(node))
        if self.strategy(node).ulysses and grad_tp:
            # whole weights on every rank of the stage, each gradient a partial sum over the
            # sequence pieces: one data-parallel group of them all sums sequence and batch
            # pieces at once (a weight used on a replicated input keeps the groups below)
            every = C.GroupRef(tuple(range(self.mesh(node).world_size)))
            me = C.GroupRef((self.rank,))
            shape = tuple(param.shape)
            return ParamSpec(_name(node), LAYER.get(node).name, shape, tp_group=me, dp_group=every)
        spec = ParamSpec(
            _name(node),
            LAYER.get(node).name,
            tuple(param.shape),
            tp_group=self.group(node, "tp"),
            dp_group=self.group(node, "dp"),
            grad_sum_tp=grad_tp and self.strategy(node).tp > 1,
        )
        if split is None or spec.tp_group.size == 1:
            return spec
        dim, blocks = split
        local = take_shard(
            param.detach(), dim, blocks, spec.tp_group.size, spec.tp_group.index(self.rank)
        )
        set_attr(self.gm, _name(node), nn.Parameter(local, requires_grad=param.requires_grad))
        return replace(spec, tp_dim=dim, blocks=blocks)

    # nodes -------------------------------------------------------------------------------

    def _rewrite_node(self, node: fx.Node) -> None:
        p = PLACEMENT.get(node)
        current: dict[fx.Node, tuple[fx.Node, Any, Any]] = {
            a: (a, *_pair(PLACEMENT.get(a))) for a in node.all_input_nodes
        }
        for name, axis, want in _composed(p.needs):
            a = self.names[name]
            if a.op == "get_attr":
                continue
            cur, dp, tp = current[a]
            if axis == "switch":
                cur, (dp, tp) = self._switch(cur, a, node, dp, tp, want), want
            else:
                have = dp if axis == "dp" else tp
                if have == want:
                    continue
                # the gathered value's gradient is a partial sum only where the node itself
                # reads it whole into split compute; split again, it comes back whole
                partial = _split_out(getattr(p, axis)) and not isinstance(want, Shard)
                cur = self._convert(cur, node, axis, have, want, partial)
                dp, tp = (want, tp) if axis == "dp" else (dp, want)
            current[a] = (cur, dp, tp)
        for a, (cur, _, tp) in current.items():
            if cur is not a:
                node.replace_input_with(a, cur)
            if self._needs_copy(node, p, a, cur, tp):
                node.replace_input_with(
                    cur,
                    self._insert(
                        node,
                        C.tp_copy,
                        (cur, self.group(node, "tp").ranks),
                        cur,
                        PLACEMENT.get(cur).dp,
                        R,
                    ),
                )
        if "row" in p.kinds:
            self._row_parallel(node, p)
        if "ulysses" in p.kinds:
            self._ulysses_back(node, p)
        if "vocab" in p.kinds:
            self._vocab_embedding(node)
        if "vocab_ce" in p.kinds:
            self._vocab_cross_entropy(node)
        if "global_mean" in p.kinds or (self.count_targets and _mean_cross_entropy(node)):
            # with micro-batches, an unsplit mean too: train_step weighs micro-batches by
            # their counts (a mean of micro-batch means is not the batch's mean)
            self._global_mean(node, p)
        self._local_args(node, p)

    def _vocab_start(self, node: fx.Node, rows: int) -> int:
        """The first vocabulary row this rank holds, `rows` per rank."""
        return self.group(node, "tp").index(self.rank) * rows

    def _vocab_embedding(self, node: fx.Node) -> None:
        weight, idx = _a(node)[0], _a(node)[1]
        rows = get_attr(self.gm, weight.target).shape[0]
        node.target = vocab_embedding
        padding_idx = _a(node)[2] if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
        node.args, node.kwargs = (weight, idx, self._vocab_start(node, rows), padding_idx), {}

    def _vocab_cross_entropy(self, node: fx.Node) -> None:
        args: list[Any] = list(node.args) + [None, 1, -100, 0.0][len(node.args) - 2 :]
        width = int(_global_val(args[0]).shape[1]) // self.group(node, "tp").size
        node.target = vocab_cross_entropy
        ranks = self.group(node, "tp").ranks
        node.args = (*args[:6], self._vocab_start(node, width), ranks)
        node.kwargs = {}

    def _global_mean(self, node: fx.Node, p: NodePlacement) -> None:
        """Mean cross-entropy on a batch split: local sum / global count of counted targets."""
        args = list(node.args) + [None, 1, -100, 0.0][len(node.args) - 2 :]
        target, ignore_index = args[1], args[4]
        node.args = (*args[:3], 2, *args[4:])  # reduction: sum
        users = list(node.users)
        anchor = node.next
        # a loss replicated over dp (its unit took the whole batch) counts its own targets
        split = "global_mean" in p.kinds
        group = self.group(node, "dp").ranks if split else (self.rank,)
        count = self._insert(anchor, C.global_count, (target, ignore_index, group), node, R, R)
        LAYER.set(count, LAYER.get(node))  # the loss's stage counts (the next node may not be)
        out = self._insert(anchor, aten.div.Tensor, (node, count), node, p.dp, p.tp)
        for u in users:
            u.replace_input_with(node, out)
        self.names[node.name] = out  # later needs on this value apply to what replaced it

    def _needs_copy(
        self, node: fx.Node, p: NodePlacement, a: fx.Node, cur: fx.Node, tp: Any
    ) -> bool:
        """Megatron f on the tp axis: a replicated activation that needs a gradient and feeds
        compute split across the TP group gets its gradient all-reduced, unless it comes out
        of a gather whose backward already sums the partial gradients."""
        return (
            node.op == "call_function"
            and _split_out(p.tp)
            and isinstance(tp, Replicate)
            and self.strategy(node).tp > 1
            and a.op not in ("get_attr", "placeholder")
            and self.grad.get(a, False)
            and cur.target is not C.gather_partial
        )

    def _insert(
        self, before: fx.Node, fn: Any, args: tuple[Any, ...], like: fx.Node, dp: Any, tp: Any
    ) -> fx.Node:
        """A collective node before `before`, in `before`'s unit, with a local `val`."""
        key = (fn, *args)
        if key in self.cache:
            return self.cache[key]
        with self.gm.graph.inserting_before(before):
            new = self.gm.graph.call_function(fn, args)
        new.meta["gfx_layer"] = LAYER.get(before)
        new.meta["nn_module_stack"] = before.meta.get("nn_module_stack", {})
        new.meta["_global_val"] = _global_val(like)
        PLACEMENT.set(new, NodePlacement(dp, tp, "collective"))
        self.grad[new] = self.grad.get(like, False)  # it stands for `like` to later readers
        self.cache[key] = new
        return new

    def _convert(
        self, x: fx.Node, node: fx.Node, axis: str, have: Any, want: Any, split_out: bool
    ) -> fx.Node:
        """Redistribute `x` on one axis. Gradients of replicated values are whole on the tp
        axis (the loss is replicated there) and partial sums on the dp axis (each replica's
        loss covers its own batch slice): the backward halves differ accordingly."""
        g = self.group(node, axis)
        dp_tp = lambda q: (q, PLACEMENT.get(x).tp) if axis == "dp" else (PLACEMENT.get(x).dp, q)  # noqa: E731
        if isinstance(have, Partial):
            if isinstance(want, Shard):
                out = self._insert(node, C.reduce_scatter, (x, want.dim, g.ranks), x, *dp_tp(want))
            else:
                fn = C.reduce_both if axis == "dp" else C.tp_reduce
                out = self._insert(node, fn, (x, g.ranks), x, *dp_tp(R))
            if have.reduce_op == "avg":  # partial means: the sum over ranks / n
                out = self._insert(
                    node, aten.div.Tensor, (out, float(g.size)), out, *_pair(PLACEMENT.get(out))
                )
            return out
        if axis == "tp" and isinstance(have, Shard) and isinstance(want, Shard):
            # one exchange moves the split (Ulysses' sequence -> heads); gathering and then
            # slicing would move P times the bytes
            order = C.memory_order(_global_val(x))
            args = (x, have.dim, want.dim, order, g.ranks)
            return self._insert(node, C.all_to_all, args, x, *dp_tp(want))
        if isinstance(have, Shard):
            gather = C.gather_partial if axis == "dp" or split_out else C.gather_whole
            x = self._insert(node, gather, (x, have.dim, g.ranks), x, *dp_tp(R))
        if isinstance(want, Shard):
            split = C.split_zero if axis == "dp" else C.split_local
            x = self._insert(node, split, (x, want.dim, g.ranks), x, *dp_tp(want))
        return x

    def _switch(
        self, x: fx.Node, orig: fx.Node, node: fx.Node, dp: Any, tp: Any, want: Any
    ) -> fx.Node:
        src_mesh, dst_mesh = self.mesh(orig), self.mesh(node)
        if isinstance(tp, Partial):  # a partial sum is summed on its own mesh before it moves
            x, tp = self._reduce_in_place(x, orig, dp), R
        shape = tuple(_global_val(orig).shape)
        src = Layout(src_mesh, shape, _dim(dp), _dim(tp))
        dst = Layout(dst_mesh, shape, _dim(want[0]), _dim(want[1]))
        fwd = tuple(C.as_step(s) for s in plan_switch(src, dst, self.rank))
        # a value replicated across dp has a partial-sum gradient on its dp group: the
        # backward sums it where `orig`'s dp groups would not (`mesh.plan_switch_grad`);
        # a value without a gradient (a mask, token ids) has no backward to plan or price
        back, scale = plan_switch_grad(src, dst, self.rank) if self.grad.get(orig) else ([], 1.0)
        bwd = tuple(C.as_step(s) for s in back)
        if not fwd and not bwd and scale == 1.0:
            return x
        return self._insert(node, C.switch_layout, (x, fwd, bwd, scale), orig, *want)

    def _reduce_in_place(self, x: fx.Node, orig: fx.Node, dp: Any) -> fx.Node:
        """Megatron g on `x` right after it, in `orig`'s unit, over `orig`'s TP group (a
        unit's vocab-parallel embedding hands its next unit a partial sum, say)."""
        key = (C.tp_reduce, x)
        if key not in self.cache:
            with self.gm.graph.inserting_after(x):
                new = self.gm.graph.call_function(C.tp_reduce, (x, self.group(orig, "tp").ranks))
            new.meta["gfx_layer"] = LAYER.get(orig)
            new.meta["nn_module_stack"] = orig.meta.get("nn_module_stack", {})
            new.meta["_global_val"] = _global_val(orig)
            PLACEMENT.set(new, NodePlacement(dp, R, "collective"))
            self.cache[key] = new
        return self.cache[key]

    def _row_parallel(self, node: fx.Node, p: NodePlacement) -> None:
        """linear(x, W_split, b) -> g(linear(x, W_split)) + b: the bias is added once."""
        is_addmm = node.target == aten.addmm.default
        bias = _a(node)[0] if is_addmm else (_a(node)[2] if len(node.args) > 2 else None)
        if is_addmm:
            node.target, node.args = aten.mm.default, (_a(node)[1], _a(node)[2])
        else:
            node.args = _a(node)[:2]
        users = list(node.users)
        anchor = node.next
        g = self.group(node, "tp")
        if isinstance(p.tp, Shard):
            red = self._insert(
                anchor, C.reduce_scatter, (node, p.tp.dim, g.ranks), node, p.dp, p.tp
            )
        else:
            red = self._insert(anchor, C.tp_reduce, (node, g.ranks), node, p.dp, R)
        out = red
        if isinstance(bias, fx.Node):
            out = self._insert(anchor, aten.add.Tensor, (red, bias), node, p.dp, p.tp)
        for u in users:
            u.replace_input_with(node, out)
        self.names[node.name] = out  # later needs on this value apply to what replaced it

    def _ulysses_back(self, node: fx.Node, p: NodePlacement) -> None:
        """Attention ran on its share of the heads (dim 1) over the whole sequence: an
        all-to-all hands every rank its share of the sequence (dim 2) again."""
        assert isinstance(p.tp, Shard)
        users = list(node.users)
        back = self._insert(
            node.next, C.all_to_all,
            (node, 1, p.tp.dim, C.memory_order(_global_val(node)), self.group(node, "tp").ranks),
            node, p.dp, p.tp,
        )  # fmt: skip
        for u in users:
            u.replace_input_with(node, back)
        PLACEMENT.set(node, replace(p, tp=Shard(1)))
        self.names[node.name] = back  # later needs on this value apply to what replaced it

    def _local_args(self, node: fx.Node, p: NodePlacement) -> None:
        """Sizes baked into arguments become this rank's local sizes."""
        mesh = self.mesh(node)
        if node.target in _SIZED or node.target in _NEW:
            node.args = (
                _a(node)[0],
                list(local_shape(_gshape(node), p.dp, p.tp, mesh)),
                *_a(node)[2:],
            )
        elif node.target in (aten.split.Tensor, aten.split_with_sizes.default):
            vals = node.meta["val"]
            sizes = [
                local_shape(tuple(v.shape), p.dp[i], p.tp[i], mesh) for i, v in enumerate(vals)
            ]
            dim: Any = _a(node)[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            local = [s[dim] for s in sizes]
            node.args = (
                _a(node)[0],
                local[0] if node.target == aten.split.Tensor else local,
                *_a(node)[2:],
            )
        elif node.target == aten.slice.Tensor and isinstance(p.tp, Shard):
            self._local_slice(node, p.tp.dim, mesh.tp)

    def _local_slice(self, node: fx.Node, split_dim: int, n: int) -> None:
        """A slice of one block of the split dim (`qkv[..., H:2H]`): each rank takes the
        same block of its piece, at 1/n of the offsets."""
        dim = _a(node)[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        src = _global_val(_a(node)[0])
        if dim % src.dim() != split_dim or tuple(_global_val(node).shape) == tuple(src.shape):
            return
        start, stop = slice_bounds(node)
        node.args, node.kwargs = (_a(node)[0], split_dim, start // n, stop // n), {}

    # vals --------------------------------------------------------------------------------

    def _set_local_vals(self) -> None:
        for node in self.gm.graph.nodes:
            p = PLACEMENT.get(node)
            val = _global_val(node)
            node.meta.pop("_global_val", None)
            mesh = self.mesh(node)
            if isinstance(val, torch.Tensor):
                node.meta["val"] = self._fake(local_shape(tuple(val.shape), p.dp, p.tp, mesh), val)
            elif isinstance(val, (tuple, list)) and isinstance(p.dp, tuple):
                node.meta["val"] = tuple(
                    self._fake(local_shape(tuple(v.shape), p.dp[i], p.tp[i], mesh), v)
                    for i, v in enumerate(val)
                )
            if node.op == "get_attr":
                node.meta["val"] = self._fake(tuple(get_attr(self.gm, node.target).shape), val)

    def _fake(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        with self.fake_mode:
            return torch.empty(shape, dtype=like.dtype)


def _composed(needs: tuple[tuple[str, str, Any], ...]) -> list[tuple[str, str, Any]]:
    """The needs with consecutive conversions of one input on one axis made one: a value
    gathered on entering a unit and split again by its consumer moves once, from what it
    had to what the consumer wants (nothing, where those are the same), and its gradient
    takes the one matching adjoint."""
    out: list[tuple[str, str, Any]] = []
    last: dict[str, int] = {}  # input -> its latest entry in `out`
    for name, axis, want in needs:
        k = last.get(name)
        if k is not None and axis != "switch" and out[k][1] == axis:
            out[k] = (name, axis, want)
        else:
            last[name] = len(out)
            out.append((name, axis, want))
    return out


def _aliases(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """`get_attr` nodes grouped by the object they fetch, in graph order."""
    out: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            out.setdefault(id(get_attr(gm, _name(node))), []).append(node)
    return out


def _global_val(node: fx.Node) -> Any:
    """The value's global (unsplit) fake; new nodes keep it aside until local vals are set."""
    return node.meta["_global_val"] if "_global_val" in node.meta else node.meta.get("val")


def _pair(p: NodePlacement) -> tuple[Any, Any]:
    return p.dp, p.tp


def _dim(p: Any) -> int | None:
    return p.dim if isinstance(p, Shard) else None


def _split_out(p: Any) -> bool:
    first = p[0] if isinstance(p, tuple) and p else p
    return isinstance(first, (Shard, Partial))


def _wants_shard(p: NodePlacement, name: str) -> bool:
    return any(n == name and a == "tp" and isinstance(w, Shard) for n, a, w in p.needs)


def _gshape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def _a(node: fx.Node) -> Any:
    """A node's arguments, untyped: the caller knows the op's signature."""
    return node.args


def _name(node: fx.Node) -> str:
    """A `get_attr` node's target: the attribute's dotted path."""
    return str(node.target)

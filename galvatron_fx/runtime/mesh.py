"""Device meshes of layers and the redistributions between them: pure rank arithmetic.

A layer with strategy (tp, dp) runs on a 2-D mesh of the stage's ranks: consecutive TP
groups (`rank = dp_index * tp + tp_index`) or strided ones (`rank = tp_index * dp +
dp_index`). A tensor's layout on a mesh is one placement per axis; `held_slice` says which
slice of the global tensor a rank holds. `plan_switch` turns two layouts into the gathers and
slices every rank must run, with the smallest groups that make the gathers consistent;
`plan_switch_grad` the steps and the factor that carry its gradient back.
No torch here: the runtime executes these steps and the cost model prices them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

__all__ = ["Gather", "Layout", "Mesh", "Reduce", "SliceStep", "grad_is_partial", "plan_switch"]
__all__ += ["plan_switch_grad"]


@dataclass(frozen=True)
class Mesh:
    world_size: int
    tp: int
    dp: int
    consecutive: bool = True

    def __post_init__(self) -> None:
        if self.tp * self.dp != self.world_size:
            raise ValueError(f"mesh tp={self.tp} x dp={self.dp} != world size {self.world_size}")

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp index, tp index) of a rank."""
        if self.consecutive:
            return rank // self.tp, rank % self.tp
        return rank % self.dp, rank // self.dp

    def rank(self, dp_index: int, tp_index: int) -> int:
        if self.consecutive:
            return dp_index * self.tp + tp_index
        return tp_index * self.dp + dp_index

    def group(self, axis: str, rank: int) -> tuple[int, ...]:
        """The ranks of `rank`'s group along `axis` ('tp' or 'dp'), in axis order."""
        d, t = self.coords(rank)
        if axis == "tp":
            return tuple(self.rank(d, i) for i in range(self.tp))
        return tuple(self.rank(i, t) for i in range(self.dp))

    def groups(self, axis: str) -> list[tuple[int, ...]]:
        return sorted({self.group(axis, r) for r in range(self.world_size)})

    def size(self, axis: str) -> int:
        return self.tp if axis == "tp" else self.dp

    def index(self, axis: str, rank: int) -> int:
        d, t = self.coords(rank)
        return t if axis == "tp" else d


Interval = tuple[int, int]


@dataclass(frozen=True)
class Layout:
    """A tensor of global `shape` on `mesh`, split on dim `dp_dim` across the dp axis and on
    `tp_dim` across the tp axis (None: replicated on that axis)."""

    mesh: Mesh
    shape: tuple[int, ...]
    dp_dim: int | None = None
    tp_dim: int | None = None

    def held_slice(self, rank: int) -> tuple[Interval, ...]:
        out = [(0, s) for s in self.shape]
        for axis, dim in (("dp", self.dp_dim), ("tp", self.tp_dim)):
            if dim is None:
                continue
            lo, hi = out[dim]
            step = (hi - lo) // self.mesh.size(axis)
            i = self.mesh.index(axis, rank)
            out[dim] = (lo + i * step, lo + (i + 1) * step)
        return tuple(out)


@dataclass(frozen=True)
class Gather:
    """All-gather along `dim` in `group` (the caller's own group, in concatenation order)."""

    dim: int
    group: tuple[int, ...]


@dataclass(frozen=True)
class SliceStep:
    """Keep `[start, stop)` of dim `dim` (in the coordinates of what the rank holds)."""

    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class Reduce:
    """All-reduce (sum) in `group`: a gradient that is a partial sum over it made whole."""

    group: tuple[int, ...]


def plan_switch(src: Layout, dst: Layout, rank: int) -> list[Gather | SliceStep]:
    """The steps that turn `rank`'s piece under `src` into its piece under `dst`: gathers
    first (along each dim some rank lacks), then local slices. Gathers use the smallest groups
    of ranks holding distinct, adjacent pieces; every rank computes the same groups."""
    world = src.mesh.world_size
    held = [list(src.held_slice(r)) for r in range(world)]
    need = [dst.held_slice(r) for r in range(world)]
    steps: list[Gather | SliceStep] = []
    for dim in range(len(src.shape)):
        if all(_covers(held[r][dim], need[r][dim]) for r in range(world)):
            continue
        groups = _smallest_groups(held, need, dim)
        if groups is None:
            raise NotImplementedError(f"layout switch {src} -> {dst}: cannot gather dim {dim}")
        steps.append(Gather(dim, groups[rank]))
        for r in range(world):
            members = groups[r]
            held[r][dim] = (held[members[0]][dim][0], held[members[-1]][dim][1])
    for dim, ((lo, hi), (a, b)) in enumerate(zip(held[rank], need[rank], strict=True)):
        if (lo, hi) != (a, b):
            steps.append(SliceStep(dim, a - lo, b - lo))
    return steps


def _smallest_groups(
    held: list[list[Interval]], need: list[tuple[Interval, ...]], dim: int
) -> dict[int, tuple[int, ...]] | None:
    """Groups for a gather along `dim`: preferably only the ranks that need the same piece
    (dp4 -> dp2 x tp2 gathers in pairs), else all ranks that agree on the other dims."""
    for needs in (need, None):
        try:
            groups = _gather_groups(held, dim, needs)
        except NotImplementedError:
            continue
        if all(
            _covers((held[g[0]][dim][0], held[g[-1]][dim][1]), need[r][dim])
            for r, g in groups.items()
        ):
            return groups
    return None


def _covers(have: Interval, want: Interval) -> bool:
    return have[0] <= want[0] and want[1] <= have[1]


def _gather_groups(
    held: list[list[Interval]], dim: int, need: list[tuple[Interval, ...]] | None
) -> dict[int, tuple[int, ...]]:
    """Group ranks that agree on every other dim (and on the piece of `dim` they need, when
    `need` is given); within a group, one rank per distinct piece of `dim`, matched by
    position among the ranks holding the same piece."""
    world = len(held)
    same: dict[tuple[Interval, ...], list[int]] = {}
    for r in range(world):
        same.setdefault(tuple(held[r]), []).append(r)
    groups: dict[tuple[object, ...], list[int]] = {}
    for r in range(world):
        others = tuple(iv for k, iv in enumerate(held[r]) if k != dim)
        wanted = need[r][dim] if need is not None else None
        key = (others, wanted, same[tuple(held[r])].index(r))
        groups.setdefault(key, []).append(r)
    out: dict[int, tuple[int, ...]] = {}
    for members in groups.values():
        members.sort(key=lambda s: held[s][dim][0])
        pieces = [held[s][dim] for s in members]
        if any(a[1] != b[0] for a, b in itertools.pairwise(pieces)):
            raise NotImplementedError(f"ranks {members} hold non-adjacent pieces {pieces}")
        for s in members:
            out[s] = tuple(members)
    return out


def grad_is_partial(layout: Layout) -> bool:
    """Whether a value in `layout` has a gradient that is a partial sum over the rank's dp
    group: it is replicated across a dp axis of more than one rank, each replica
    differentiating its own part of the batch's loss (the gradient sync sums them). Any
    other value's gradient is whole: each rank holds the true gradient of its piece."""
    return layout.dp_dim is None and layout.mesh.dp > 1


def plan_switch_grad(
    src: Layout, dst: Layout, rank: int
) -> tuple[list[Gather | SliceStep | Reduce], float]:
    """The backward of `plan_switch(src, dst)`: the steps, then the factor, that turn
    `rank`'s gradient under `dst` into its gradient under `src` (`grad_is_partial` says
    what each side's gradient is).

    A partial sum on `dst` is summed over the dst dp group first (`Reduce`), so it is whole
    before it moves; a whole gradient arriving at a partial `src` is divided by the src dp
    degree, so that its dp group sums it back to whole. One case needs no sum: partial on
    both sides, moved by local slices only, where every src dp group is a union of dst dp
    groups (dp4 -> tp2 x dp2): a src group's sum then holds every dst group's sum,
    dp_src / dp_dst times over, and the factor dp_dst / dp_src undoes it. Elsewhere (a
    tp4 x dp1 unit handing a tp2 x dp2 one a value without the batch, say) the dst pieces
    one src group holds do not sum to the gradient, and no factor makes them."""
    steps: list[Gather | SliceStep | Reduce] = list(plan_switch(dst, src, rank))
    if not grad_is_partial(dst):
        return steps, 1 / src.mesh.dp if grad_is_partial(src) else 1.0
    local = all(isinstance(s, SliceStep) for s in steps)
    if grad_is_partial(src) and local and _dp_groups_nest(src.mesh, dst.mesh):
        return steps, dst.mesh.dp / src.mesh.dp
    steps.insert(0, Reduce(dst.mesh.group("dp", rank)))
    return steps, 1 / src.mesh.dp if grad_is_partial(src) else 1.0


def _dp_groups_nest(outer: Mesh, inner: Mesh) -> bool:
    """Every dp group of `outer` is a union of dp groups of `inner`."""
    return all(
        set(inner.group("dp", m)) <= set(outer.group("dp", r))
        for r in range(outer.world_size)
        for m in outer.group("dp", r)
    )

"""Mesh arithmetic and layout switches, checked by running the planned steps on real tensors.

`simulate` starts every rank from its `held_slice` of a global `arange` tensor, runs the
gathers of `plan_switch` in lockstep (each rank concatenates its group's pieces in group
order), then each rank's local slices, and checks that every rank ends with exactly its
piece under the destination layout. `simulate_grad` runs the backward
(`plan_switch_grad`) on gradients that are whole, or partial sums over the dp group where a
value is replicated across dp, and checks each rank ends with what its source side expects.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from galvatron_fx.runtime.mesh import (
    Gather,
    Layout,
    Mesh,
    Reduce,
    SliceStep,
    grad_is_partial,
    plan_switch,
    plan_switch_grad,
)

# -- Mesh -----------------------------------------------------------------------------------


def meshes(world: int) -> list[Mesh]:
    return [
        Mesh(world, tp, world // tp, consecutive)
        for tp in range(1, world + 1)
        if world % tp == 0
        for consecutive in (True, False)
    ]


@pytest.mark.parametrize("mesh", meshes(8) + meshes(12), ids=repr)
def test_coords_rank_round_trip(mesh: Mesh) -> None:
    seen = set()
    for r in range(mesh.world_size):
        d, t = mesh.coords(r)
        assert 0 <= d < mesh.dp and 0 <= t < mesh.tp
        assert mesh.rank(d, t) == r
        assert (mesh.index("dp", r), mesh.index("tp", r)) == (d, t)
        seen.add((d, t))
    assert len(seen) == mesh.world_size


@pytest.mark.parametrize("mesh", meshes(8) + meshes(12), ids=repr)
def test_groups_partition_the_world(mesh: Mesh) -> None:
    world = set(range(mesh.world_size))
    for axis in ("tp", "dp"):
        groups = mesh.groups(axis)
        assert len(groups) == mesh.world_size // mesh.size(axis)
        assert all(len(g) == mesh.size(axis) for g in groups)
        assert set(itertools.chain(*groups)) == world
        assert sum(len(g) for g in groups) == mesh.world_size  # disjoint
        for r in world:  # each rank's group holds it, in axis order
            g = mesh.group(axis, r)
            assert r in g and g in groups
            assert [mesh.index(axis, s) for s in g] == list(range(mesh.size(axis)))
    for tp_group, dp_group in itertools.product(mesh.groups("tp"), mesh.groups("dp")):
        assert len(set(tp_group) & set(dp_group)) == 1  # the two axes form a grid


def test_consecutive_and_strided_groups() -> None:
    consecutive, strided = Mesh(8, 2, 4), Mesh(8, 2, 4, consecutive=False)
    assert consecutive.groups("tp") == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert consecutive.groups("dp") == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert strided.groups("tp") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert strided.groups("dp") == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert consecutive.coords(5) == (2, 1) and strided.coords(5) == (1, 1)


def test_mesh_rejects_wrong_world_size() -> None:
    with pytest.raises(ValueError, match="world size"):
        Mesh(8, 3, 2)


def test_held_slice_splits_dp_then_tp() -> None:
    layout = Layout(Mesh(4, 2, 2), (8, 6), dp_dim=0, tp_dim=0)
    assert [layout.held_slice(r)[0] for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    layout = Layout(Mesh(4, 2, 2), (8, 6), dp_dim=0, tp_dim=1)
    assert layout.held_slice(3) == ((4, 8), (3, 6))
    assert Layout(Mesh(4, 4, 1), (8, 6)).held_slice(2) == ((0, 8), (0, 6))


# -- plan_switch, simulated -----------------------------------------------------------------


def _piece(g: torch.Tensor, held: tuple[tuple[int, int], ...]) -> torch.Tensor:
    return g[tuple(slice(a, b) for a, b in held)]


def simulate(src: Layout, dst: Layout) -> dict[int, list[Gather | SliceStep]]:
    """Run every rank's steps; assert each rank ends with its `dst` piece. Returns the plans."""
    world = src.mesh.world_size
    g = torch.arange(math.prod(src.shape)).reshape(src.shape)
    state = {r: _piece(g, src.held_slice(r)) for r in range(world)}
    plans = {r: plan_switch(src, dst, r) for r in range(world)}
    gathers = {r: [s for s in p if isinstance(s, Gather)] for r, p in plans.items()}
    for r, p in plans.items():  # gathers first, then local slices
        assert p[: len(gathers[r])] == gathers[r]
        assert all(isinstance(s, SliceStep) for s in p[len(gathers[r]) :])
    assert len({len(x) for x in gathers.values()}) == 1, "ranks disagree on the collectives"
    for i in range(len(gathers[0])):
        assert len({gathers[r][i].dim for r in range(world)}) == 1
        new = {}
        for r in range(world):
            group = gathers[r][i].group
            assert r in group
            assert all(gathers[m][i].group == group for m in group), "inconsistent group"
            new[r] = torch.cat([state[m] for m in group], gathers[r][i].dim)
        state = new
    for r in range(world):
        for s in plans[r][len(gathers[r]) :]:
            state[r] = state[r].narrow(s.dim, s.start, s.stop - s.start)
        assert torch.equal(state[r], _piece(g, dst.held_slice(r))), f"rank {r}"
    return plans


def dp(world: int) -> Mesh:
    return Mesh(world, 1, world)


def tp(world: int) -> Mesh:
    return Mesh(world, world, 1)


B_S_H = (8, 8, 8)  # (B, S, H)
SWITCHES = {
    "dp4->dp2tp2(R on tp)": (Layout(dp(4), B_S_H, 0), Layout(Mesh(4, 2, 2), B_S_H, 0)),
    "dp2tp2->dp4": (Layout(Mesh(4, 2, 2), B_S_H, 0), Layout(dp(4), B_S_H, 0)),
    "tp4(hidden)->dp4": (Layout(tp(4), B_S_H, tp_dim=2), Layout(dp(4), B_S_H, 0)),
    "tp4(R)->dp4": (Layout(tp(4), B_S_H), Layout(dp(4), B_S_H, 0)),
    "dp4->tp4(R)": (Layout(dp(4), B_S_H, 0), Layout(tp(4), B_S_H)),
    "dp2tp2(seq)->dp4": (Layout(Mesh(4, 2, 2), B_S_H, 0, 1), Layout(dp(4), B_S_H, 0)),
    "dp4->dp2tp2(seq)": (Layout(dp(4), B_S_H, 0), Layout(Mesh(4, 2, 2), B_S_H, 0, 1)),
    "consecutive->strided": (
        Layout(Mesh(4, 2, 2), B_S_H, 0, 2),
        Layout(Mesh(4, 2, 2, consecutive=False), B_S_H, 0, 2),
    ),
    "strided->consecutive(seq)": (
        Layout(Mesh(4, 2, 2, consecutive=False), B_S_H, 0, 1),
        Layout(Mesh(4, 2, 2), B_S_H, 0, 1),
    ),
    "dp8->dp2tp4(R on tp)": (Layout(dp(8), B_S_H, 0), Layout(Mesh(8, 4, 2), B_S_H, 0)),
    "dp4tp2(seq)->dp2tp4(seq)": (
        Layout(Mesh(8, 2, 4), B_S_H, 0, 1),
        Layout(Mesh(8, 4, 2), B_S_H, 0, 1),
    ),
    "dp2tp4(seq)->dp8": (Layout(Mesh(8, 4, 2), B_S_H, 0, 1), Layout(dp(8), B_S_H, 0)),
    "tp8(hidden)->dp8": (Layout(tp(8), B_S_H, tp_dim=2), Layout(dp(8), B_S_H, 0)),
    "dp4tp2 consecutive->strided": (
        Layout(Mesh(8, 2, 4), B_S_H, 0, 2),
        Layout(Mesh(8, 2, 4, consecutive=False), B_S_H, 0, 2),
    ),
}


@pytest.mark.parametrize(("src", "dst"), SWITCHES.values(), ids=SWITCHES.keys())
def test_switch_gives_every_rank_its_piece(src: Layout, dst: Layout) -> None:
    simulate(src, dst)
    simulate(dst, src)


def test_narrowing_switches_need_no_collective() -> None:
    pairs = [SWITCHES["dp2tp2->dp4"], SWITCHES["tp4(R)->dp4"]]
    pairs.append((Layout(Mesh(8, 4, 2), B_S_H, 0), Layout(dp(8), B_S_H, 0)))
    for src, dst in pairs:
        plans = simulate(src, dst)
        assert not any(isinstance(s, Gather) for p in plans.values() for s in p)
        assert all(p for p in plans.values())  # but every rank narrows its piece


def test_sequence_gather_stays_inside_the_tp_group() -> None:
    src, dst = SWITCHES["dp4->dp2tp2(seq)"]
    assert simulate(dst, src)[1] == [Gather(1, (0, 1)), SliceStep(0, 2, 4)]


@pytest.mark.parametrize(
    "layout",
    [Layout(dp(4), B_S_H, 0), Layout(Mesh(8, 2, 4, False), B_S_H, 0, 1), Layout(tp(4), B_S_H)],
    ids=repr,
)
def test_identical_layouts_need_no_steps(layout: Layout) -> None:
    assert all(plan_switch(layout, layout, r) == [] for r in range(layout.mesh.world_size))


def test_dp4_to_dp2tp2_gathers_within_pairs() -> None:
    src, dst = SWITCHES["dp4->dp2tp2(R on tp)"]
    assert simulate(src, dst)[0] == [Gather(0, (0, 1))]


def grid(world: int, shape: tuple[int, ...], dedupe: bool) -> list[Layout]:
    """Every (tp, dp, consecutive, dp_dim, tp_dim) layout of `shape` on `world` ranks."""
    out: dict[object, Layout] = {}
    dims = [None, *range(len(shape))]
    for mesh in meshes(world):
        for dp_dim, tp_dim in itertools.product(dims, dims):
            layout = Layout(mesh, shape, dp_dim, tp_dim)
            key = tuple(layout.held_slice(r) for r in range(world)) if dedupe else layout
            out.setdefault(key, layout)
    return list(out.values())


@pytest.mark.parametrize(
    ("world", "shape", "dedupe"),
    [(4, (8, 8), False), (4, (4, 8, 4), True), (8, (8, 16), True)],
    ids=["world4-2d-all", "world4-3d", "world8-2d"],
)
def test_every_switch_pair(world: int, shape: tuple[int, ...], dedupe: bool) -> None:
    """All pairs of layouts: the supported switches are right; none is unsupported today."""
    layouts = grid(world, shape, dedupe)
    unsupported = []
    for src, dst in itertools.product(layouts, layouts):
        try:
            simulate(src, dst)
        except NotImplementedError:
            unsupported.append((src, dst))
    assert unsupported == []


# -- plan_switch_grad, simulated ------------------------------------------------------------


def _grads(layout: Layout, g: torch.Tensor, gen: torch.Generator) -> dict[int, torch.Tensor]:
    """Every rank's gradient of its piece of a value in `layout` whose true gradient is `g`:
    whole, or (`grad_is_partial`) unequal random shares its dp group sums to whole."""
    out = {r: _piece(g, layout.held_slice(r)).clone() for r in range(layout.mesh.world_size)}
    if grad_is_partial(layout):
        for group in layout.mesh.groups("dp"):
            noise = [torch.randn(out[m].shape, generator=gen, dtype=g.dtype) for m in group]
            mean = sum(noise) / len(group)
            for m, n in zip(group, noise, strict=True):
                out[m] = out[m] / len(group) + n - mean
    return out


def _check_grads(layout: Layout, g: torch.Tensor, got: dict[int, torch.Tensor]) -> None:
    groups = layout.mesh.groups("dp") if grad_is_partial(layout) else [(r,) for r in got]
    for group in groups:
        total = sum(got[m] for m in group)
        assert torch.allclose(total, _piece(g, layout.held_slice(group[0]))), f"ranks {group}"


def simulate_grad(src: Layout, dst: Layout) -> dict[int, list[Gather | SliceStep | Reduce]]:
    """Run every rank's backward steps on gradients in `dst`'s convention; assert they end in
    `src`'s (`_check_grads`). Returns the steps."""
    world = src.mesh.world_size
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(src.shape, generator=gen, dtype=torch.float64)
    state = _grads(dst, g, gen)
    planned = {r: plan_switch_grad(src, dst, r) for r in range(world)}
    plans = {r: p[0] for r, p in planned.items()}
    talks = {r: [s for s in p if not isinstance(s, SliceStep)] for r, p in plans.items()}
    assert len({len(t) for t in talks.values()}) == 1, "ranks disagree on the collectives"
    assert len({p[1] for p in planned.values()}) == 1, "ranks disagree on the factor"
    for i in range(len(talks[0])):
        new = {}
        for r in range(world):
            step = talks[r][i]
            assert r in step.group
            assert all(talks[m][i] == step for m in step.group), "inconsistent group"
            pieces = [state[m] for m in step.group]
            new[r] = torch.cat(pieces, step.dim) if isinstance(step, Gather) else sum(pieces)
        state = new
    for r in range(world):
        for s in plans[r][len(talks[r]) :]:
            assert isinstance(s, SliceStep)
            state[r] = state[r].narrow(s.dim, s.start, s.stop - s.start)
        state[r] = state[r] * planned[r][1]
    _check_grads(src, g, state)
    return plans


@pytest.mark.parametrize(("src", "dst"), SWITCHES.values(), ids=SWITCHES.keys())
def test_switch_gradient_of_every_rank(src: Layout, dst: Layout) -> None:
    simulate_grad(src, dst)
    simulate_grad(dst, src)


def test_a_replicated_value_into_more_dp_replicas_sums_its_gradient() -> None:
    """tp4 x dp1 -> tp2 x dp2, a value without the batch (T5's decoder input under tp=4
    segments and tp=2 dp=2 layers): each dp replica differentiates half the batch, and the
    tp4 side holds no replica to add the other half: the backward all-reduces over the dst
    dp group (the factor tp_src / tp_dst it applied before doubled one half instead)."""
    src, dst = Layout(tp(4), B_S_H), Layout(Mesh(4, 2, 2), B_S_H)
    plans = simulate_grad(src, dst)
    assert plans[0] == [Reduce((0, 2))] and plans[1] == [Reduce((1, 3))]


def test_nested_dp_groups_rescale_without_a_collective() -> None:
    """dp4 -> tp2 x dp2, replicated: a dp4 group's sum holds both dst dp groups' sums, twice
    the gradient; the factor halves it and nothing is communicated. The other way a dp2
    group holds no whole dp4 group: the gradient is summed first."""
    src, dst = Layout(dp(4), B_S_H), Layout(Mesh(4, 2, 2), B_S_H)
    assert all(plan_switch_grad(src, dst, r) == ([], 0.5) for r in range(4))
    assert plan_switch_grad(dst, src, 0) == ([Reduce((0, 1, 2, 3))], 0.5)
    simulate_grad(src, dst)
    simulate_grad(dst, src)


@pytest.mark.parametrize(
    ("world", "shape", "dedupe"),
    [(4, (4, 8), False), (8, (8, 8), True)],
    ids=["world4-2d-all", "world8-2d"],
)
def test_every_switch_pair_backward(world: int, shape: tuple[int, ...], dedupe: bool) -> None:
    """All pairs of layouts, replicated ones included: the gradient ends whole where the
    source expects it whole, and summing to whole over each dp group where partial."""
    layouts = grid(world, shape, dedupe)
    for src, dst in itertools.product(layouts, layouts):
        simulate_grad(src, dst)

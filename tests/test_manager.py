"""The pass runner: declared keys, invariants, error wrapping, printing and dumping, and a
user pass inserted into the list."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import fx

import galvatron_fx as gfx
from galvatron_fx.passes.group_layers import group_layers
from tests.conftest import TINY_GPT, build

ROOT = Path(__file__).resolve().parents[1]


def _captured():
    model, args, kwargs = build(TINY_GPT, "meta")
    return gfx.capture(model, args, kwargs), (model, args, kwargs)


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_custom_pass_from_the_example_runs_inside_the_pipeline(capsys):
    example = _load_example("custom_pass")
    names = [p.name for p in example.PASSES]
    assert names == ["group_layers", "annotate_costs", "arithmetic_intensity"]
    model, args, kwargs = build(TINY_GPT, "meta")
    result = gfx.analyze(model, args, kwargs, passes=example.PASSES)
    assert "arithmetic_intensity" in result.timings_s
    linear = next(n for n in result.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert example.INTENSITY.get(linear).flops_per_byte > 1.0
    example.main()
    assert "most memory-bound nodes" in capsys.readouterr().out


def test_a_pass_reading_a_missing_key_is_refused_with_the_key_and_node():
    gm, _ = _captured()
    with pytest.raises(gfx.PassError, match=r"reads 'gfx_layer' but node .* has none"):
        gfx.run_passes(gm, gfx.PassContext(), [gfx.FRONTEND_PASSES[1]])


@dataclass(frozen=True)
class _Mark:
    value: int


_MARK = gfx.MetaKey("gfx_test_mark", _Mark)


def test_a_pass_writing_an_undeclared_key_is_caught():
    @gfx.graph_pass(writes=())
    def sneaky(gm: fx.GraphModule, ctx: gfx.PassContext) -> fx.GraphModule:
        for node in gm.graph.nodes:
            _MARK.set(node, _Mark(1))
        return gm

    gm, _ = _captured()
    with pytest.raises(gfx.PassError, match=r"wrote 'gfx_test_mark' .* without declaring"):
        gfx.run_passes(gm, gfx.PassContext(), [sneaky])


def test_a_pass_that_forgets_nodes_it_declares_is_caught():
    @gfx.graph_pass(writes=(_MARK.name,))
    def partial(gm: fx.GraphModule, ctx: gfx.PassContext) -> fx.GraphModule:
        _MARK.set(next(iter(gm.graph.nodes)), _Mark(1))
        return gm

    gm, _ = _captured()
    with pytest.raises(gfx.PassError, match=r"left node .* without it"):
        gfx.run_passes(gm, gfx.PassContext(), [partial])


def test_invariants_catch_a_wrong_value_type_and_a_node_without_val():
    gm, _ = _captured()
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    node.meta["gfx_layer"] = "blocks.0"  # a string where a LayerTag belongs
    with pytest.raises(gfx.PassError, match=r"gfx_layer on node .* is str"):
        gfx.passes.manager.check_invariants(gm)
    del node.meta["gfx_layer"]
    del node.meta["val"]
    with pytest.raises(gfx.PassError, match="has no 'val'"):
        gfx.passes.manager.check_invariants(gm)


def test_errors_name_the_pass_and_the_passes_before_it():
    @gfx.graph_pass()
    def broken(gm: fx.GraphModule, ctx: gfx.PassContext) -> fx.GraphModule:
        raise ValueError("boom")

    model, args, kwargs = build(TINY_GPT, "meta")
    passes = gfx.insert_after(gfx.FRONTEND_PASSES, "group_layers", broken)
    with pytest.raises(gfx.PassError) as info:
        gfx.analyze(model, args, kwargs, passes=passes)
    assert str(info.value) == ("pass 'broken' failed (ran before it: capture, group_layers): boom")
    assert isinstance(info.value.__cause__, ValueError)


def test_print_after_and_dump_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GFX_DUMP_DIR", str(tmp_path))
    model, args, kwargs = build(TINY_GPT, "meta")
    gfx.analyze(model, args, kwargs, print_after=["group_layers"])
    err = capsys.readouterr().err
    assert "graph after pass 'group_layers'" in err and "layer=LayerTag(name='blocks.0'" in err
    dumped = sorted(p.name for p in tmp_path.iterdir())
    assert dumped == ["00_group_layers.txt", "01_annotate_costs.txt"]
    assert "cost=NodeCost(" in (tmp_path / "01_annotate_costs.txt").read_text()


def test_timings_cover_every_pass_in_order():
    model, args, kwargs = build(TINY_GPT, "meta")
    result = gfx.analyze(model, args, kwargs)
    assert list(result.timings_s) == ["capture", "group_layers", "annotate_costs"]
    assert all(t >= 0 for t in result.timings_s.values())


def test_pass_declarations_are_checked():
    with pytest.raises(ValueError, match="unknown meta key 'gfx_nope'"):
        gfx.graph_pass(reads=("gfx_nope",))(lambda gm, ctx: gm)
    with pytest.raises(ValueError, match="no pass named 'nope'"):
        gfx.insert_after(gfx.FRONTEND_PASSES, "nope", group_layers)
    with pytest.raises(ValueError, match="frozen dataclass"):
        gfx.MetaKey("gfx_bad", dict)

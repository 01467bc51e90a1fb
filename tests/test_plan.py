from __future__ import annotations

import json

import pytest

import galvatron_fx as gfx
from galvatron_fx.plan import (
    DPMode,
    LayerShape,
    LayerStrategy,
    PipelineConfig,
    Plan,
    PlanError,
    Recompute,
    Schedule,
)
from galvatron_fx.unit_graph.shapes import layer_shapes
from galvatron_fx.unit_graph.units import model_fingerprint
from tests.conftest import TINY_GPT, build

UNITS = ["embedding", "blocks.0", "blocks.1", "head", "loss"]


@pytest.fixture(scope="module")
def gpt_facts():
    model, args, kwargs = build(TINY_GPT, "meta")  # hidden 64, 4 heads
    gm = gfx.analyze(model, args, kwargs).graph_module
    return model_fingerprint(gm), layer_shapes(gm)


def _mixed(world_size: int = 8) -> Plan:
    plan = Plan.uniform(
        UNITS,
        LayerStrategy(tp=1, dp=4, dp_mode="zero3"),
        world_size=world_size,
        model_fingerprint="abc",
        pipeline=PipelineConfig(degree=2, stage_starts=("blocks.1",), micro_batches=4),
    )
    return plan.with_strategy("blocks.0", LayerStrategy(tp=2, sp=True, dp=2, recompute="full"))


def test_json_round_trip_is_exact(tmp_path):
    plan = _mixed()
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["model_fingerprint"] == "abc"
    assert data["strategies"][1] == {
        "unit": "blocks.0",
        "tp": 2,
        "sp": True,
        "dp": 2,
        "dp_mode": "allreduce",
        "recompute": "full",
        "tp_consecutive": True,
        "vocab_parallel": False,
        "ulysses": False,
    }
    assert loaded.strategy("blocks.0").recompute is Recompute.FULL
    assert loaded.strategy("head").dp_mode is DPMode.ZERO3
    assert loaded.pipeline.schedule is Schedule.ONE_F_ONE_B


def test_table_folds_runs_and_marks_stage_boundaries():
    text = _mixed().table()
    assert "pipeline: 2 stages x 1 chunk(s), 4 micro-batches, 1f1b" in text
    lines = text.splitlines()
    assert any("blocks.0" in line and "tp2+sp dp2/allreduce rc=full" in line for line in lines)
    assert any("-- stage boundary --" in line for line in lines)
    assert any(line.strip().startswith("blocks.1 .. loss") for line in lines)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LayerStrategy(tp=0), "tp must be an integer >= 1"),
        (lambda: LayerStrategy(sp=True), "sp needs tp > 1"),
        (lambda: LayerStrategy(dp_mode="zero4"), "dp_mode must be one of"),
        (lambda: PipelineConfig(degree=2), "2 stages need 1 stage_starts, got 0"),
        (lambda: PipelineConfig(virtual_stages=2, stage_starts=("a",)), "needs schedule"),
        (
            lambda: Plan.uniform(
                UNITS, LayerStrategy(tp=2, dp=2), world_size=8, model_fingerprint="x"
            ),
            "layer 'embedding': tp=2 x dp=2 x pp=1 = 4 devices, but world_size is 8",
        ),
        (
            lambda: Plan.uniform(
                UNITS,
                LayerStrategy(dp=2),
                world_size=4,
                model_fingerprint="x",
                pipeline=PipelineConfig(degree=2, stage_starts=("nope",)),
            ),
            "stage start 'nope' is not a unit",
        ),
    ],
)
def test_invalid_plans_name_the_field_or_layer(make, message):
    with pytest.raises(PlanError) as info:
        make()
    assert message in str(info.value)


def test_plan_checked_against_the_model(gpt_facts):
    fingerprint, shapes = gpt_facts
    assert list(shapes) == UNITS and shapes["blocks.0"].heads == (4,)
    good = Plan.uniform(
        UNITS, LayerStrategy(tp=4, dp=1), world_size=4, model_fingerprint=fingerprint
    )
    good.check_model(fingerprint, shapes)
    with pytest.raises(PlanError, match="made for model"):
        Plan.uniform(UNITS, LayerStrategy(), world_size=1, model_fingerprint="0" * 16).check_model(
            fingerprint, shapes
        )
    with pytest.raises(PlanError, match="does not match this model's layers"):
        Plan.uniform(
            ["embedding", "h.0"], LayerStrategy(), world_size=1, model_fingerprint=fingerprint
        ).check_model(fingerprint, shapes)
    too_wide = Plan.uniform(UNITS, LayerStrategy(tp=8), world_size=8, model_fingerprint=fingerprint)
    with pytest.raises(
        PlanError, match=r"layer 'blocks\.0': 4 attention heads are not divisible by tp=8"
    ):
        too_wide.check_model(fingerprint, shapes)


def test_width_not_divisible_by_tp_is_named():
    plan = Plan.uniform(["l.0"], LayerStrategy(tp=3), world_size=3, model_fingerprint="f")
    shape = LayerShape(heads=(3,), tp_split_dims=(("l.0.fc.weight[0]", 256),))
    with pytest.raises(
        PlanError, match=r"l\.0\.fc\.weight\[0\] has size 256, not divisible by tp=3"
    ):
        plan.check_model("f", {"l.0": shape})


def test_loading_bad_files_is_clear(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"world_size": 4,\n  not json')
    with pytest.raises(PlanError, match=r"p\.json: not valid JSON: .* at line 2, column 3"):
        Plan.load(path)
    data = _mixed().to_json()
    path.write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(PlanError, match="schema_version 99 is not 1"):
        Plan.load(path)
    with pytest.raises(PlanError, match="no such file"):
        Plan.load(tmp_path / "absent.json")


def _edit(data, path, value):
    """A deep copy of `data` with the field at `path` (keys and indices) set or deleted."""
    root = outer = json.loads(json.dumps(data))
    *head, last = path
    for key in head:
        outer = outer[key]
    if value is _DELETE:
        del outer[last]
    else:
        outer[last] = value
    return root


_DELETE = object()


@pytest.mark.parametrize(
    "path, value, message",
    [
        (["world_size"], "four", r"p\.json: plan\.world_size: expected an integer, got \"four\""),
        (["world_size"], True, r"world_size: expected an integer, got true"),
        (["world_size"], _DELETE, r"p\.json: plan: missing field\(s\) \['world_size'\]"),
        (["strategies"], {"a": 1}, r"strategies: expected a list \[\.\.\.\], got an object"),
        (["strategies", 0, "tp"], "2", r"strategies\[0\] \(unit 'embedding'\)\.tp: expected an"),
        (
            ["strategies", 2, "sp"],
            "yes",
            r"strategies\[2\] \(unit 'blocks\.1'\)\.sp: expected true",
        ),
        (["strategies", 1, "dp_mode"], "zero4", r"\.dp_mode: expected one of \['allreduce'"),
        (
            ["strategies", 0, "tensor_parallel"],
            2,
            r"strategies\[0\] \(unit 'embedding'\): unknown field\(s\) \['tensor_parallel'\]",
        ),
        (["strategies", 1, "unit"], 7, r"strategies\[1\]: expected an object with a \"unit\""),
        (["pipeline", "micro_batches"], 0.5, r"pipeline\.micro_batches: expected an integer"),
        (["pipeline", "stage_starts"], "blocks.1", r"pipeline\.stage_starts: expected a list"),
        (
            ["pipeline", "schedule"],
            "zigzag",
            r"plan\.pipeline\.schedule: expected one of \['gpipe'",
        ),
    ],
)
def test_malformed_plan_json_names_the_field_path(tmp_path, path, value, message):
    file = tmp_path / "p.json"
    file.write_text(json.dumps({"plan": _edit(_mixed().to_json(), path, value)}))
    with pytest.raises(PlanError, match=message):
        Plan.load(file)


def test_ulysses_strategies_validate_and_round_trip(tmp_path):
    s = LayerStrategy(tp=2, ulysses=True, dp=2, recompute="selective")
    assert s.short() == "usp2 dp2/allreduce rc=selective" and s.seq_split == 2
    for bad in ({"tp": 1}, {"sp": True}, {"vocab_parallel": True}):
        with pytest.raises(PlanError, match="ulysses"):
            LayerStrategy(**{"tp": 2, "ulysses": True, **bad})
    plan = Plan(4, (("blocks.0", s),), "abc")
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == plan
    data = json.loads((tmp_path / "p.json").read_text())
    del data["strategies"][0]["ulysses"]  # a plan written before the field: not Ulysses
    assert not Plan.from_json(data).strategy("blocks.0").ulysses
    heads = {"blocks.0": LayerShape(heads=(4,), seq_lens=(6,))}
    with pytest.raises(PlanError, match="6 sequence positions are not divisible"):
        Plan(4, (("blocks.0", LayerStrategy(tp=4, ulysses=True)),), "abc").check_model("abc", heads)
    with pytest.raises(PlanError, match="needs attention"):
        plan.check_model("abc", {"blocks.0": LayerShape()})

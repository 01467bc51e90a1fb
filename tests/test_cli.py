from __future__ import annotations

import json

import pytest

from galvatron_fx.cli import main
from tests.conftest import TINY_GPT, TINY_HF


def test_inspect_prints_the_table_and_writes_json_and_dot(tmp_path, capsys):
    out_json, out_dot = tmp_path / "gpt.json", tmp_path / "gpt.dot"
    rc = main(
        [
            "inspect",
            TINY_GPT,
            "--batch",
            "2",
            "--seq",
            "16",
            "--json",
            str(out_json),
            "--dot",
            str(out_dot),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "blocks.0" in text and "total" in text and "saved act." in text
    data = json.loads(out_json.read_text())
    assert (data["model"], data["batch"], data["seq"]) == (TINY_GPT, 2, 16)
    assert [layer["name"] for layer in data["layers"]] == [
        "embedding",
        "blocks.0",
        "blocks.1",
        "head",
        "loss",
    ]
    keys = {"name", "group", "params", "fwd_flops", "bwd_flops", "saved_activation_bytes", "nodes"}
    assert all(set(layer) == keys for layer in data["layers"])
    assert data["total"]["params"] == sum(layer["params"] for layer in data["layers"])
    dot = out_dot.read_text()
    assert dot.startswith("digraph layers {") and '"blocks.0" -> "blocks.1"' in dot


def test_inspect_hf_family(capsys):
    assert main(["inspect", TINY_HF["t5"], "--seq", "8"]) == 0
    text = capsys.readouterr().out
    assert "encoder.block.0" in text and "decoder.block.1" in text and "glue_0" in text


def test_inspect_bad_spec_is_an_error_not_a_traceback(tmp_path, capsys):
    out_json = tmp_path / "x.json"
    assert main(["inspect", "gpt:layers=oops", "--json", str(out_json)]) == 2
    assert "layers='oops' is not a number" in capsys.readouterr().err
    assert not out_json.exists()


def test_summary_matches_the_cli_table(capsys):
    import galvatron_fx as gfx
    from tests.conftest import build

    model, args, kwargs = build(TINY_GPT, "meta")
    table = gfx.summary(gfx.analyze(model, args, kwargs).graph_module)
    main(["inspect", TINY_GPT, "--batch", "2", "--seq", "16"])
    assert table in capsys.readouterr().out


def _examples(command: str) -> list[str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main([command, "--help"] if command else ["--help"])
    assert done.value.code == 0
    text = out.getvalue()
    assert "examples:" in text, command
    return [line.strip() for line in text.splitlines() if line.strip().startswith("galvatron-fx ")]


@pytest.mark.parametrize("command", ["", "inspect", "profile", "cost", "plan", "explain", "train"])
def test_every_command_has_help_with_examples_that_parse(command):
    import shlex

    from galvatron_fx.cli import _parser
    from galvatron_fx.models.spec import parse_model_spec

    found = _examples(command)
    assert len(found) >= 2, found
    for line in found:
        args = _parser().parse_args(shlex.split(line)[1:])  # exits on a bad option
        model = getattr(args, "model", None)
        if model and not model.endswith(".py:build") and model != "MODEL":
            parse_model_spec(model)


def test_quiet_and_verbose(tmp_path, capsys):
    plan = ["plan", TINY_GPT, "--memory-gb", "1", "--global-batch", "8", "--no-baselines"]
    assert main([*plan, "--json", str(tmp_path / "p.json")]) == 0
    out, err = capsys.readouterr()
    assert "plan for 8 devices" in out and "wrote" in out
    assert "configurations searched" in err and "pass annotate_costs" not in err
    assert main([*plan, "-q", "--json", str(tmp_path / "p.json")]) == 0
    out, err = capsys.readouterr()
    assert "plan for 8 devices" in out and "wrote" not in out and err == ""
    assert main([*plan, "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert "pass annotate_costs:" in err and "search:" in err and "configs" in err


def test_progress_bars_follow_the_verbosity(capsys):
    """The profiler, the layer profiler and the search all draw through `progress`; in a log
    (not a terminal) only the finished bar is written, and --quiet writes none."""
    from galvatron_fx.progress import configure, progress

    configure(0)
    for done in range(1, 5):
        progress(done, 4, "all_reduce 1024 B on 2 of 2 ranks")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[" + "#" * 30 + "] 4/4 all_reduce" in err
    configure(-1)
    progress(4, 4, "quiet")
    assert capsys.readouterr().err == ""
    configure(0)


def test_explain_space_counts_every_rule_beside_galvatron(tmp_path, capsys):
    out = tmp_path / "space.json"
    args = ["plan", TINY_GPT, "--memory-gb", "8", "--global-batch", "64", "--explain-space"]
    assert main([*args, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rows = {line[:70].strip(): line[70:].split() for line in text.splitlines()[1:]}
    assert rows["decision tree: pp first, then tp / dp / sdp once each"] == [
        "34", "73", "136", "229", "34"
    ]  # fmt: skip
    assert rows["no tree mixing dp and sdp"][0] == rows["no tree mixing dp and sdp"][-1] == "22"
    found = json.loads(out.read_text())["space"]
    assert [row["world"] for row in found] == [8, 16, 32, 64]
    for row in found:  # every rule only removes; dominance keeps a candidate per layout
        counts = [r["count"] for r in row["rules"][:4]]
        assert counts == sorted(counts, reverse=True)
        assert 0 < row["kept"] <= row["priced"] <= row["rules"][-1]["count"]


LONG_CONTEXT_LLAMA = TINY_HF["llama"] + ",max_position_embeddings=131072"


def test_plan_and_inspect_say_which_sequence_length_they_use(tmp_path, capsys):
    note = "seq 2048 (config max_position_embeddings=131072 capped at 2048; pass --seq to change)"
    plan = ["plan", LONG_CONTEXT_LLAMA, "--memory-gb", "1", "--global-batch", "8"]
    assert main([*plan, "--no-baselines"]) == 0
    assert note in capsys.readouterr().out
    out_json = tmp_path / "llama.json"
    assert main(["inspect", LONG_CONTEXT_LLAMA, "--json", str(out_json)]) == 0
    assert note in capsys.readouterr().out
    assert json.loads(out_json.read_text())["seq"] == 2048
    assert main(["inspect", LONG_CONTEXT_LLAMA, "--seq", "16"]) == 0
    assert "pass --seq to change" not in capsys.readouterr().out


FLIP_MODEL = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.proj = nn.Linear(32, 16)

    def forward(self, x):
        return x + self.proj(torch.flip(self.fc(x), dims=[-1]))  # no rule: gathers


class Flipper(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return x.pow(2).mean()


def make():
    return Flipper()
"""


def test_inspect_and_plan_verbose_list_the_ops_that_gather(tmp_path, capsys):
    path = tmp_path / "flipper.py"
    path.write_text(FLIP_MODEL)
    out_json = tmp_path / "flipper.json"
    assert main(["inspect", f"{path}:make", "--seq", "8", "--json", str(out_json)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["ops", "that", "gather", "(layers", "tp8", "dp2;", "segments", "dp16;"] in [
        r[:8] for r in rows
    ]
    flips = [r for r in rows if r[1:2] == ["aten.flip.default"]]
    assert [r[:3] for r in flips] == [
        [f"blocks.{i}", "aten.flip.default", a] for i in (0, 1) for a in ("dp", "tp")
    ]
    found = json.loads(out_json.read_text())["ops_that_gather"]
    # the loss, a mean over every dim of a batch-split value, is a partial average
    assert not [r for r in rows if r[1:2] == ["aten.mean.default"]]
    assert found["world_size"] == 16 and len(found["warnings"]) == 2
    assert found["gathers"][0] == {
        "unit": "blocks.0",
        "op": "aten.flip.default",
        "node": "flip",
        "axis": "dp",
        "inputs": ["linear"],
        "fallback": True,
    }
    plan = ["plan", TINY_GPT, "--memory-gb", "1", "--global-batch", "8", "--no-baselines"]
    assert main([*plan, "-v"]) == 0
    out = capsys.readouterr().out
    assert "ops that gather (layers tp4 dp2; segments dp8; 8 devices)" in out
    assert "none: every op keeps its inputs split" in out
    assert main(plan) == 0
    assert "ops that gather" not in capsys.readouterr().out
    assert main(["inspect", TINY_GPT, "--seq", "16", "--no-gathers"]) == 0
    assert "ops that gather" not in capsys.readouterr().out

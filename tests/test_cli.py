from __future__ import annotations

import json
import math

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


_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}


def _shown(cell: str) -> tuple[float, float]:
    """A table cell such as `50.0K` as (value, half its last digit: what rounding hides)."""
    suffix = cell[-1] if cell[-1] in "KMG" else ""
    digits = cell[: len(cell) - len(suffix)]
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    return float(digits) * _SUFFIX[suffix], 0.5 * 10**-decimals * _SUFFIX[suffix]


def test_inspect_shows_hand_counted_parameters_and_flops(tmp_path, capsys):
    """`inspect`'s table and JSON against counts by hand for the tiny GPT (h=64, V=128,
    32 positions; batch B=2, sequence S=16): parameters per unit from the layer formulas
    (a block 12h^2 + 13h: qkv, attention projection, MLP, two LayerNorms), themselves checked
    against the nn.Module tree; forward FLOPs of a block 2BS * 12h^2 for its matmuls plus
    2 * 2BS^2h for the attention scores and their product with the values, of the head
    2BShV. The JSON holds them exactly, the table to its rounding."""
    from tests.conftest import build

    h, vocab, positions, batch, seq = 64, 128, 32, 2, 16
    params = {
        "embedding": (vocab + positions) * h,
        "blocks.0": 12 * h * h + 13 * h,
        "blocks.1": 12 * h * h + 13 * h,
        "head": 2 * h + h * vocab,  # final LayerNorm, untied output projection
        "loss": 0,
    }
    block_flops = 2 * batch * seq * 12 * h * h + 2 * 2 * batch * seq * seq * h
    flops = {"embedding": 0, "blocks.0": block_flops, "blocks.1": block_flops, "loss": 0}
    flops["head"] = 2 * batch * seq * h * vocab
    model = build(TINY_GPT)[0]
    modules = {
        "embedding": [model.wte, model.wpe],
        "blocks.0": [model.blocks[0]],
        "blocks.1": [model.blocks[1]],
        "head": [model.ln_f, model.lm_head],
        "loss": [],
    }
    for unit, parts in modules.items():  # the formulas describe this model
        assert sum(p.numel() for m in parts for p in m.parameters()) == params[unit], unit

    out_json = tmp_path / "gpt.json"
    args = ["inspect", TINY_GPT, "--batch", str(batch), "--seq", str(seq)]
    assert main([*args, "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    layers = {row["name"]: row for row in json.loads(out_json.read_text())["layers"]}
    assert {u: r["params"] for u, r in layers.items()} == params
    assert {u: r["fwd_flops"] for u, r in layers.items()} == flops
    lines = text.splitlines()
    table = lines[[ln.split()[:1] for ln in lines].index(["layer"]) :]
    rows = {
        ln.split()[0]: ln.split() for ln in table[: 1 + [ln[:5] for ln in table].index("total")]
    }
    for unit in params:
        (p, p_rounding), (f, f_rounding) = _shown(rows[unit][2]), _shown(rows[unit][3])
        assert abs(p - params[unit]) <= p_rounding and abs(f - flops[unit]) <= f_rounding, unit
    total_params, rounding = _shown(rows["total"][3])  # "total", "5", "units", params, ...
    assert rows["total"][1:3] == ["5", "units"]
    assert abs(total_params - sum(params.values())) <= rounding


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


Tree = tuple[int, tuple[tuple[str, int], ...]]


def galvatron_trees(world: int, per_node: int) -> list[Tree]:
    """Galvatron's decision tree over `world` devices, enumerated from its rules: a pipeline
    degree p first (dividing the world, its stages of world / p consecutive ranks each inside
    one node or whole nodes), then the world / p devices of a stage split by levels, outermost
    first, each of a kind not used above it (tp, dp or sdp) and a degree >= 2 (tp's a power of
    two), the degrees multiplying to world / p. Leaves: (p, levels). On a power-of-two world
    this is Galvatron's tree of power-of-two degrees."""

    def levels(devices: int, used: frozenset[str]) -> list[tuple[tuple[str, int], ...]]:
        if devices == 1:
            return [()]
        out = []
        for kind in ("tp", "dp", "sdp"):
            if kind in used:
                continue
            degrees = (
                [2**k for k in range(1, devices.bit_length()) if devices % 2**k == 0]
                if kind == "tp"
                else [d for d in range(2, devices + 1) if devices % d == 0]
            )
            for degree in degrees:
                out += [
                    ((kind, degree), *rest) for rest in levels(devices // degree, used | {kind})
                ]
        return out

    def stages_fit(d: int) -> bool:
        ranges = [(start, start + d - 1) for start in range(0, world, d)]
        inside = all(a // per_node == b // per_node for a, b in ranges)
        return d == world or d % per_node == 0 or inside

    pipelines = [p for p in range(1, world + 1) if world % p == 0 and stages_fit(world // p)]
    return [(p, lv) for p in pipelines for lv in levels(world // p, frozenset())]


def _tp_and_stride(levels: tuple[tuple[str, int], ...]) -> tuple[int, int]:
    """The TP degree, and how far apart a TP group's ranks are: the product of the degrees
    of the levels inside (after) the TP level."""
    kinds = [k for k, _ in levels]
    if "tp" not in kinds:
        return 1, 1
    at = kinds.index("tp")
    return levels[at][1], math.prod(d for _, d in levels[at + 1 :])


def rule_counts(world: int, per_node: int) -> list[int]:
    """Leaves left after each rule in turn, summed over the pipeline degrees: the tree; no
    tree mixing dp and sdp; TP groups inside a node (tp divides the node, and a group spans
    (tp - 1) * stride + 1 devices); a strided TP group whose stage fits one node dropped (the same links as the
    consecutive one); then every flag a surviving leaf takes: no sp, Megatron sp or Ulysses
    where tp > 1, ZeRO-1/2/3 on sdp levels (a Ulysses group without data-parallel levels
    also syncs over itself: plain or ZeRO-1/2/3), and three recomputation modes."""

    def mixes(tree: Tree) -> bool:
        return {"dp", "sdp"} <= {k for k, _ in tree[1]}

    def tp_inside_a_node(tree: Tree) -> bool:
        tp, stride = _tp_and_stride(tree[1])
        return per_node % tp == 0 and (tp - 1) * stride + 1 <= per_node

    def strided_in_one_node(tree: Tree) -> bool:
        return _tp_and_stride(tree[1])[1] > 1 and world // tree[0] <= per_node

    left = galvatron_trees(world, per_node)
    counts = [len(left)]
    for keep in (lambda t: not mixes(t), tp_inside_a_node, lambda t: not strided_in_one_node(t)):
        left = [t for t in left if keep(t)]
        counts.append(len(left))
    flagged = 0
    for p, levels in left:
        tp = _tp_and_stride(levels)[0]
        modes = 3 if "sdp" in {k for k, _ in levels} else 1
        ulysses = (4 if tp == world // p else modes) if tp > 1 else 0
        flagged += ((2 if tp > 1 else 1) * modes + ulysses) * 3
    return [*counts, flagged]


def test_the_space_enumeration_gives_galvatrons_published_counts():
    """Galvatron (VLDB'23) reports 34 strategies for 8 GPUs, 22 once trees mixing dp and
    sdp are pruned; the test's own enumeration of the rules must give them."""
    assert rule_counts(8, 8)[:2] == [34, 22]


def test_explain_space_counts_every_rule_beside_galvatron(tmp_path, capsys):
    """Every row of `--explain-space` the rules decide, at 8 to 64 devices of 8 per node
    (the default a100-80gb-sxm cluster's nodes), equals the test's own enumeration of the
    rules (`rule_counts`), and the Galvatron column the paper's figures."""
    out = tmp_path / "space.json"
    args = ["plan", TINY_GPT, "--memory-gb", "8", "--global-batch", "64", "--explain-space"]
    assert main([*args, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    lines = lines[[ln.startswith("candidates") for ln in lines].index(True) :]
    worlds = [int(w) for w in lines[0][70:].split()[::2][:-1]]  # "8 dev 16 dev ... Galvatron, 8"
    assert worlds == [8, 16, 32, 64]
    shown = [line[70:].split() for line in lines[1:6]]
    want = [rule_counts(w, 8) for w in worlds]
    for i, row in enumerate(shown):
        assert [int(c) for c in row[:4]] == [w[i] for w in want], lines[1 + i]
    assert [row[4] for row in shown[:2]] == ["34", "22"]  # Galvatron, 8 GPUs
    found = json.loads(out.read_text())["space"]
    assert [row["world"] for row in found] == [8, 16, 32, 64]
    for row in found:  # every rule only removes; dominance keeps a candidate per layout
        counts = [r["count"] for r in row["rules"][:4]]
        assert counts == sorted(counts, reverse=True)
        assert 0 < row["kept"] <= row["priced"] <= row["rules"][-1]["count"]


def test_explain_space_counts_24_nodes(capsys):
    """On 24 nodes of 8 (192 = 2^6 x 3 devices) `--explain-space` adds the cluster's world to
    8 .. 64, and its counts, like the others, equal the test's own enumeration of the rules
    (`rule_counts`: pipeline degrees and dp degrees any divisor that fits)."""
    args = ["plan", TINY_GPT, "--cluster", "a100-80gb-sxm:nodes=24", "--memory-gb", "8"]
    assert main([*args, "--global-batch", "64", "--explain-space"]) == 0
    lines = capsys.readouterr().out.splitlines()
    lines = lines[[ln.startswith("candidates") for ln in lines].index(True) :]
    worlds = [int(w) for w in lines[0][70:].split()[::2][:-1]]
    assert worlds == [8, 16, 32, 64, 192]
    shown = [[int(c) for c in line[70:].split()[:5]] for line in lines[1:6]]
    want = [rule_counts(w, 8) for w in worlds]
    assert shown == [[w[i] for w in want] for i in range(5)]
    assert [row[-1] for row in shown] == rule_counts(192, 8)


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

"""The benchmark suite: its smoke run (`bench/suite.py --smoke`: every section on tiny sizes,
so that `make bench` cannot rot between the issues that read its figures), and the functions
that judge its targets, fed hand-made rows where a figure cannot be earned (a baseline that
is the auto plan, a side that failed, a first-step loss mismatch, an auto plan over its
memory cap, an error only the in-sample plans would hide) with the verdict written down."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("runtime", "cost_model", "layer_timing", "search", "plan_quality", "calibration", "compile")  # fmt: skip
PLOTTED = ("runtime", "cost_model", "search", "plan_quality", "compile")
VERDICT = re.compile(r"\| (met|\*\*missed\*\*|n/a) \|$")


def _bench(name: str) -> Any:
    """A bench script as a module (the scripts import each other by plain name from bench/)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


# ---------------------------------------------------------------------------------------
# target judging, on hand-made rows


def _plan_row(same_as: dict[str, str], measured: dict[str, dict[str, Any]], cap_gb: float = 0.1) -> dict[str, Any]:  # fmt: skip
    """A measured plan-quality row as `plan_quality_measured.run` leaves it."""
    pqm = _bench("plan_quality_measured")
    row = {
        "cap_gb": cap_gb,
        "same_as": same_as,
        "measured": measured,
        "shape": {"auto": "m1: tp1 dp4/allreduce"},
        "predicted": {"auto": 10.0, **{n: 10.0 for n in same_as if n != "auto"}},
    }
    row["ratios"] = pqm.ratios(row)
    return row


def _ran(samples_per_s: float, peak_mib: float = 10.0, loss: float = 7.0) -> dict[str, Any]:
    return {"samples_per_s": samples_per_s, "peak_bytes": int(peak_mib * 2**20), "first_loss": loss}  # fmt: skip


def test_plan_quality_baseline_equal_to_auto_is_no_comparison() -> None:
    pqm = _bench("plan_quality_measured")
    same = {"auto": "auto", "dp": "auto", "megatron-3d": "auto", "uniform": "auto"}
    row = _plan_row(same, {"auto": _ran(10.0)})
    assert all(r is None for r in row["ratios"].values())
    assert pqm.judge(row)[0] == "n/a"
    [(_, value, _, verdict)] = pqm.targets({"rows": [row]})
    assert verdict == "n/a" and "auto = dp, megatron-3d, uniform" in value
    # a different baseline is the comparison, not the equal one (which would read 1.00x)
    row = _plan_row({**same, "zero3": "zero3"}, {"auto": _ran(10.0), "zero3": _ran(5.0)})
    assert pqm.best_ratio(row) == pytest.approx(2.0)
    assert pqm.judge(row)[0] == "met"
    row = _plan_row({**same, "zero3": "zero3"}, {"auto": _ran(10.0), "zero3": _ran(20.0)})
    assert pqm.judge(row)[0] == "missed"
    assert pqm.found(_plan_row({"auto": "auto", "zero3": "zero3"}, {"auto": _ran(1), "zero3": _ran(1)})) == "new"  # fmt: skip


def test_plan_quality_failures_are_missed() -> None:
    pqm = _bench("plan_quality_measured")
    same = {"auto": "auto", "zero3": "zero3"}
    over = _plan_row(same, {"auto": _ran(10.0, peak_mib=120.0), "zero3": _ran(5.0)}, cap_gb=0.1)
    assert pqm.judge(over)[0] == "missed" and "over the cap" in pqm.judge(over)[1]
    failed = _plan_row(same, {"auto": _ran(10.0), "zero3": {"error": "RuntimeError: boom"}})
    assert pqm.judge(failed) == ("missed", "failed to build: zero3: RuntimeError: boom")
    loss = _plan_row(same, {"auto": _ran(10.0), "zero3": _ran(5.0, loss=7.5)})
    assert pqm.judge(loss)[0] == "missed" and "loss" in pqm.judge(loss)[1]
    assert pqm.judge({"cap_gb": 0.1, "error": "PlanError: nothing fits"})[0] == "missed"
    died = {"cap_gb": 0.1, "same_as": same, "measure_error": "rank 1 failed"}
    assert pqm.judge(died)[0] == "missed"
    assert [t[3] for t in pqm.targets({"rows": [over, failed, loss, died]})] == ["missed"] * 4


def test_predicted_plan_quality_leaves_out_baselines_equal_to_the_plan() -> None:
    pq = _bench("plan_quality")
    none = dict.fromkeys(pq.BASELINES)
    row: dict[str, Any] = {"model": "m", "cluster": "c", "budget_gb": 16, "plan": 10.0, "shape": "pp1",
           "baselines": {**none, "dp": 10.0, "uniform": 10.0}, "same": ["dp", "uniform"]}  # fmt: skip
    assert pq.vs_best_other(row) is None
    line = pq.table([row]).splitlines()[2]
    assert line.count("= plan") == 2 and "| n/a |" in line and "1.00" not in line
    row["baselines"]["zero3"] = 4.0
    assert pq.vs_best_other(row) == pytest.approx(2.5)


def test_runtime_failed_side_and_loss_mismatch_are_missed() -> None:
    runtime, pytorch_side = _bench("runtime"), _bench("pytorch_side")

    def ran(ms: float, loss: float = 7.0) -> Any:
        return runtime.SideResult(loss, 6.0, ms, (ms, ms))

    results = {
        "dp": [(ran(10.0), "RuntimeError: boom")],  # PyTorch's side failed to build
        "zero3": [(ran(10.0), ran(20.0)), (ran(10.0, loss=7.5), ran(20.0))],  # 2nd run's loss
        "tp": [(ran(10.0), ran(20.0))],
        "sp": [(ran(30.0), ran(20.0))],
    }
    data = runtime.summary(pytorch_side.SMOKE, results)
    got = {figure.split()[1]: (value, verdict) for figure, value, _, verdict in runtime.targets(data)}  # fmt: skip
    assert set(got) == set(results)  # a failed case is a row, not left out
    assert got["dp"][1] == "missed" and "boom" in got["dp"][0]
    assert got["zero3"][1] == "missed" and "loss" in got["zero3"][0]
    assert got["tp"][1] == "met" and got["sp"][1] == "missed"


def test_cost_model_target_is_the_held_out_error() -> None:
    cm = _bench("cost_model")
    assert cm.group("profiled", 7, 7) == "in-sample"
    assert cm.group("profiled", 0, 7) == "held-out plans"
    assert cm.group("profiled", 3, 7) == "partly profiled"
    assert cm.group("held-out model", 0, 5) == "held-out model"

    def row(group: str, predicted: float, measured: float) -> dict[str, Any]:
        return {"group": group, "predicted_s": predicted, "roofline_s": predicted,
                "measured_s": measured, "predicted_peak_bytes": [100], "measured_peak_bytes": [100]}  # fmt: skip

    exact = [row("in-sample", t, t) for t in (1.0, 2.0, 3.0)]
    held = [row(g, t, 2 * t) for g in cm.HELD_OUT for t in (1.0, 2.0, 3.0)]
    partly = [row("partly profiled", 1.0, 1.0)]
    data = {"rows": exact + held + partly, **cm.errors(exact + held + partly)}
    assert data["in_sample"]["median_error"] == 0
    assert data["held_out"]["plans"] == 9 and data["held_out"]["median_error"] == pytest.approx(0.5)  # fmt: skip
    assert cm.verdicts(data)["held_out_median_error"] == "missed"
    assert cm.verdicts(data)["held_out_spearman"] == "met"  # every group ranked right
    assert cm.verdicts(data)["memory_worst_error"] == "met"
    reversed_ = [row("held-out shape", t, 4 - t) for t in (1.0, 2.0, 3.0)]
    data = {"rows": exact + reversed_, **cm.errors(exact + reversed_)}
    assert cm.verdicts(data)["held_out_spearman"] == "missed"
    data = {"rows": exact, **cm.errors(exact)}  # nothing held out: no figure to earn
    assert cm.verdicts(data)["held_out_median_error"] == "n/a"
    assert cm.verdicts(data)["held_out_spearman"] == "n/a"
    # a plan that failed to price or run is left out of the figures, so it misses them all
    failed = [*exact, *held, {"group": "held-out model", "plan": "dp=4", "model": "m", "error": "pricing failed: boom"}]  # fmt: skip
    data = {"rows": failed, **cm.errors(failed)}
    assert data["held_out"]["plans"] == 9 and data["held_out"]["failed"] == 1
    assert set(cm.verdicts(data).values()) == {"missed"}
    assert all("boom" in value for _, value, _, _ in cm.targets(data))


def test_calibration_targets_hold_every_row_and_the_published_order() -> None:
    cal = _bench("calibration")

    def row(name: str, source: str, published: float, predicted: float) -> dict[str, Any]:
        return {"name": name, "source": source, "unit": "tokens/s/GPU", "published": published,
                "predicted": predicted, "ratio": predicted / published}  # fmt: skip

    rows = [row("a", "t table 1", 100, 110), row("b", "t table 3", 90, 95), row("c", "u", 10, 9)]
    (worst, order) = cal.targets(rows)
    assert worst[3] == "met" and "3 of 3" in worst[1] and order[3] == "met"
    rows[1] = row("b", "t table 3", 90, 120)  # 1.33 off, and now above row a
    (worst, order) = cal.targets(rows)
    assert worst[3] == "missed" and worst[1].startswith("1.33 (b)")
    assert order[3] == "missed" and cal.misordered(rows) == [("a", "b")]
    # different sources are not ordered against each other
    assert cal.misordered([row("a", "t", 100, 10), row("c", "u", 10, 100)]) == []


# ---------------------------------------------------------------------------------------
# the smoke run


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, str(ROOT / "bench" / "suite.py"), "--smoke", "--out", str(out)]
    subprocess.run(command, capture_output=True, text=True, timeout=280, check=True)
    return out


def _targets(report: str) -> list[str]:
    table = report.split("## Targets")[1].split("## 1.")[0]
    return [line for line in table.splitlines() if line.startswith("| ") and "figure" not in line]


def test_report_has_every_section_and_target(suite: Path) -> None:
    report = (suite / "latest.md").read_text()
    for title in ("Runtime overhead", "Cost-model error", "Layer timing", "Search speed", "Plan quality", "Calibration against published", "End to end: compile() by pass"):  # fmt: skip
        assert any(line.startswith("## ") and title in line for line in report.splitlines())
    targets = "\n".join(_targets(report))
    for figure in ("runtime dp / DDP", "runtime sp / DTensor SP", "runtime pp / pipelining",
                   "cost model: held-out median time error", "held-out Spearman",
                   "worst memory error", "layer timing: unit times summed", "search: tiny",
                   "plan quality, cap", "calibration: worst predicted"):  # fmt: skip
        assert figure in targets, figure
    assert all(VERDICT.search(line.rstrip()) for line in _targets(report))


def test_plots_written(suite: Path) -> None:
    pytest.importorskip("matplotlib")
    for section in PLOTTED:
        png = suite / f"{section}.png"
        assert png.read_bytes()[:4] == b"\x89PNG", section


def test_figures_are_measured(suite: Path) -> None:
    data = json.loads((suite / "latest.json").read_text())
    assert set(data) == set(SECTIONS)
    for case, c in data["runtime"]["cases"].items():
        # both sides ran and trained the same thing
        assert c["ratios"] and " ok " in c["loss"] and not c["failed"], (case, c)
    rows = data["cost_model"]["rows"]
    assert all(r["measured_s"] > 0 and r["predicted_s"] > 0 for r in rows)
    groups = {r["group"]: r for r in rows}
    assert set(groups) == {"in-sample", "held-out plans", "held-out shape", "held-out model"}
    for r in rows:  # held out means no unit priced from the layer table, in-sample every one
        assert r["units_measured"] == (r["units"] if r["group"] == "in-sample" else 0), r
    profiled = data["cost_model"]["profiled"]
    assert {(r["model"], r["batch"], r["seq"]) for r in rows if r["group"] == "held-out plans"} == {(profiled["model"], profiled["batch"], profiled["seq"])}  # fmt: skip
    assert groups["held-out shape"]["model"] != profiled["model"]
    assert groups["held-out model"]["model"].startswith("hf:llama")
    measured = data["plan_quality"]["measured"]["rows"]
    assert len(measured) == 2 and all(r["measured"]["auto"]["samples_per_s"] > 0 for r in measured)
    report = (suite / "latest.md").read_text()
    for row in measured:
        assert set(row["ratios"]) >= {"dp", "zero3", "megatron-3d"}
        # the auto plan is never a baseline's comparison; a cap with no other plan is n/a
        equal = [n for n, s in row["same_as"].items() if s == "auto" and n != "auto"]
        assert all(row["ratios"][n] is None for n in equal)
        cap = f"plan quality, cap {row['cap_gb'] * 1024:.0f} MiB"
        [line] = [t for t in _targets(report) if cap in t]
        no_other = all(r is None for r in row["ratios"].values())
        assert line.rstrip().endswith("| n/a |") == no_other, line
    compiled = data["compile"]["cases"]
    assert all({"capture", "shard", "runtime"} <= set(t) for t in compiled.values())
    assert "split_stages" in compiled["given plan, 2 stages x 4 micro-batches"]

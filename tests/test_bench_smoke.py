"""The benchmark suite's smoke run (`bench/suite.py --smoke`): every section on tiny sizes,
so that `make bench` cannot rot between the issues that read its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("runtime", "cost_model", "search", "plan_quality", "compile")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, str(ROOT / "bench" / "suite.py"), "--smoke", "--out", str(out)]
    subprocess.run(command, capture_output=True, text=True, timeout=280, check=True)
    return out


def test_report_has_every_section_and_target(suite: Path) -> None:
    report = (suite / "latest.md").read_text()
    for title in ("Runtime overhead", "Cost-model error", "Search speed", "Plan quality", "End to end: compile() by pass"):  # fmt: skip
        assert any(line.startswith("## ") and title in line for line in report.splitlines())
    targets = report.split("## Targets")[1].split("## 1.")[0]
    for figure in ("runtime dp / DDP", "runtime sp / DTensor SP", "runtime pp / pipelining",
                   "cost model: Spearman", "worst memory error", "search: tiny", "plan quality, cap"):  # fmt: skip
        assert figure in targets, figure
    assert all(line.rstrip().endswith(("met |", "**missed** |")) for line in targets.splitlines() if line.startswith("| ") and "figure" not in line)  # fmt: skip


def test_plots_written(suite: Path) -> None:
    pytest.importorskip("matplotlib")
    for section in SECTIONS:
        png = suite / f"{section}.png"
        assert png.read_bytes()[:4] == b"\x89PNG", section


def test_figures_are_measured(suite: Path) -> None:
    data = json.loads((suite / "latest.json").read_text())
    assert set(data) == set(SECTIONS)
    for case, c in data["runtime"]["cases"].items():
        # both sides ran and trained the same thing
        assert c["ratios"] and " ok " in c["loss"], (case, c)
    rows = data["cost_model"]["rows"]
    assert len(rows) == 3 and all(r["measured_s"] > 0 and r["predicted_s"] > 0 for r in rows)
    measured = data["plan_quality"]["measured"]["rows"]
    assert len(measured) == 2 and all(r["measured"]["auto"]["samples_per_s"] > 0 for r in measured)
    for row in measured:  # every baseline that fits was measured or is the auto plan itself
        assert set(row["ratios"]) >= {"dp", "zero3", "megatron-3d"}
    compiled = data["compile"]["cases"]
    assert all({"capture", "shard", "runtime"} <= set(t) for t in compiled.values())
    assert "split_stages" in compiled["given plan, 2 stages x 4 micro-batches"]

"""The benchmarks' smoke runs: they must not rot between the issues that read their figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str) -> str:
    """The benchmark's standard output; fails the test if it exits non-zero."""
    command = [sys.executable, str(ROOT / "bench" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, check=True).stdout


def test_capture_bench_smoke():
    out = _bench("capture.py", "--smoke")
    assert "torch.export alone (baseline)" in out and "ratio to export alone" in out


def test_runtime_bench_smoke():
    out = _bench("runtime.py", "--smoke")
    line = next(line for line in out.splitlines() if line.startswith("ratios"))
    words = line.split(":")[-1].split()  # "dp 0.95  zero3 1.10  tp n/a  pp 0.97"
    ratios = dict(zip(words[::2], words[1::2], strict=True))
    assert set(ratios) == {"dp", "zero3", "tp", "pp"}, out
    for case, value in ratios.items():
        # a baseline this torch cannot run reads "n/a", and the output must say why
        assert (value == "n/a" and f"{case} (" in out) or float(value) > 0, out


def test_cost_model_bench_smoke(tmp_path):
    out = _bench("cost_model.py", "--smoke", "--profile", str(tmp_path / "local.json"))
    rows = [line for line in out.splitlines() if line.startswith(("dp=", "tp="))]
    assert len(rows) == 3 and "spearman" in out and "peak memory: median |error|" in out


def test_search_bench_smoke():
    out = _bench("search.py", "--smoke")
    assert "tiny, 8 x A100" in out and "configurations solved" in out
    assert "pp=1 tree" in out


def test_plan_quality_bench_smoke():
    out = _bench("plan_quality.py", "--smoke")
    assert "| tiny | 8 x A100 |" in out and "vs best" in out

"""The benchmarks' smoke runs: they must not rot between the issues that read their figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_capture_bench_smoke():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "capture.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout
    assert "torch.export alone (baseline)" in out and "ratio to export alone" in out

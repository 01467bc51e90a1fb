"""The plan report: schedule simulation, the self-contained HTML page, the PNG charts, the CLI
flags, and (where Chromium is installed) the page as a browser renders it."""

from __future__ import annotations

import copy
import itertools
import json
import random
import shutil
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from galvatron_fx.cli import main
from galvatron_fx.report import render_html, save_pngs, schedule_order, simulate_schedule
from galvatron_fx.search.dp import step_time

SMALL_GPT = "gpt:layers=4,hidden=256,heads=4,vocab=1000,seq=128"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


class _Tags(HTMLParser):
    """Every start tag with its attributes, and whether every opened tag was closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))  # <rect/>: nothing to close

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"</{tag}> closes nothing open")

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def having(self, tag: str, css: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and css in a.get("class", "").split()]


def _parse(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    parser.close()
    return parser


def _plan(tmp: Path, memory_gb: str, name: str) -> tuple[dict[str, Any], Path, Path]:
    """`galvatron-fx plan` on the small GPT (8 devices, batch 16): (result JSON, page, PNGs)."""
    out = tmp / name
    rc = main(
        ["plan", SMALL_GPT, "--cluster", "a100-80gb-sxm:nodes=1", "--memory-gb", memory_gb,
         "--global-batch", "16", "--json", str(out / "plan.json"),
         "--html", str(out / "report.html"), "--png", str(out / "png")]
    )  # fmt: skip
    assert rc == 0
    return json.loads((out / "plan.json").read_text()), out / "report.html", out / "png"


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    """15 MiB a device: pipeline stages and several micro-batches, and most baselines do not
    fit."""
    result = _plan(tmp_path_factory.mktemp("report"), "0.015", "pipelined")
    pipe = result[0]["plan"]["pipeline"]
    assert pipe["degree"] >= 2 and pipe["micro_batches"] >= 2
    assert None in result[0]["baselines"].values()
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    result = _plan(tmp_path_factory.mktemp("report"), "0.2", "single")
    assert result[0]["plan"]["pipeline"]["degree"] == 1
    return result


def _interleaved(result: dict[str, Any]) -> dict[str, Any]:
    """The pipelined result recast as 2 ranks x 2 chunks (the search seldom picks it)."""
    out = copy.deepcopy(result)
    units = [s["unit"] for s in out["plan"]["strategies"]]
    starts = [units[i] for i in (2, 4, 5)]
    out["plan"]["pipeline"] = {
        "degree": 2, "stage_starts": starts, "micro_batches": 4,
        "schedule": "interleaved-1f1b", "virtual_stages": 2,
    }  # fmt: skip
    stage = 0
    for row in out["units"]:
        stage += row["unit"] in starts
        row["stage"] = stage
    out["predicted"]["stage_time_per_micro_batch_s"] = [1e-3, 1.2e-3, 0.8e-3, 1.1e-3]
    out["predicted"]["peak_memory_bytes"] = out["predicted"]["peak_memory_bytes"][:2]
    return out


# ---- the schedule ---------------------------------------------------------------------------


def _names(order: list[tuple[int, int, str]]) -> str:
    return " ".join(f"{kind}{i}" for _, i, kind in order)


def test_gpipe_runs_every_forward_before_any_backward() -> None:
    for order in schedule_order(3, 1, 4, "gpipe"):
        assert _names(order) == "F0 F1 F2 F3 B0 B1 B2 B3"


def test_1f1b_warms_up_by_distance_to_the_last_stage_then_alternates() -> None:
    orders = schedule_order(4, 1, 6, "1f1b")
    assert _names(orders[0]) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"
    assert _names(orders[2]) == "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5"
    assert _names(orders[3]) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5"
    # fewer micro-batches than stages: the runtime runs GPipe (runtime/pipeline.py)
    assert _names(schedule_order(4, 1, 2, "1f1b")[3]) == "F0 F1 B0 B1"


def test_interleaved_order_is_torchs() -> None:
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    calc = schedules.ScheduleInterleaved1F1B._calculate_single_rank_operations
    p, v, m = 2, 3, 4
    fake = SimpleNamespace(
        n_local_stages=v, pp_group_size=p, _n_microbatches=m, microbatches_per_round=p
    )
    ours = schedule_order(p, v, m, "interleaved-1f1b")
    for rank in range(p):
        theirs = [
            (
                a.stage_index,
                a.microbatch_index,
                "F" if a.computation_type.name == "FORWARD" else "B",
            )
            for a in calc(fake, rank)
            if a is not None
        ]
        assert ours[rank] == theirs


@pytest.mark.parametrize(
    ("degree", "chunks", "micro_batches", "schedule"),
    [(3, 1, 5, "gpipe"), (4, 1, 6, "1f1b"), (4, 1, 2, "1f1b"), (2, 2, 4, "interleaved-1f1b")],
)
def test_simulated_boxes_keep_dependencies_and_never_overlap(
    degree: int, chunks: int, micro_batches: int, schedule: str
) -> None:
    times = [1.0 + 0.37 * ((7 * k) % 5) for k in range(degree * chunks)]
    boxes = simulate_schedule(times, micro_batches, schedule, degree)
    n = degree * chunks
    assert Counter((b.stage, b.micro_batch, b.kind) for b in boxes) == Counter(
        {(k, i, kind): 1 for k in range(n) for i in range(micro_batches) for kind in "FB"}
    )
    at = {(b.stage, b.micro_batch, b.kind): b for b in boxes}
    for b in boxes:
        assert b.end_s - b.start_s == pytest.approx(
            times[b.stage] * (1 / 3 if b.kind == "F" else 2 / 3)
        )
        if b.kind == "F" and b.stage > 0:
            assert b.start_s >= at[b.stage - 1, b.micro_batch, "F"].end_s - 1e-12
        if b.kind == "B":
            after = (
                at[b.stage + 1, b.micro_batch, "B"]
                if b.stage < n - 1
                else at[b.stage, b.micro_batch, "F"]
            )
            assert b.start_s >= after.end_s - 1e-12
    for rank in range(degree):
        mine = sorted((b for b in boxes if b.stage % degree == rank), key=lambda b: b.start_s)
        assert all(x.end_s <= y.start_s + 1e-12 for x, y in itertools.pairwise(mine))


def test_makespan_is_the_searchs_step_time() -> None:
    """Balanced stages: equation (1) exactly; unbalanced GPipe / 1F1B: never more."""
    for degree, chunks, m, schedule in [
        (4, 1, 8, "gpipe"),
        (4, 1, 8, "1f1b"),
        (4, 2, 8, "interleaved-1f1b"),
    ]:
        boxes = simulate_schedule([2e-3] * (degree * chunks), m, schedule, degree)
        assert max(b.end_s for b in boxes) == pytest.approx(
            step_time([2e-3] * (degree * chunks), m, chunks)
        )
    rng = random.Random(0)
    for _ in range(200):
        degree, m, schedule = (
            rng.choice([2, 3, 4, 8]),
            rng.randint(1, 10),
            rng.choice(["gpipe", "1f1b"]),
        )
        times = [rng.uniform(0.1, 2.0) for _ in range(degree)]
        makespan = max(b.end_s for b in simulate_schedule(times, m, schedule, degree))
        assert makespan <= step_time(times, m, 1) * (1 + 1e-9)


# ---- the page -------------------------------------------------------------------------------


def test_page_is_self_contained_and_well_formed(
    pipelined: tuple[dict[str, Any], Path, Path],
) -> None:
    result, page_path, _ = pipelined
    page = page_path.read_text()
    assert page == render_html(result)
    for banned in ("http://", "https://", "src=", "<link", "@import", "<script"):
        assert banned not in page
    parsed = _parse(page)
    assert parsed.errors == [] and parsed.stack == []
    assert len(parsed.having("svg", "memory")) == len(parsed.having("svg", "timeline")) == 1


def test_page_shows_the_summary_every_unit_and_every_baseline(
    pipelined: tuple[dict[str, Any], Path, Path],
) -> None:
    result, page_path, _ = pipelined
    parsed = _parse(page_path.read_text())
    text = " ".join(parsed.text)
    rows = [a for t, a in parsed.tags if t == "tr"]
    assert len(rows) == 1 + len(result["plan"]["strategies"])
    for s in result["plan"]["strategies"]:
        assert s["unit"] in text
    assert result["plan"]["model_fingerprint"] in text and "a100-80gb-sxm" in text
    assert f"{result['predicted']['samples_per_s']:.2f}" in text
    shown = {a["data-name"] for a in parsed.having("g", "baseline")}
    assert shown == {"this plan", *result["baselines"]}
    missing = [name for name, sps in result["baselines"].items() if sps is None]
    assert text.count("does not fit") == len(missing) > 0
    fitting = [sps for sps in result["baselines"].values() if sps is not None]
    for sps in fitting:
        assert f"plan / this = {result['predicted']['samples_per_s'] / sps:.2f}x" in text


def test_memory_bars_one_per_stage_against_the_budget(
    pipelined: tuple[dict[str, Any], Path, Path],
) -> None:
    result, page_path, _ = pipelined
    parsed = _parse(page_path.read_text())
    bars = parsed.having("g", "mem-bar")
    assert [b["data-stage"] for b in bars] == [
        str(k) for k in range(result["plan"]["pipeline"]["degree"])
    ]
    assert len(parsed.having("line", "budget")) == 1 and not parsed.having("g", "over")
    over = copy.deepcopy(result)
    over["predicted"]["peak_memory_bytes"][1] = 2 * result["setup"]["memory_budget_gb"] * 2**30
    flagged = _parse(render_html(over))
    assert [b["data-stage"] for b in flagged.having("g", "over")] == ["1"]
    assert "OVER BUDGET" in " ".join(flagged.text)


def test_timeline_has_one_box_per_stage_micro_batch_and_pass(
    pipelined: tuple[dict[str, Any], Path, Path], single: tuple[dict[str, Any], Path, Path]
) -> None:
    for result in (pipelined[0], _interleaved(pipelined[0]), single[0]):
        pipe = result["plan"]["pipeline"]
        n, m = pipe["degree"] * pipe["virtual_stages"], pipe["micro_batches"]
        parsed = _parse(render_html(result))
        boxes = Counter(
            (a["data-stage"], a["data-mb"], "fwd" if "fwd" in a["class"] else "bwd")
            for a in parsed.having("rect", "box")
        )
        assert boxes == Counter(
            {(str(k), str(i), d): 1 for k in range(n) for i in range(m) for d in ("fwd", "bwd")}
        )
        rows = [t for t in parsed.text if t.startswith("stage ")]
        assert rows.count("stage 0") == 2  # a memory bar and a timeline row
        assert f"stage {pipe['degree'] - 1}" in rows and f"stage {pipe['degree']}" not in rows


def test_text_is_escaped(pipelined: tuple[dict[str, Any], Path, Path]) -> None:
    result = copy.deepcopy(pipelined[0])
    result["plan"]["strategies"][0]["unit"] = "<script>x</script>"
    result["baselines"]['"><b>'] = None
    page = render_html(result, title="a & <b>")
    assert "<script>" not in page and '"><b>' not in page and "<b>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "a &amp; &lt;b&gt;" in page
    assert _parse(page).errors == []


# ---- PNG and the command line -----------------------------------------------------------------


def test_plan_and_explain_write_pngs(
    pipelined: tuple[dict[str, Any], Path, Path], tmp_path: Path
) -> None:
    _, page_path, png_dir = pipelined
    for name in ("memory", "timeline", "baselines"):
        assert (png_dir / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not list(png_dir.glob("*.tmp"))
    rc = main(["explain", str(page_path.parent / "plan.json"), "--html", str(tmp_path / "r.html"),
               "--png", str(tmp_path / "png")])  # fmt: skip
    assert rc == 0
    assert (tmp_path / "r.html").read_text() == page_path.read_text()
    assert (tmp_path / "png" / "timeline.png").read_bytes()[:8] == PNG_SIGNATURE


def test_png_needs_matplotlib(
    single: tuple[dict[str, Any], Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        save_pngs(single[0], tmp_path)


def test_chromium_renders_the_page(
    pipelined: tuple[dict[str, Any], Path, Path], tmp_path: Path
) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed")
    image = pytest.importorskip("matplotlib.image")
    page = pipelined[1].resolve()
    flags = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400",
    ]  # fmt: skip
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], timeout=60, capture_output=True)
    assert shot.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(shot)[:, :, :3]
    colours = {
        tuple(p) for p in (pixels[::8, ::8].reshape(-1, 3) * 255).round().astype(int).tolist()
    }
    assert len(colours) > 20  # text, bars and boxes, not a blank page
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], timeout=60, capture_output=True, text=True
    ).stdout
    assert '<table class="units">' in dom and 'class="timeline"' in dom and 'class="memory"' in dom
    pipe = pipelined[0]["plan"]["pipeline"]
    assert dom.count('class="box ') == 2 * pipe["degree"] * pipe["micro_batches"]

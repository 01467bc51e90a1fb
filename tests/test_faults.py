"""Faults in a real `galvatron-fx train` job: a rank killed mid-step stops the whole job with
an error, never a hang; Ctrl-C at any moment (saves included) leaves the last checkpoint
whole; and a run resumed after either continues the uninterrupted loss sequence exactly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from galvatron_fx.runtime import checkpoint

SPEC = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32"
CLI = [sys.executable, "-m", "galvatron_fx.cli", "train", SPEC, "--global-batch", "8"]
TIMEOUT_S = 30
"""`--timeout-s` of the jobs that lose a rank: how long a collective waits for a dead peer."""

# Limits below only stop a hung test (no test asserts how fast anything is): each is several
# times what the job needs on a loaded 2-core machine, so only a job that never gets there
# reaches it.
HUNG_S = TIMEOUT_S + 60
"""A job that lost a rank ends once a collective gives up (`TIMEOUT_S` at most) and the
launcher has torn the ranks down (measured: 2 to 3 s after the kill, in both tests); 60 s
more is margin for a loaded machine. Kept well below the CLI's default timeout (300 s), so a
job that ignored `--timeout-s` counts as hung."""
START_S = 180
"""Start-up (imports, capture, compile on two ranks) and the first steps or saves."""
RUN_S = 240
"""A whole run of six steps, start-up included."""


def _losses(out: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"^step (\d+)/\d+\s+loss (\S+)", out, re.M)}


def _start(args: list[str], mark: str) -> subprocess.Popen:
    """The job in its own process group (as a terminal runs it), tagged so its ranks can be
    found; stderr goes into stdout to read one stream."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GFX_TEST_MARK=mark)
    return subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


def _wait_for(proc: subprocess.Popen, pattern: str, timeout_s: float = START_S) -> str:
    """Read the job's output until a line matches `pattern`; what was read so far."""
    seen = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"never saw {pattern!r}:\n{''.join(seen)[-3000:]}")


def _rank_pid(mark: str, rank: int) -> int:
    """The process running `rank` of the job tagged `mark` (read off /proc environments)."""
    want = {f"GFX_TEST_MARK={mark}".encode(), f"RANK={rank}".encode()}
    for entry in Path("/proc").iterdir():
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
        except (OSError, ValueError):
            continue
        if want <= env and any(e.startswith(b"LOCAL_RANK=") for e in env):
            return int(entry.name)
    raise AssertionError(f"no process runs rank {rank}")


def _finish(proc: subprocess.Popen, timeout_s: float) -> tuple[int, str]:
    """The job's exit code and the rest of its output; a job still running after `timeout_s`
    is hung: killed, and the test fails."""
    try:
        rest, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the job hung for more than {timeout_s} s") from None
    return proc.returncode, rest


@pytest.fixture(scope="module")
def uninterrupted() -> dict[int, float]:
    done = subprocess.run(
        [*CLI, "--nproc", "2", "--steps", "6"],
        capture_output=True,
        text=True,
        timeout=RUN_S,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return _losses(done.stdout)


def test_a_killed_rank_stops_the_job_with_an_error(tmp_path):
    mark = uuid.uuid4().hex
    timeout = ["--timeout-s", str(TIMEOUT_S)]
    proc = _start(["--nproc", "2", "--steps", "100000", *timeout], mark)
    before = _wait_for(proc, r"^step 3/")
    os.kill(_rank_pid(mark, 1), signal.SIGKILL)
    code, rest = _finish(proc, timeout_s=HUNG_S)
    out = before + rest
    assert code != 0, code
    assert "galvatron-fx train: a rank failed" in out, out[-3000:]
    assert re.search(r"rank\s*:\s*1 .*\n.*exitcode\s*:\s*-9", out) or "Signal 9" in out, out[-3000:]


def test_ctrl_c_keeps_the_last_checkpoint_and_resume_continues(uninterrupted, tmp_path):
    ckpt = tmp_path / "ckpt"
    mark = uuid.uuid4().hex
    save = ["--save", str(ckpt), "--save-every", "1"]
    proc = _start(["--nproc", "2", "--steps", "100000", *save], mark)
    _wait_for(proc, r"saved .*step-00000003")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    code, _ = _finish(proc, timeout_s=120)  # SIGINT stops the ranks: a save at most to finish
    assert code != 0
    last = checkpoint.latest_checkpoint(ckpt)
    assert last is not None and (last / "meta.json").is_file()
    step = int(re.sub(r"\D", "", last.name))
    assert 3 <= step < 6, step  # (a later interruption would leave no steps to compare)

    done = subprocess.run(
        [*CLI, "--nproc", "2", "--steps", "6", "--resume", str(ckpt)],
        capture_output=True,
        text=True,
        timeout=RUN_S,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    resumed = _losses(done.stdout)
    assert sorted(resumed) == list(range(step + 1, 7))
    for k, loss in resumed.items():
        assert loss == pytest.approx(uninterrupted[k], rel=1e-6), k


def test_a_rank_killed_on_another_node_fails_the_others_clearly():
    """Two launchers as two nodes: node 0's launcher cannot see node 1's rank die, so its
    rank must notice through the failed collective and stop with our message."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mark = uuid.uuid4().hex
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GFX_TEST_MARK=mark)
    nodes = []
    for n in range(2):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        where = ["--nproc-per-node", "1", "--node-rank", str(n), "--master-addr", "127.0.0.1"]
        job = [*CLI[1:], "--steps", "100000", "--timeout-s", str(TIMEOUT_S)]
        cmd = [*torchrun, *where, "--master-port", str(port), *job]
        nodes.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                start_new_session=True,
            )
        )
    _wait_for(nodes[0], r"^step 3/")
    os.kill(_rank_pid(mark, 1), signal.SIGKILL)
    outs = []
    for node in nodes:
        code, out = _finish(node, timeout_s=HUNG_S)
        assert code != 0, code
        outs.append(out)
    assert re.search(
        r"rank 0: step \d+: a collective failed, most likely because another rank stopped", outs[0]
    ), outs[0][-3000:]
    assert "Signal 9 (SIGKILL)" in outs[1], outs[1][-3000:]

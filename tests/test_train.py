"""`galvatron-fx train`: our own launch, real torchrun, resume under another plan, and two
launchers simulating two nodes, all giving one loss sequence."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from galvatron_fx.lowering import analyze
from galvatron_fx.models.spec import parse_model_spec
from galvatron_fx.plan import LayerStrategy

SPEC = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32"
CLI = [sys.executable, "-m", "galvatron_fx.cli", "train", SPEC, "--global-batch", "8"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _run(cmd: list[str], timeout_s: float = 240) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _losses(out: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"^step (\d+)/\d+\s+loss (\S+)", out, re.M)}


@pytest.fixture(scope="module")
def uninterrupted() -> dict[int, float]:
    """Four steps on 2 ranks started by the command itself (torch.distributed.run inside)."""
    out = _run([*CLI, "--nproc", "2", "--steps", "4"])
    assert "samples/s" in out and "peak rss" in out
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4]
    return losses


def test_torchrun_save_and_resume_under_a_tp_plan(uninterrupted, tmp_path):
    spec = parse_model_spec(SPEC)
    model = spec.build("cpu")
    args, kwargs = spec.example_inputs(model, 8, 32)
    plan_file = tmp_path / "tp2.json"
    analyze(model, args, kwargs).plan(LayerStrategy(tp=2), world_size=2).save(plan_file)

    torchrun = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *CLI[1:]]
    first = _losses(_run([*torchrun, "--steps", "2", "--save", str(tmp_path / "ckpt")]))
    resume = ["--resume", str(tmp_path / "ckpt"), "--plan", str(plan_file)]
    second = _run([*torchrun, "--steps", "4", *resume])
    assert "resumed from" in second and "tp2" in second
    got = {**first, **_losses(second)}
    assert sorted(got) == [1, 2, 3, 4]
    for step, loss in uninterrupted.items():
        assert got[step] == pytest.approx(loss, rel=1e-6), step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node(rank: int, port: int) -> subprocess.Popen:
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank)]
    master = ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [*TORCHRUN, *node, *master, *CLI[1:], "--steps", "2"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_launchers_as_two_nodes(uninterrupted):
    """`torchrun --nnodes 2`, one process per node, both nodes on this machine."""
    port = _free_port()
    nodes = [_node(n, port) for n in range(2)]
    outs = [p.communicate(timeout=240) for p in nodes]
    for p, (out, err) in zip(nodes, outs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
    losses = _losses(outs[0][0])  # global rank 0 runs on node 0
    assert sorted(losses) == [1, 2]
    for step, loss in losses.items():
        assert loss == pytest.approx(uninterrupted[step], rel=1e-6), step


def test_token_file_batches_are_shifted_windows(tmp_path):
    import numpy as np

    from galvatron_fx.train import Batches, TrainConfig

    tokens = np.arange(1000, dtype=np.uint16) % 128
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    spec = parse_model_spec(SPEC)
    model = spec.build("cpu")
    config = TrainConfig(model=SPEC, global_batch=4, seq=16, data=path)
    (idx,), kwargs = Batches(config, spec, model).at(3)
    assert idx.shape == (4, 16) and kwargs["targets"].shape == (4, 16)
    assert ((kwargs["targets"] - idx) % 128 == 1).all()  # the next token of every position
    again = Batches(config, spec, model).at(3)[0][0]
    assert (again == idx).all()  # a step's batch is the same in every run (resume)

    with pytest.raises(ValueError, match="token ids are integers"):
        Batches(TrainConfig(model=SPEC, data=path, data_dtype="float32"), spec, model)
    (tokens + 200).astype(np.uint16).tofile(path)
    with pytest.raises(
        ValueError, match=r"token id \d+ at step 0 is outside the model's vocabulary of 128"
    ):
        Batches(config, spec, model).at(0)


def test_train_gpt_example_runs_in_one_process(tmp_path):
    """examples/train_gpt.py without torchrun: search, train, checkpoint, export."""
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "train_gpt.py")
    out = _run(
        [sys.executable, script, "--steps", "2", "--memory-gb", "1", "--save", str(tmp_path / "ck")]
    )
    assert "step 2" in out and "plain state dict" in out
    assert (tmp_path / "ck" / "step-00000002" / "model.pt").is_file()

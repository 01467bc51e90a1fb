"""Checkpoints: save under one plan, resume under another with the same loss sequence; a
save killed half-way leaves the previous checkpoint whole; export to a plain state dict."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
import torch
from conftest import build
from test_pipeline_3d import SPEC
from test_pipeline_3d import _plan as _plan_3d

from galvatron_fx.lowering import analyze
from galvatron_fx.plan import LayerStrategy
from galvatron_fx.runtime import checkpoint

STEPS = 4
SAVE_AT = 2


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, eps=1e-6, weight_decay=0.01)


def _plan(analysis, kind: str, world: int):
    if kind == "pp2xmixed":
        return _plan_3d(analysis, "pp2xmixed", "1f1b")
    if kind == "tp2+sp,zero1":
        s = LayerStrategy(tp=2, sp=True, dp=world // 2, dp_mode="zero1", vocab_parallel=True)
        return analysis.plan(s, world_size=world)
    if kind == "ulysses,zero2":  # layer weights sharded over the whole Ulysses group
        layer = LayerStrategy(tp=world, ulysses=True, dp_mode="zero2")
        seg = LayerStrategy(dp=world, dp_mode="zero1")
        return analysis.plan(
            {u.name: layer if u.kind == "layer" else seg for u in analysis.layers}, world_size=world
        )
    assert kind == "zero3"
    return analysis.plan(LayerStrategy(dp=world, dp_mode="zero3"), world_size=world)


def _train(rank: int, world: int, kind: str, root: str, resume: bool) -> dict:
    import galvatron_fx as gfx

    model, args, kwargs = build(SPEC, batch=8, seq=16)
    plan = _plan(analyze(model, args, kwargs), kind, world)
    compiled = gfx.compile(model, args, kwargs, plan=plan, optimizer=_adamw)
    start, loaded = 0, None
    if resume:
        start = compiled.load_checkpoint(root)["step"]
        loaded = compiled.full_params()
    losses = []
    for step in range(start, STEPS):
        losses.append(compiled.train_step(*args, **kwargs).item())
        if step + 1 == SAVE_AT and not resume:
            compiled.save_checkpoint(root, step + 1, {"tokens_seen": 123})
    return {"losses": losses, "loaded": loaded}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An uninterrupted 3D run (pipeline 2 x mixed strategies), saving at step 2."""
    from distributed import run_ranks

    root = str(tmp_path_factory.mktemp("ckpt"))
    return root, run_ranks(_train, 4, "pp2xmixed", root, False)[0]["losses"]


@pytest.mark.parametrize("kind", ["tp2+sp,zero1", "zero3", "ulysses,zero2"])
def test_resume_under_another_plan_continues_the_loss_sequence(saved, kind):
    from distributed import run_ranks

    root, want = saved
    results = run_ranks(_train, 4, kind, root, True)
    for r in results:
        assert r["losses"] == pytest.approx(want[SAVE_AT:], rel=1e-6, abs=0)
    exported = torch.load(checkpoint.export_state_dict(root), weights_only=True)
    model, _, _ = build(SPEC, batch=8, seq=16)
    model.load_state_dict(exported, strict=True)  # the original model's names
    for name, value in results[0]["loaded"].items():
        assert torch.equal(exported[name], value), name


def _crash_during_second_save(root: str) -> None:
    import galvatron_fx as gfx

    model, args, kwargs = build(SPEC, batch=8, seq=16)
    compiled = gfx.compile(model, args, kwargs, optimizer=_adamw)
    compiled.train_step(*args, **kwargs)
    compiled.save_checkpoint(root, 1)
    compiled.train_step(*args, **kwargs)
    checkpoint._before_publish = lambda: os.kill(os.getpid(), signal.SIGKILL)
    compiled.save_checkpoint(root, 2)  # killed after writing, before publishing


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    import galvatron_fx as gfx

    proc = multiprocessing.get_context("fork").Process(
        target=_crash_during_second_save, args=(str(tmp_path),)
    )
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    assert (tmp_path / ".step-00000002.tmp").is_dir()  # the half-written save
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step-00000001"

    model, args, kwargs = build(SPEC, batch=8, seq=16)
    compiled = gfx.compile(model, args, kwargs, optimizer=_adamw)
    assert compiled.load_checkpoint(tmp_path)["step"] == 1
    compiled.save_checkpoint(tmp_path, 2)  # the next save clears the debris
    assert not (tmp_path / ".step-00000002.tmp").exists()
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step-00000002"


def test_a_checkpoint_of_another_model_is_refused(saved):
    import galvatron_fx as gfx

    root, _ = saved
    model, args, kwargs = build("gpt:layers=2,hidden=32,heads=4,vocab=128,seq=32", batch=8, seq=16)
    compiled = gfx.compile(model, args, kwargs, optimizer=_adamw)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"parameter .wte.weight. is \(128, 64\) there, \(128, 32\) in this model",
    ):
        compiled.load_checkpoint(root)


def _interrupt_while_writing(state, checkpoint_id, **kwargs):
    """What Ctrl-C does to a save in the middle of DCP's writes: a file half there."""
    from pathlib import Path

    Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
    (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"\x80half a tensor")
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["writing", "publishing"])
def test_ctrl_c_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, where):
    import galvatron_fx as gfx

    model, args, kwargs = build(SPEC, batch=8, seq=16)
    compiled = gfx.compile(model, args, kwargs, optimizer=_adamw)
    compiled.train_step(*args, **kwargs)
    compiled.save_checkpoint(tmp_path, 1)
    saved = {k: v.clone() for k, v in compiled.full_params().items()}
    compiled.train_step(*args, **kwargs)
    if where == "writing":
        monkeypatch.setattr(checkpoint.dcp, "save", _interrupt_while_writing)
    else:
        monkeypatch.setattr(checkpoint, "_before_publish", _raise_keyboard_interrupt)
    with pytest.raises(KeyboardInterrupt):
        compiled.save_checkpoint(tmp_path, 2)
    monkeypatch.undo()
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    assert compiled.load_checkpoint(tmp_path)["step"] == 1
    for name, value in compiled.full_params().items():
        assert torch.equal(value, saved[name]), name


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


def test_checkpoint_metadata_that_would_run_code_is_refused(tmp_path):
    import pickle

    import galvatron_fx as gfx

    model, args, kwargs = build(SPEC, batch=8, seq=16)
    compiled = gfx.compile(model, args, kwargs, optimizer=_adamw)
    path = compiled.save_checkpoint(tmp_path, 1)
    marker = tmp_path / "ran"
    evil = pickle.dumps(_Evil(str(marker)))
    (path / ".metadata").write_bytes(evil)
    with pytest.raises(checkpoint.CheckpointError, match=r"refers to posix\.system|builtins"):
        compiled.load_checkpoint(tmp_path)
    assert not marker.exists()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))

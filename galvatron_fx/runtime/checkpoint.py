"""Checkpoints: `torch.distributed.checkpoint` under the original model's names, so any plan
can resume any other's (other tp, dp, ZeRO stage or pipeline split).

Layout of a checkpoint root:

    root/step-00000010/     a DCP checkpoint: model.<name> (parameters, tied names too) and
                            optim.<name>.<state> (e.g. exp_avg), whole tensors; meta.json
                            (step, optimizer hyper-parameters, plan, user fields)
    root/latest             the name of the newest complete step directory

Saving is atomic: ranks write into `root/.step-XXXXXXXX.tmp`, and rank 0 renames it and then
replaces `latest` only after every rank has finished (a crash at any point leaves the
previous checkpoint whole and `latest` pointing at it). Stale `.tmp` directories are removed
by the next save.

Each stage assembles whole tensors for its own parameters (a gather over its dp and tp
groups) and DCP keeps one copy of what several ranks hold. While saving and loading, a rank
therefore holds its stage's parameters and optimizer states whole: simple and exact; a
sharded save (DCP chunks of the flat ZeRO buffers) would avoid that peak.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from galvatron_fx.jsonio import read_json
from galvatron_fx.runtime.safe_reader import SafeReader
from galvatron_fx.runtime.state import Cache, StateHolder, holder_of, load_whole, whole_value

__all__ = ["CheckpointError", "export_state_dict", "latest_checkpoint", "load", "save"]

LATEST = "latest"
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that does not exist, is incomplete, or belongs to another model."""


def _before_publish() -> None:
    """Called between writing and publishing a save (tests make it crash here)."""


def save(
    model: StateHolder, root: str | Path, step: int, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write a checkpoint of `model` (a compiled model, any plan) at training step `step`;
    call on every rank. Returns the step directory."""
    root = Path(root)
    module, sync, specs, _ = model.state_parts()
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if _rank0():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*.tmp"):
            shutil.rmtree(stale)
    _barrier()
    cache: Cache = {}
    state: dict[str, Any] = {}
    for name, spec in specs.items():
        state[f"model.{name}"] = whole_value(module, sync, spec, lambda q: q.detach(), "", cache)
    optimizer = sync.optimizer
    for name, spec in specs.items():
        if spec.alias_of is not None:
            continue
        held = optimizer.state.get(holder_of(module, sync, spec).param, {})
        for key in sorted(k for k, v in held.items() if isinstance(v, torch.Tensor)):
            value = whole_value(module, sync, spec, _state_of(optimizer, key), key, cache)
            state[f"optim.{name}.{key}"] = value
    dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    _before_publish()
    _barrier()
    if _rank0():
        meta = {
            "step": step,
            "world_size": model.plan.world_size,
            "plan": model.plan.to_json(),
            "param_groups": [_hyper(g) for g in optimizer.param_groups],
            "extra": dict(extra or {}),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
    _barrier()
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (or `root` itself if it is one)."""
    root = Path(root)
    if (root / META).exists():
        return root
    pointer = root / LATEST
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / META).exists():
            return path
    done = sorted(p for p in root.glob("step-*") if (p / META).exists())
    return done[-1] if done else None


def load(model: StateHolder, root: str | Path) -> dict[str, Any]:
    """Load the newest checkpoint under `root` into `model` (parameters and optimizer
    states, resharded for its plan); call on every rank. Returns its meta (`step`,
    `extra`, ...)."""
    path = _latest_or_fail(root)
    meta = read_json(path / META, error=CheckpointError)
    parts = model.state_parts()
    module, sync, specs, rank = parts
    known = _read_metadata(path)
    _check_names(path, known, specs)
    wanted = {f"model.{n}": _empty(known[f"model.{n}"]) for n in specs}
    optim_keys = {k for k in known if k.startswith("optim.")}
    wanted.update({k: _empty(known[k]) for k in optim_keys if _param_of(k) in specs})
    dcp.load(wanted, storage_reader=SafeReader(str(path)), no_dist=not dist.is_initialized())
    with torch.no_grad():
        values = load_whole(module, sync, specs, lambda n: wanted[f"model.{n}"], rank)
        holders = {}  # by id: what the optimizer steps (a parameter or a flat shard)
        for spec in specs.values():
            if spec.alias_of is None:
                holder = holder_of(module, sync, spec).param
                holders[id(holder)] = holder
        for key, holder in holders.items():
            holder.copy_(values[key])
        sync.refresh_params()
        _load_optimizer(parts, wanted, holders, meta)
    return meta


def _latest_or_fail(root: str | Path) -> Path:
    path = latest_checkpoint(root)
    if path is None:
        raise CheckpointError(f"{root}: no complete checkpoint (no {META} in any step-* dir)")
    return path


def _load_optimizer(
    parts: tuple[Any, Any, dict[str, Any], int],
    wanted: dict[str, Any],
    params: dict[int, Any],
    meta: dict[str, Any],
) -> None:
    module, sync, specs, rank = parts
    optimizer = sync.optimizer
    state_keys = sorted({k.rsplit(".", 1)[1] for k in wanted if k.startswith("optim.")})
    for key in state_keys:
        owners = {
            n: s for n, s in specs.items() if s.alias_of is None and f"optim.{n}.{key}" in wanted
        }
        scalars = {n: wanted[f"optim.{n}.{key}"] for n in owners if wanted[f"optim.{n}.{key}"].dim() == 0}  # fmt: skip
        shaped = {n: s for n, s in owners.items() if n not in scalars}
        values = load_whole(module, sync, shaped, _entry(wanted, key), rank)
        for name in scalars:
            holder = holder_of(module, sync, specs[name]).param
            optimizer.state[holder][key] = scalars[name].clone()
        for hid, value in values.items():
            optimizer.state[params[hid]][key] = value.clone()
    groups = meta.get("param_groups", [])
    if len(groups) == len(optimizer.param_groups):
        for group, saved in zip(optimizer.param_groups, groups, strict=True):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def _read_metadata(path: Path) -> Mapping[str, Any]:
    """DCP's index of the checkpoint at `path`, read without running its code."""
    try:
        return SafeReader(str(path)).read_metadata().state_dict_metadata
    except (pickle.UnpicklingError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata: {err}") from None


def export_state_dict(root: str | Path, out: str | Path | None = None) -> Path:
    """Write the newest checkpoint under `root` as one plain `torch.save` file of the
    original model's `state_dict()` (loadable with `weights_only=True`); no process group
    needed. Returns the file (default: `<step dir>/model.pt`)."""
    path = _latest_or_fail(root)
    known = _read_metadata(path)
    wanted = {k: _empty(v) for k, v in known.items() if k.startswith("model.")}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(wanted, storage_reader=SafeReader(str(path)), no_dist=True)
    target = Path(out) if out is not None else path / "model.pt"
    tmp = target.with_name(target.name + ".tmp")
    torch.save({k.removeprefix("model."): v for k, v in wanted.items()}, tmp)
    os.replace(tmp, target)
    return target


def _check_names(path: Path, known: Mapping[str, Any], specs: Mapping[str, Any]) -> None:
    saved = {k.removeprefix("model.") for k in known if k.startswith("model.")}
    missing = sorted(n for n in specs if f"model.{n}" not in known)
    if missing:
        raise CheckpointError(
            f"{path} is not a checkpoint of this model: it lacks {missing[:3]} "
            f"({len(missing)} parameters); it has e.g. {sorted(saved)[:3]}"
        )
    for name in specs:
        meta = known[f"model.{name}"]
        want = tuple(specs[name].global_shape)
        if tuple(meta.size) != want:
            raise CheckpointError(
                f"{path}: parameter {name!r} is {tuple(meta.size)} there, {want} in this model"
            )


def _state_of(optimizer: torch.optim.Optimizer, key: str) -> Any:
    def value(holder: torch.nn.Parameter) -> torch.Tensor:
        return optimizer.state[holder][key]

    return value


def _entry(wanted: Mapping[str, torch.Tensor], key: str) -> Any:
    def value(name: str) -> torch.Tensor:
        return wanted[f"optim.{name}.{key}"]

    return value


def _param_of(key: str) -> str:
    return key.removeprefix("optim.").rsplit(".", 1)[0]


def _empty(meta: Any) -> torch.Tensor:
    return torch.empty(tuple(meta.size), dtype=meta.properties.dtype)


def _hyper(group: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in group.items():
        if k == "params":
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float, bool, str, type(None), list, tuple)):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with f.open("rb+") as handle:
                os.fsync(handle.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)

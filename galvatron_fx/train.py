"""`galvatron-fx train`: compile a model and train it on N processes, with logging and
checkpoints.

Run directly, the command starts its own local ranks through PyTorch's launcher
(`torch.distributed.run`, what `torchrun` is) and each rank runs the same command again; run
under `torchrun` (the `RANK` variable is set), it is a rank. So the multi-node form is plain
torchrun:

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m galvatron_fx.cli train gpt:layers=24,hidden=2048,heads=16 --global-batch 64

Data is synthetic tokens by default (a fresh batch per step, seeded by the step, so a resumed
run sees what an uninterrupted one would), or windows of a token file (`--data`: a flat numpy
memmap of token ids, nanoGPT's `.bin`). Every rank builds the model from the same seed.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import galvatron_fx as gfx
from galvatron_fx.models.spec import parse_model_spec
from galvatron_fx.plan import Plan

__all__ = ["Batches", "TrainConfig", "launch", "train"]


@dataclass(frozen=True)
class TrainConfig:
    model: str
    nproc: int = 2
    global_batch: int = 8
    seq: int | None = None
    steps: int = 10
    plan: Path | None = None
    cluster: str | None = None
    memory_gb: float | None = None
    data: Path | None = None
    data_dtype: str = "uint16"
    save: Path | None = None
    save_every: int = 0
    resume: Path | None = None
    lr: float = 1e-3
    seed: int = 0
    timeout_s: float = 300.0
    """How long a collective waits for a rank that stopped answering before failing."""
    check_finite: bool = False


def launch(config: TrainConfig, argv: Sequence[str]) -> int:
    """Start `config.nproc` local ranks running `galvatron-fx <argv>` (torchrun's own code:
    rendezvous on a free local port, per-rank logs, non-zero exit when a rank fails)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if config.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {config.nproc}")
    args = parse_args(
        ["--standalone", "--nproc-per-node", str(config.nproc), "-m", "galvatron_fx.cli"]
    )
    # set after parsing: torchrun's parser would match our --nproc against its own options
    args.training_script_args = list(argv)
    try:
        run(args)
    except ChildFailedError as err:
        print(f"galvatron-fx train: a rank failed:\n{err.format_msg()}", file=sys.stderr)
        return 1
    return 0


class Batches:
    """The batch of every step: synthetic tokens, or windows of a token file."""

    def __init__(self, config: TrainConfig, spec: Any, model: torch.nn.Module) -> None:
        self.config, self.spec, self.model = config, spec, model
        self.seq = config.seq if config.seq is not None else spec.max_seq(model)
        self.tokens: Any = None
        if config.data is not None:
            import numpy as np

            if not config.data.is_file():
                raise ValueError(f"--data {config.data}: no such file")
            try:
                dtype = np.dtype(config.data_dtype)
            except TypeError:
                raise ValueError(
                    f"--data-dtype {config.data_dtype!r} is not a numpy dtype"
                ) from None
            if dtype.kind not in "iu":
                raise ValueError(f"--data-dtype {config.data_dtype!r}: token ids are integers")
            self.tokens = np.memmap(config.data, dtype=dtype, mode="r")
            if len(self.tokens) <= self.seq + 1:
                raise ValueError(
                    f"--data {config.data}: {len(self.tokens)} tokens, fewer than one "
                    f"sequence of {self.seq} + 1"
                )

    def at(self, step: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        torch.manual_seed(self.config.seed + 1_000_003 * (step + 1))
        args, kwargs = self.spec.example_inputs(self.model, self.config.global_batch, self.seq)
        if self.tokens is None:
            return args, kwargs
        return self._from_file(step, args, kwargs)

    def _from_file(
        self, step: int, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        import numpy as np

        rng = np.random.default_rng(self.config.seed + step)
        starts = rng.integers(0, len(self.tokens) - self.seq - 1, size=self.config.global_batch)
        rows = np.stack([self.tokens[s : s + self.seq + 1] for s in starts]).astype(np.int64)
        window = torch.from_numpy(rows)
        vocab = _vocab(self.model)
        if vocab is not None and int(window.max()) >= vocab:
            raise ValueError(
                f"--data {self.config.data}: token id {int(window.max())} at step {step} is "
                f"outside the model's vocabulary of {vocab} (wrong --data-dtype?)"
            )
        if "labels" in kwargs:  # HuggingFace causal LMs shift the labels themselves
            out = dict(kwargs, input_ids=window[:, :-1], labels=window[:, :-1])
            out.pop("attention_mask", None)
            return args, out
        if "targets" in kwargs and len(args) == 1:
            return (window[:, :-1],), dict(kwargs, targets=window[:, 1:])
        raise ValueError(
            f"--data works with gpt: and hf: causal language models; {self.config.model!r} "
            "takes other inputs"
        )


def _vocab(model: torch.nn.Module) -> int | None:
    emb = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def train(config: TrainConfig) -> list[float]:
    """One rank of a training job (inside torchrun): returns the losses of its steps."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=config.timeout_s))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        spec = parse_model_spec(config.model)
        torch.manual_seed(config.seed)
        model = spec.build("cpu")
        batches = Batches(config, spec, model)
        args, kwargs = batches.at(0)
        plan = Plan.load(config.plan) if config.plan is not None else None
        lr = config.lr
        compiled = gfx.compile(
            model,
            args,
            kwargs,
            plan=plan,
            cluster=config.cluster,
            memory_budget_gb=config.memory_gb,
            optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
            check_finite=config.check_finite,
        )
        if rank == 0:
            if config.seq is None:  # say which length the model's config gave, and why
                print(spec.default_seq(model).describe(), flush=True)
            print(compiled.plan.table(), flush=True)
        start = 0
        if config.resume is not None:
            start = int(compiled.load_checkpoint(config.resume)["step"])
            _log(rank, f"resumed from {config.resume} at step {start}")
        return _loop(compiled, batches, config, start, world)
    finally:
        dist.destroy_process_group()


def _loop(compiled: Any, batches: Batches, config: TrainConfig, start: int, world: int) -> list:
    rank = dist.get_rank()
    losses = []
    for step in range(start, config.steps):
        with _peers_lost(rank, f"step {step + 1}"):
            losses.append(_step(compiled, batches, config, step, world))
    return losses


@contextlib.contextmanager
def _peers_lost(rank: int, doing: str) -> Iterator[None]:
    """A collective failing under `doing` most often means another rank died: say so, and
    point at the rank that did (torchrun names it in its summary)."""
    try:
        yield
    except RuntimeError as err:
        if not _lost_peer(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(
            f"rank {rank}: {doing}: a collective failed, most likely because another rank "
            f"stopped (see its log, or the launcher's summary of which rank failed first): "
            f"{first}"
        ) from None


def _lost_peer(err: BaseException) -> bool:
    """gloo reports a dead peer as a reset connection or a timeout (DistBackendError or a
    plain RuntimeError, by version and op); NCCL as DistBackendError."""
    text = str(err)
    return isinstance(err, dist.DistBackendError) or any(
        s in text for s in ("Connection reset", "Connection closed", "Timed out", "gloo")
    )


def _step(compiled: Any, batches: Batches, config: TrainConfig, step: int, world: int) -> float:
    """Train step `step` (from 0), log it on rank 0, and save when it is time."""
    rank = dist.get_rank()
    args, kwargs = batches.at(step)
    began = time.perf_counter()
    loss = compiled.train_step(*args, **kwargs).item()
    step_s = time.perf_counter() - began
    peak = torch.tensor(_peak_rss_bytes(), dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    _log(
        rank,
        f"step {step + 1}/{config.steps}  loss {loss:.6f}  time {step_s * 1e3:.1f} ms  "
        f"samples/s {config.global_batch / step_s:.1f}  "
        f"peak rss {peak.item() / 2**20:.0f} MiB (max over {world} ranks)",
    )
    last = step + 1 == config.steps
    every = config.save_every and (step + 1) % config.save_every == 0
    if config.save is not None and (every or last):
        path = compiled.save_checkpoint(config.save, step + 1, {"model": config.model})
        _log(rank, f"saved {path}")
    return loss


def _peak_rss_bytes() -> float:
    # Linux reports kilobytes; the CPU runtime has no allocator statistics to read instead
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _log(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def under_launcher() -> bool:
    """True inside torchrun (or our own launch): the process is a rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ

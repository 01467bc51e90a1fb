"""The forked-rank launcher: a rank that dies without answering is reported at once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from galvatron_fx.runtime.launch import RankError, fork_ranks


def _die_on_rank_1(rank: int, world: int) -> int:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return rank


def test_a_rank_killed_without_answering_fails_fast():
    began = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 died without answering \(exit code -9"):
        fork_ranks(_die_on_rank_1, 2, timeout_s=120)
    assert time.monotonic() - began < 30  # not the whole timeout

"""The forked-rank launcher: a rank that dies without answering is reported at once, by the
death check and not by the deadline."""

from __future__ import annotations

import os
import signal

import pytest

from galvatron_fx.runtime.launch import RankError, fork_ranks


def _die_on_rank_1(rank: int, world: int) -> int:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return rank


# Liveness only: the launcher polls every second, so a broken death check would wait forever
# (no deadline below); 60 s stops such a test, far above the few seconds forking two ranks takes.
@pytest.mark.timeout(60)
def test_a_rank_killed_without_answering_is_reported_without_a_deadline():
    """With no deadline at all the launcher can only stop by noticing the dead rank: the error
    names it and the signal, where the deadline's error would say the ranks timed out."""
    with pytest.raises(RankError, match=r"rank 1 died without answering \(exit code -9"):
        fork_ranks(_die_on_rank_1, 2, timeout_s=float("inf"))

"""Fork gloo ranks from pytest: `run_ranks(fn, world_size, *args)` returns every rank's result.

The launcher is the package's own (`galvatron_fx.runtime.launch`); a failing or hanging rank
fails the test with that rank's traceback.
"""

from __future__ import annotations

from galvatron_fx.runtime.launch import fork_ranks, free_port

__all__ = ["free_port", "run_ranks"]

run_ranks = fork_ranks

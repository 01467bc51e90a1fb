"""Progress bars and the package's log verbosity, shared by the profiler, the layer profiler
and the search.

Bars go to stderr, and only when the `galvatron_fx` logger is enabled for INFO (the command
line's default; `--quiet` turns them off, and a library user's default logging config leaves
them off). On a terminal the bar redraws in place; in a log file only the finished bar is
written, so CI logs get one line per phase rather than thousands of carriage returns.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["LOG", "configure", "progress"]

LOG = logging.getLogger("galvatron_fx")


def configure(verbosity: int) -> None:
    """-1 (quiet: warnings and errors), 0 (progress and notes), 1 (debug: every pass's time,
    the search's statistics)."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    if not any(isinstance(h, _Stderr) for h in LOG.handlers):
        LOG.addHandler(_Stderr())
    LOG.setLevel(level)
    LOG.propagate = False


class _Stderr(logging.Handler):
    """Writes to whatever `sys.stderr` is now (tests and notebooks replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stderr, flush=True)


def progress(done: int, total: int, what: str = "", width: int = 30) -> None:
    """Draw `done` of `total` with a note; the last call (done == total) ends the line."""
    if not LOG.isEnabledFor(logging.INFO):
        return
    finished = done >= total
    if not finished and not sys.stderr.isatty():
        return
    bar = "#" * (width * done // max(total, 1))
    end = "\n" if finished else ""
    print(f"\r[{bar:<{width}}] {done}/{total} {what:<40.40}", end=end, file=sys.stderr, flush=True)

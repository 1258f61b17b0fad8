"""Whether a command draws progress bars, and the bars it draws (tqdm: done/total, rate, time left)."""
from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["show_progress", "progress_wanted", "stderr_is_terminal", "progress_bar"]


def show_progress(rank: int, *, quiet: bool, isatty: bool) -> bool:
    """Bars are for a person watching a terminal: on rank 0 only (every rank would draw over the same line),
    never with --quiet, and only when stderr is a terminal (in a log file or a pipe each redraw would be one
    more line of noise)."""
    return rank == 0 and not quiet and isatty


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def progress_wanted(rank: int, *, quiet: bool) -> bool:
    """show_progress for this process's stderr."""
    return show_progress(rank, quiet=quiet, isatty=stderr_is_terminal())


def progress_bar(iterable=None, *, enabled: bool, **options) -> tqdm:
    """A tqdm bar on stderr, redrawn at most once a second (unless `options` say otherwise), or a silent one
    when not `enabled`."""
    return tqdm(iterable, **{"file": sys.stderr, "disable": not enabled, "mininterval": 1.0, "dynamic_ncols": True,
                             **options})

"""CPU seconds used by this process and every descendant over a timed section, pool workers that exit included.

On a machine shared with other jobs a process gets whatever share of a core the scheduler leaves it, so
samples per wall second measure the neighbours as much as the code. Samples per CPU second do not: they say how
much work each sample costs, whoever else runs. Descendants are polled every 0.1 s and each one's last reading
is kept, so a worker that exits before the end (a pool closing) still counts, short by at most one interval.
"""
from __future__ import annotations

import os
import threading
import time

import psutil

__all__ = ["CpuMeter", "TICK", "machine_report", "RATIOS_NOTE"]

TICK = 0.01


class CpuMeter:
    """with CpuMeter() as meter: ...; meter.seconds is the CPU time the process tree used inside the block."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.seconds = interval, 0.0
        self._me, self._stop = psutil.Process(), threading.Event()
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}

    def _read(self) -> dict[int, float]:
        readings = {}
        for process in [self._me, *self._me.children(recursive=True)]:
            try:
                times = process.cpu_times()
                readings[process.pid] = times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return readings

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._last.update(self._read())

    def __enter__(self) -> "CpuMeter":
        self._start = self._read()
        self._last = dict(self._start)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(self._read())
        # at least one clock tick (psutil's resolution), so a rate over a tiny section is finite
        self.seconds = max(sum(t - self._start.get(pid, 0.0) for pid, t in self._last.items()), TICK)


RATIOS_NOTE = ("one run; absolute rates drift on a shared machine, compare the ratios (measured in the same rounds). "
               "Scaling 1 -> 2 processes needs 2 idle cores: a loaded machine distorts it")


def machine_report(load_before: tuple[float, ...], started: float) -> dict:
    """The machine a benchmark ran on: cores, load average before and after, and its wall seconds since `started`."""
    return {"cpu_count": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "seconds": round(time.perf_counter() - started, 1)}

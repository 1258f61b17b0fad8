"""Per-step values kept on the device and read back together, once per logging interval.

Reading a GPU tensor (`.item()`, `float()`, printing) makes the host wait for every kernel queued before it;
once per step, that keeps the host from queueing the next step while the GPU works. The training loop hands
each step's loss terms here as tensors and gets them back as floats every `every` steps, in one read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["StepRecord", "StepReadback"]


@dataclass
class StepRecord:
    """One step as read back: its loss terms and total as floats, and what the host measured (`host`)."""

    terms: dict[str, float]
    total: float
    host: dict = field(default_factory=dict)


class StepReadback:
    """Collects (terms, total) tensors per step; `add` returns the pending steps as floats every `every`
    steps (and `flush` whatever is pending, at an epoch's end), each read in one device-to-host copy."""

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"read-back interval {every} must be >= 1 step")
        self.every = every
        self._pending: list[tuple[dict[str, torch.Tensor], torch.Tensor, dict]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, terms: dict[str, torch.Tensor], total: torch.Tensor, **host) -> list[StepRecord]:
        self._pending.append(({k: v.detach() for k, v in terms.items()}, total.detach(), host))
        return self.flush() if len(self._pending) >= self.every else []

    def flush(self) -> list[StepRecord]:
        if not self._pending:
            return []
        flat = [v.float().reshape(()) for terms, total, _ in self._pending for v in (*terms.values(), total)]
        values = iter(torch.stack(flat).tolist())  # the one read of the interval
        records = []
        for terms, _total, host in self._pending:
            read = {k: next(values) for k in terms}
            records.append(StepRecord(read, next(values), host))
        self._pending = []
        return records

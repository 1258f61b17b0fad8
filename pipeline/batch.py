"""The one batch contract every loader yields and every model consumes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Batch"]


@dataclass
class Batch:
    """One batch of B samples.

    inputs[m]:  video/depth (B, C, T, H, W) float; audio (B, F, T) log-mel float; text (B, L) int32 ids (0 = pad)
    present[m]: (B,) bool, False where the sample lacks modality m (its input is zeros)
    labels:     (B,) int64 class ids
    keys:       the samples' keys, for tracing a batch back to the corpus
    """

    inputs: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    labels: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch({m: move(t) for m, t in self.inputs.items()}, {m: move(t) for m, t in self.present.items()},
                     move(self.labels), self.keys)

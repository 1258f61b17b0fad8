"""The one batch contract every loader yields and every model consumes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Batch", "to_device"]


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`. A host tensor bound for a GPU is pinned first: only a copy from pinned memory
    is asynchronous, from pageable memory the host waits for it."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclass
class Batch:
    """One batch of B samples.

    inputs[m]:  video (B, 3, T, H, W) and depth (B, 1, T, H, W) float; audio (B, F, T) log-mel or MFCC
                float, or (B, S) waveform; text (B, L) int32 ids (0 = pad); features (B, T, D) float, zero-padded
    present[m]: (B,) bool, False where the sample lacks modality m (its input is zeros)
    labels:     class (B,) int64; regression (B, D) float32; multilabel (B, K) float32 multi-hot
    keys:       the samples' keys, for tracing a batch back to the corpus
    lengths[m]: (B,) int64 valid length for text (non-pad tokens) and features (valid frames)
    """

    inputs: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    labels: torch.Tensor
    keys: list[str]
    lengths: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "Batch":
        """This batch in pinned host memory; a DataLoader with pin_memory=True calls it in its pinning thread."""
        pin = lambda t: t.pin_memory()  # noqa: E731
        return Batch({m: pin(t) for m, t in self.inputs.items()}, {m: pin(t) for m, t in self.present.items()},
                     pin(self.labels), self.keys, {m: pin(t) for m, t in self.lengths.items()})

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: to_device(t, device)  # noqa: E731
        return Batch({m: move(t) for m, t in self.inputs.items()}, {m: move(t) for m, t in self.present.items()},
                     move(self.labels), self.keys, {m: move(t) for m, t in self.lengths.items()})

"""The one call the training loop makes per batch: forward every branch and return (loss, terms).

ops/train.py knows nothing of the transfer terms; switching one on (transfer.feature, transfer.attention)
changes what this function asks the model for, not the loop.
"""
from __future__ import annotations

import torch

from .losses import TransferConfig, cotrain_losses, total_loss
from .tasks import TaskConfig

__all__ = ["step_loss"]


def step_loss(model, batch, *, transfer: TransferConfig, task: TaskConfig, progress: float,
              stream_label_smoothing: float = 0.0, muted: frozenset[str] = frozenset()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, named terms) for one batch at `progress` (0..1 of training).

    `model` is the CoTrainModel or a wrapper that forwards its arguments (a DeepSpeed engine); `batch` has
    .inputs, .present, .labels and optionally .lengths. Outputs are cast to float32 before the losses (bf16
    training). The loss is the sum of the terms whose key ends in `_loss`. Students in `muted` get no transfer.
    """
    lengths = getattr(batch, "lengths", None) or None
    ramp = transfer.ramp_at(progress)
    want_extras = transfer.needs_extras and ramp > 0
    if want_extras:
        logits, extras = model(batch.inputs, batch.present, lengths, extras=True)
        extras = {level: {k: v.float() for k, v in found.items()} for level, found in extras.items()}
    else:
        logits, extras = model(batch.inputs, batch.present, lengths), None
    logits = {b: v.float() for b, v in logits.items()}
    terms = cotrain_losses(logits, batch.labels, batch.present, transfer, transfer_scale=transfer.alpha * ramp,
                           stream_label_smoothing=stream_label_smoothing, task=task, extras=extras, ramp=ramp,
                           muted=muted)
    return total_loss(terms), terms

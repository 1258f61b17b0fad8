"""Tasks: what a branch's outputs mean and how they are scored against the labels.

    class       logits (B, K)  labels int64 (B,)          cross-entropy (optional label smoothing)
    regression  preds  (B, D)  labels float32 (B, D)      MSE or L1, plus an optional CCC term
    multilabel  logits (B, K)  labels float32 multi-hot   binary cross-entropy

Losses are averaged over the samples where the branch's input is present (`present`, (B,) bool).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TASKS = ("class", "regression", "multilabel")

__all__ = ["TaskConfig", "REGRESSION_LOSSES", "masked_mean", "task_loss", "sample_error", "ccc", "late_fusion"]

REGRESSION_LOSSES = ("mse", "l1")


@dataclass
class TaskConfig:
    """The task's loss options; `type` comes from the dataset's label (dataset.json "label"."type")."""

    type: str = "class"
    """class, regression or multilabel (set from the dataset by the trainer)."""
    label_smoothing: float = 0.0
    """Label smoothing of the branches' cross-entropy (classification)."""
    regression_loss: str = "mse"
    """Per-sample regression loss: mse or l1."""
    ccc_weight: float = 0.0
    """Weight of an added (1 - concordance correlation) term per output dimension (valence/arousal-style
    targets, where CCC is the reported metric). Computed over the batch's present samples."""

    def __post_init__(self):
        if self.type not in TASKS:
            raise ValueError(f"task.type must be one of {', '.join(TASKS)}, got {self.type!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"task.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.regression_loss not in REGRESSION_LOSSES:
            raise ValueError(f"task.regression_loss must be one of {', '.join(REGRESSION_LOSSES)}, "
                             f"got {self.regression_loss!r}")
        if self.ccc_weight < 0:
            raise ValueError(f"task.ccc_weight must be >= 0, got {self.ccc_weight}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B,) values over the True samples of mask (0 when none)."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def sample_error(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """(B,) how far each sample's output is from its label, comparable across branches of one task:
    cross-entropy (class), mean binary cross-entropy (multilabel), mean absolute error (regression)."""
    return _per_sample(logits.detach(), labels, task, smoothing=0.0, regression="l1")


def _per_sample(logits: torch.Tensor, labels: torch.Tensor, task: str, smoothing: float,
                regression: str) -> torch.Tensor:
    """(B,) per-sample loss: cross-entropy (with label smoothing), mean binary cross-entropy, or the mean
    squared ("mse") or absolute ("l1") error over the output dimensions."""
    if task == "class":
        return F.cross_entropy(logits, labels, reduction="none", label_smoothing=smoothing)
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(dim=-1)
    diff = logits - labels.to(logits.dtype).reshape(logits.shape)
    return (diff.abs() if regression == "l1" else diff ** 2).mean(dim=-1)


def late_fusion(outputs: torch.Tensor, mask: torch.Tensor, task: str) -> torch.Tensor:
    """The joint prediction of M experts from their (M, B, K) outputs, each counted where mask (M, B, 1) is
    1: a product of experts for classes (the sum of log-probabilities) and for independent labels (the sum of
    logits), the mean of the present experts for regression. No training, nothing learned: the standard
    baseline a multimodal model must beat, and the teacher's own late-fusion term."""
    if task == "class":
        outputs = torch.log_softmax(outputs, dim=-1)
    total = (outputs * mask).sum(dim=0)
    return total / mask.sum(dim=0).clamp_min(1.0) if task == "regression" else total


def ccc(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Concordance correlation coefficient per column of (N, D) predictions and targets: (D,)."""
    mp, mt = pred.mean(dim=0), target.mean(dim=0)
    vp, vt = pred.var(dim=0, unbiased=False), target.var(dim=0, unbiased=False)
    cov = ((pred - mp) * (target - mt)).mean(dim=0)
    return 2 * cov / (vp + vt + (mp - mt) ** 2).clamp_min(1e-8)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, present: torch.Tensor, task: TaskConfig | None = None,
              label_smoothing: float | None = None) -> torch.Tensor:
    """The task loss of one branch, averaged over present samples. `label_smoothing` overrides the task's."""
    task = task or TaskConfig()
    smoothing = task.label_smoothing if label_smoothing is None else label_smoothing
    loss = masked_mean(_per_sample(logits, labels, task.type, smoothing, task.regression_loss), present)
    if task.type == "regression" and task.ccc_weight > 0 and int(present.sum()) > 1:
        target = labels.to(logits.dtype).reshape(logits.shape)
        loss = loss + task.ccc_weight * (1 - ccc(logits[present], target[present])).mean()
    return loss


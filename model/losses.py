"""Co-training objectives: a task loss on every branch plus decision-level transfer from the
multimodal teacher to each unimodal student.

Every function returns named terms; keys ending in `_loss` are summed into the objective
(open_clip's convention), so adding a term never touches the training loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cotrain import TEACHER

GATES = ("none", "teacher_correct")

__all__ = ["GATES", "TransferConfig", "task_loss", "decision_transfer", "cotrain_losses", "total_loss"]


@dataclass
class TransferConfig:
    """Knowledge transfer from the multimodal branch (teacher) to each unimodal branch (student)."""

    alpha: float = 1.0
    """Weight of the decision-level KL term, alpha * T^2 * KL(teacher || student)."""
    temperature: float = 2.0
    """Softmax temperature T applied to both teacher and student logits."""
    start_fraction: float = 0.4
    """Fraction of training with no transfer at all (0 = from step one, as in the paper). A student on its
    initial plateau is pushed off course by transfer: full transfer from step one kept our video student
    at 18.9% (84.4% alone), and even a ramp from step one cost it 10 points on one seed in three."""
    warmup_fraction: float = 0.3
    """Fraction of training over which alpha then ramps linearly from 0 to its full value."""
    gate: str = "teacher_correct"
    """Which samples transfer: 'none' (all, as in the paper) or 'teacher_correct' (only where the teacher's
    prediction is the true label, so a wrong teacher never pulls a student away from the label)."""

    def __post_init__(self):
        if self.alpha < 0:
            raise ValueError(f"transfer.alpha must be >= 0, got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"transfer.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.start_fraction < 1:
            raise ValueError(f"transfer.start_fraction must be in [0, 1), got {self.start_fraction}")
        if not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"transfer.warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        if self.gate not in GATES:
            raise ValueError(f"transfer.gate must be one of {', '.join(GATES)}, got {self.gate!r}")

    def scale_at(self, progress: float) -> float:
        """alpha times the schedule at `progress` in [0, 1] of training: 0 until start_fraction, then a
        linear ramp over warmup_fraction, then alpha."""
        ramped = progress - self.start_fraction
        if ramped < 0:
            return 0.0
        if self.warmup_fraction == 0:
            return self.alpha
        return self.alpha * min(1.0, ramped / self.warmup_fraction)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, present: torch.Tensor,
              label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the samples where the branch's input is present."""
    loss = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    return _masked_mean(loss, present)


def decision_transfer(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      present: torch.Tensor) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), teacher detached, over present samples.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al.). Detaching makes
    the teacher's own layers receive no gradient from transfer; the shared stages still get
    it through the student's path.
    """
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.detach() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=-1)  # (B,)
    return temperature ** 2 * _masked_mean(kl, present)


def cotrain_losses(logits: dict[str, torch.Tensor], labels: torch.Tensor, present: dict[str, torch.Tensor],
                   transfer: TransferConfig, transfer_scale: float | None = None,
                   stream_label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Named loss terms: `<branch>_task_loss` for every branch, `<m>_transfer_loss` per student."""
    any_present = torch.stack(list(present.values())).any(dim=0)
    terms = {}
    for branch, branch_logits in logits.items():
        if branch.startswith(f"{TEACHER}/"):  # a teacher stream: its modality's samples only
            m = branch.split("/", 1)[1]
            terms[f"{TEACHER}_{m}_stream_loss"] = task_loss(branch_logits, labels, present[m], stream_label_smoothing)
            continue
        mask = any_present if branch == TEACHER else present[branch]
        terms[f"{branch}_task_loss"] = task_loss(branch_logits, labels, mask)
    scale = transfer.alpha if transfer_scale is None else transfer_scale
    if TEACHER in logits and scale > 0:
        trusted = _trusted(logits[TEACHER], labels, transfer.gate)
        for branch in logits:
            if TEACHER not in branch:
                kl = decision_transfer(logits[branch], logits[TEACHER], transfer.temperature, present[branch] & trusted)
                terms[f"{branch}_transfer_loss"] = scale * kl
    return terms


def _trusted(teacher: torch.Tensor, labels: torch.Tensor, gate: str) -> torch.Tensor:
    """(B,) samples whose teacher output may be transferred under `gate`."""
    if gate == "teacher_correct":
        return teacher.detach().argmax(dim=-1) == labels
    return torch.ones_like(labels, dtype=torch.bool)


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The objective: the sum of every term whose key ends in `_loss`."""
    return sum(v for k, v in terms.items() if k.endswith("_loss"))

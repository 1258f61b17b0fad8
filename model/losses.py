"""Co-training objectives: a task loss on every branch plus knowledge transfer from the multimodal
teacher to each unimodal student, at three levels, each with its own weight:

    decision   alpha * T^2 * KL(teacher || student) on softened outputs (classes; binary KL per label for
               multi-label), or an L2 / L1 distance between predictions (regression)
    feature    weight * (1 - cos(projected student feature, teacher feature))
    attention  weight * KL(teacher's last-block attention over the modality's tokens || student's attention)

The teacher's outputs, features and attention are detached in every term: transfer never trains the teacher,
while the shared stages get gradients from both the student's and the teacher's own losses.

Every function returns named terms; keys ending in `_loss` are summed into the objective
(open_clip's convention), so adding a term never touches the training loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cotrain import LATE_FUSION, TEACHER, TRANSFORMER
from .tasks import TaskConfig, masked_mean as _masked_mean, sample_error, task_loss

GATES = ("none", "teacher_correct", "teacher_better", "stream_correct")
GUARDS = ("none", "val")
DISTANCES = ("l2", "l1")

__all__ = ["GATES", "GUARDS", "TransferConfig", "task_loss", "decision_transfer", "regression_transfer",
           "multilabel_transfer", "feature_transfer", "attention_transfer", "cotrain_losses", "total_loss"]


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
    gate: str = "stream_correct"
    """Which samples transfer: 'none' (all, as in the paper); 'teacher_correct' (only where the teacher's
    prediction is the true label, so a wrong teacher never pulls a student away from the label; for
    multi-label, where every label is right; regression has no such gate and transfers on all samples);
    'teacher_better' (per student: where the teacher is right, as above, and its own error on the sample, by
    model.tasks.sample_error, is below the student's; for regression, where the teacher is closer to the
    label than the student); 'stream_correct' (per student: where the teacher is right and so is the teacher's
    stream of the student's own modality, a sign that the student's input shows the class: a lead that comes
    from another modality's evidence is not pushed onto a student whose input lacks it; needs
    fusion.stream_loss). stream_correct is the default since the development members of the protocol
    (experiments/protocol.yaml) chose it over teacher_correct: no seed below -1.7 points against -2.3, the
    students' mean change on par (docs/results-protocol.md)."""
    guard: str = "val"
    """'val': after every validation, a student whose validation error is not at least guard_margin (a
    fraction) above the teacher's gets no transfer until a later validation says otherwise, because transfer
    from a teacher that is not clearly stronger than its student makes the student worse. 'none': always
    transfer (the paper). Transfer runs until the first validation; without a val split the guard is off."""
    guard_margin: float = 0.1
    """Relative lead the guard asks of the teacher: teacher error <= (1 - margin) * student error, where the
    error is the metric itself when lower is better (MAE) and 1 - metric otherwise (accuracy, macro-F1)."""
    regression_distance: str = "l2"
    """Decision-level distance for regression: l2 (squared error) or l1 between teacher and student outputs."""
    feature: float = 0.0
    """Weight of the feature-level term (cosine distance of projected pooled features); 0 = off."""
    attention: float = 0.0
    """Weight of the attention-level term (students with self-attention or attention pooling); 0 = off."""

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
        if self.guard not in GUARDS:
            raise ValueError(f"transfer.guard must be one of {', '.join(GUARDS)}, got {self.guard!r}")
        if not 0 <= self.guard_margin < 1:
            raise ValueError(f"transfer.guard_margin must be in [0, 1), got {self.guard_margin}")
        if self.regression_distance not in DISTANCES:
            raise ValueError(f"transfer.regression_distance must be one of {', '.join(DISTANCES)}, "
                             f"got {self.regression_distance!r}")
        if self.feature < 0 or self.attention < 0:
            raise ValueError(f"transfer.feature and transfer.attention must be >= 0, got {self.feature}, "
                             f"{self.attention}")

    @property
    def needs_extras(self) -> bool:
        """Whether the terms need the model's features and attention (forward with extras=True)."""
        return self.feature > 0 or self.attention > 0

    def ramp_at(self, progress: float) -> float:
        """The schedule alone at `progress`: 0 until start_fraction, then linear to 1 over warmup_fraction."""
        ramped = progress - self.start_fraction
        if ramped < 0:
            return 0.0
        return 1.0 if self.warmup_fraction == 0 else min(1.0, ramped / self.warmup_fraction)

    def scale_at(self, progress: float) -> float:
        """alpha times the schedule at `progress` in [0, 1] of training: 0 until start_fraction, then a
        linear ramp over warmup_fraction, then alpha."""
        return self.alpha * self.ramp_at(progress)


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


def regression_transfer(student: torch.Tensor, teacher: torch.Tensor, distance: str,
                        present: torch.Tensor) -> torch.Tensor:
    """Mean over present samples of the L2 (squared) or L1 distance to the detached teacher, averaged over D."""
    diff = student - teacher.detach()
    per_sample = (diff.abs() if distance == "l1" else diff ** 2).mean(dim=-1)
    return _masked_mean(per_sample, present)


def multilabel_transfer(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                        present: torch.Tensor) -> torch.Tensor:
    """T^2 * binary KL(sigmoid(teacher/T) || sigmoid(student/T)), averaged over labels, over present samples."""
    log_s = torch.stack([F.logsigmoid(student / temperature), F.logsigmoid(-student / temperature)])  # (2, B, K)
    log_t = torch.stack([F.logsigmoid(teacher.detach() / temperature), F.logsigmoid(-teacher.detach() / temperature)])
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=0).mean(dim=-1)  # (B,)
    return temperature ** 2 * _masked_mean(kl, present)


def feature_transfer(student: torch.Tensor, teacher: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between the student's projected feature and the detached teacher feature, (B, D)."""
    distance = 1 - F.cosine_similarity(student, teacher.detach(), dim=-1, eps=1e-8)
    return _masked_mean(distance, present)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor, present: torch.Tensor,
                       eps: float = 1e-8) -> torch.Tensor:
    """KL(teacher || student) between two (B, L) attention distributions over the same tokens, teacher
    detached; positions where the teacher puts no mass (padding) contribute nothing."""
    if student.shape != teacher.shape:
        raise ValueError(f"attention transfer compares attention over the same tokens, got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}: give the teacher's and "
                         "student's rests the same encoder")
    t = teacher.detach()
    kl = (t * (torch.log(t + eps) - torch.log(student + eps))).sum(dim=-1)
    return _masked_mean(torch.where(present, kl, torch.zeros_like(kl)), present)


def cotrain_losses(logits: dict[str, torch.Tensor], labels: torch.Tensor, present: dict[str, torch.Tensor],
                   transfer: TransferConfig, transfer_scale: float | None = None,
                   stream_label_smoothing: float = 0.0, *, task: TaskConfig | None = None,
                   extras: dict | None = None, ramp: float = 1.0,
                   muted: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Named loss terms: `<branch>_task_loss` for every branch, `<m>_stream_loss` per teacher stream, and per
    student `<m>_transfer_loss` (decision), `<m>_feature_transfer_loss`, `<m>_attention_transfer_loss`.

    The decision term is weighted by `transfer_scale` (default alpha); the feature and attention terms by their
    weights times `ramp` (the transfer schedule at this step). `extras` is the model's forward(extras=True) output.
    Students in `muted` (switched off by the validation guard) get no transfer terms.
    """
    task = task or TaskConfig()
    any_present = torch.stack(list(present.values())).any(dim=0)
    terms = {}
    for branch, branch_logits in logits.items():
        if branch in (TEACHER, TRANSFORMER, LATE_FUSION):
            terms.update(_teacher_task_terms(branch, logits, labels, any_present, task))
        elif branch.startswith(f"{TEACHER}/"):  # a teacher stream: its modality's samples only
            m = branch.split("/", 1)[1]
            smoothing = stream_label_smoothing if task.type == "class" else None
            terms[f"{TEACHER}_{m}_stream_loss"] = task_loss(branch_logits, labels, present[m], task, smoothing)
        else:
            terms[f"{branch}_task_loss"] = task_loss(branch_logits, labels, present[branch], task)
    if TEACHER not in logits:
        return terms
    students = [b for b in logits if TEACHER not in b and b not in muted]
    scale = transfer.alpha if transfer_scale is None else transfer_scale
    trusted = _trusted(logits[TEACHER], labels, transfer.gate, task.type) if students else None
    for branch in students:
        mask = present[branch] & trusted
        if transfer.gate == "teacher_better":
            mask = mask & _teacher_closer(logits[branch], logits[TEACHER], labels, task.type)
        if transfer.gate == "stream_correct":
            mask = mask & _trusted(_own_stream(logits, branch), labels, transfer.gate, task.type)
        if scale > 0:
            terms[f"{branch}_transfer_loss"] = scale * _decision(logits[branch], logits[TEACHER], transfer, task,
                                                                 mask)
        terms.update(_auxiliary_transfer(branch, extras, transfer, ramp, mask))
    return terms


def _teacher_task_terms(branch: str, logits: dict, labels: torch.Tensor, any_present: torch.Tensor,
                        task: TaskConfig) -> dict[str, torch.Tensor]:
    """The teacher's task terms. With late fusion (model.cotrain.TRANSFORMER in logits) the Transformer is
    trained by its own loss, `multimodal_task_loss`; the teacher's output, late fusion plus a weight the
    validation chooses times the Transformer, is then only logged (`multimodal_teacher`, not summed), and
    the late fusion gets a loss (`multimodal_gates_loss`) only where it has something to learn (learned gates)."""
    loss = task_loss(logits[branch], labels, any_present, task)
    if TRANSFORMER not in logits or branch == TRANSFORMER:
        return {f"{TEACHER}_task_loss": loss}
    if branch == TEACHER:
        return {f"{TEACHER}_teacher": loss.detach()}
    return {f"{TEACHER}_gates_loss": loss} if logits[branch].requires_grad else {}


def _decision(student: torch.Tensor, teacher: torch.Tensor, transfer: TransferConfig, task: TaskConfig,
              mask: torch.Tensor) -> torch.Tensor:
    if task.type == "regression":
        return regression_transfer(student, teacher, transfer.regression_distance, mask)
    if task.type == "multilabel":
        return multilabel_transfer(student, teacher, transfer.temperature, mask)
    return decision_transfer(student, teacher, transfer.temperature, mask)


def _auxiliary_transfer(branch: str, extras: dict | None, transfer: TransferConfig, ramp: float,
                        mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The feature- and attention-level terms of one student, where switched on and available."""
    terms = {}
    if ramp <= 0 or not transfer.needs_extras:
        return terms
    if extras is None:
        raise ValueError("transfer.feature / transfer.attention need the model's extras: call the model with "
                         "extras=True (model.objective.step_loss does)")
    if transfer.feature > 0:
        if branch not in extras["feature"]:
            raise ValueError(f"feature transfer needs the model built with feature_transfer=True "
                             f"(no projection for student {branch!r})")
        terms[f"{branch}_feature_transfer_loss"] = transfer.feature * ramp * feature_transfer(
            extras["feature"][branch], extras["feature"][TEACHER], mask)
    if transfer.attention > 0 and branch in extras["attention"]:  # students without attention have no term
        terms[f"{branch}_attention_transfer_loss"] = transfer.attention * ramp * attention_transfer(
            extras["attention"][branch], extras["attention"][f"{TEACHER}/{branch}"], mask)
    return terms


def _trusted(teacher: torch.Tensor, labels: torch.Tensor, gate: str, task: str = "class") -> torch.Tensor:
    """(B,) samples whose teacher output may be transferred under `gate`."""
    everyone = torch.ones(teacher.shape[0], dtype=torch.bool, device=teacher.device)
    if gate == "none" or task == "regression":
        return everyone
    if task == "multilabel":
        return ((teacher.detach() > 0) == (labels > 0.5)).all(dim=-1)
    return teacher.detach().argmax(dim=-1) == labels


def _own_stream(logits: dict[str, torch.Tensor], branch: str) -> torch.Tensor:
    """The teacher's stream of the student's modality (transfer.gate 'stream_correct')."""
    stream = logits.get(f"{TEACHER}/{branch}")
    if stream is None:
        raise ValueError(f"transfer.gate 'stream_correct' reads the teacher's {branch} stream, and this model has "
                         "none: set fusion.stream_loss true, or choose another transfer.gate")
    return stream


def _teacher_closer(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """(B,) samples where the teacher's own error is below the student's."""
    return sample_error(teacher, labels, task) < sample_error(student, labels, task)


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The objective: the sum of every term whose key ends in `_loss`."""
    return sum(v for k, v in terms.items() if k.endswith("_loss"))

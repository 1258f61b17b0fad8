"""Per-branch metrics, accumulated batch by batch: one scorer per task type.

classification: accuracy, top-5 (more than 5 classes), macro-F1, confusion matrix
multi-label:    macro-F1, micro-F1, subset accuracy (thresholded at probability 0.5)
regression:     MAE, Pearson correlation and CCC (means over the target's dimensions)
"""
from __future__ import annotations

import torch

from model.tasks import ccc

__all__ = ["TASKS", "make_scorer", "primary_metric", "is_better"]

TASKS = ("class", "multilabel", "regression")
# the metric that picks each branch's best epoch, and whether larger is better
PRIMARY = {"class": ("accuracy", True), "multilabel": ("macro_f1", True), "regression": ("mae", False)}


def primary_metric(task: str) -> str:
    return PRIMARY[task][0]


def is_better(task: str, new: dict, old: dict | None) -> bool:
    """Whether score `new` beats `old` by the task's primary metric (anything beats None)."""
    if old is None:
        return True
    name, larger = PRIMARY[task]
    return new[name] > old[name] if larger else new[name] < old[name]


def metric_error(task: str, value: float) -> float:
    """The primary metric as an error (lower is better): MAE itself, 1 - accuracy or 1 - macro-F1."""
    return 1.0 - value if PRIMARY[task][1] else value


def _f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    return 2 * tp / (2 * tp + fp + fn).clamp(min=1)


class ClassScorer:
    def __init__(self, num_classes: int):
        self.k = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)  # [true, predicted]
        self.top5 = 0

    def update(self, output: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        output, labels = output[mask].float(), labels[mask]
        self.confusion += torch.bincount(labels * self.k + output.argmax(-1),
                                         minlength=self.k * self.k).reshape(self.k, self.k)
        if self.k > 5:
            self.top5 += int((output.topk(5, dim=-1).indices == labels[:, None]).any(-1).sum())

    def result(self) -> dict:
        c = self.confusion.double()
        n = int(c.sum())
        tp = c.diag()
        seen = (c.sum(0) + c.sum(1)) > 0  # macro over classes that occur as label or prediction
        f1 = _f1(tp, c.sum(0) - tp, c.sum(1) - tp)
        result = {"accuracy": float(tp.sum() / max(n, 1)), "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
                  "samples": n, "confusion": self.confusion.tolist()}
        if self.k > 5:
            result["top5"] = self.top5 / max(n, 1)
        return result


class MultilabelScorer:
    def __init__(self, num_classes: int):
        self.tp, self.fp, self.fn = (torch.zeros(num_classes, dtype=torch.double) for _ in range(3))
        self.exact, self.n = 0, 0

    def update(self, output: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        predicted, truth = output[mask].float() > 0, labels[mask] > 0.5
        self.tp += (predicted & truth).sum(0)
        self.fp += (predicted & ~truth).sum(0)
        self.fn += (~predicted & truth).sum(0)
        self.exact += int((predicted == truth).all(-1).sum())
        self.n += int(mask.sum())

    def result(self) -> dict:
        micro = _f1(self.tp.sum(), self.fp.sum(), self.fn.sum())
        return {"macro_f1": float(_f1(self.tp, self.fp, self.fn).mean()), "micro_f1": float(micro),
                "subset_accuracy": self.exact / max(self.n, 1), "samples": self.n}


class RegressionScorer:
    def __init__(self, dim: int):
        self.predictions: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, output: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        out, target = output[mask].float(), labels[mask].float()
        self.predictions.append(out.reshape(len(out), -1))
        self.targets.append(target.reshape(len(target), -1))

    def result(self) -> dict:
        if not self.predictions:
            return {"mae": float("nan"), "pearson": float("nan"), "ccc": float("nan"), "samples": 0}
        p, t = torch.cat(self.predictions).double(), torch.cat(self.targets).double()
        pearson = torch.stack([torch.corrcoef(torch.stack([p[:, d], t[:, d]]))[0, 1] for d in range(p.shape[1])])
        return {"mae": float((p - t).abs().mean()), "pearson": float(pearson.mean()), "ccc": float(ccc(p, t).mean()),
                "samples": len(p)}


def make_scorer(task: str, size: int):
    """A fresh scorer; `size` is the number of classes, or the regression target's dimension."""
    scorers = {"class": ClassScorer, "multilabel": MultilabelScorer, "regression": RegressionScorer}
    if task not in scorers:
        raise ValueError(f"unknown task type {task!r}; valid: {', '.join(TASKS)}")
    return scorers[task](size)

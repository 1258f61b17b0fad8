"""Late fusion of unimodal baselines: the standard baseline a multimodal model must beat.

Each unimodal run's per-sample outputs (RUN/predictions-<split>.jsonl, written by `cotrain eval`) are
combined with model.tasks.late_fusion (a product of the experts' class probabilities, a sum of label
logits, or the mean of regression outputs) and scored like a branch. No training and no shared layers:
what the baselines give when their predictions are simply multiplied.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.tasks import late_fusion

from .scores import make_scorer

__all__ = ["LATE_FUSION", "run_predictions", "fuse_runs", "late_fusion_scores"]

LATE_FUSION = "late_fusion"
"""The name late fusion of the baselines goes by in reports and results.json."""


def run_predictions(run: str | Path, split: str) -> dict[str, dict]:
    """RUN's per-sample outputs on `split`, written now (weights unchanged, scores untouched) when missing."""
    from .evaluate import evaluate_run, read_predictions

    path = Path(run) / f"predictions-{split}.jsonl"
    if not path.is_file():
        evaluate_run(run, split=split, save_scores=False)
    return read_predictions(path)


def fuse_runs(predictions: list[dict[str, dict]],
              task: str) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, fused outputs (N, K), labels, mask (N,) of samples any expert saw) over the sorted union of the runs'
    keys; each run contributes its one branch's outputs where the sample had that branch's input."""
    keys = sorted(set().union(*predictions))
    width = next(len(out) for rows in predictions for row in rows.values() for out in row["outputs"].values())
    outputs = torch.zeros(len(predictions), len(keys), width, dtype=torch.float64)
    mask = torch.zeros(len(predictions), len(keys), 1, dtype=torch.float64)
    labels = [None] * len(keys)
    for m, rows in enumerate(predictions):
        for i, key in enumerate(keys):
            row = rows.get(key)
            if row is None:
                continue
            labels[i] = row["label"]
            for values in row["outputs"].values():  # a unimodal run has one branch
                outputs[m, i] = torch.tensor(values, dtype=torch.float64)
                mask[m, i] = 1.0
    return keys, late_fusion(outputs, mask, task), _labels(labels, task), mask.sum(dim=0)[:, 0] > 0


def _labels(labels: list, task: str) -> torch.Tensor:
    return torch.tensor(labels, dtype=torch.long if task == "class" else torch.float32)


def late_fusion_scores(runs: list[str | Path], split: str, task: str) -> dict:
    """The scores (ops/scores.py) of late fusion of `runs` (one unimodal run per modality) on `split`."""
    _, fused, labels, seen = fuse_runs([run_predictions(run, split) for run in runs], task)
    scorer = make_scorer(task, fused.shape[-1])  # classes, labels or the target's dimension
    scorer.update(fused.float(), labels, seen)
    return scorer.result()

"""Per-branch evaluation: every branch of a run scored on one split, each unimodal branch alone."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from model.cotrain import TEACHER, CoTrainModel, FusionConfig, ModalitySpec
from pipeline.config import LoaderConfig
from pipeline.loader import BaseLoader, make_loader
from pipeline.dataset import load_dataset_info

__all__ = ["MODEL_FILE", "BEST_DIR", "build_run_model", "load_run", "score_branches", "evaluate_run", "format_scores",
           "teacher_warning"]

MODEL_FILE = "model.pt"
BEST_DIR = "best"


def build_run_model(payload: dict) -> CoTrainModel:
    """Rebuild the model a checkpoint payload describes (without weights)."""
    specs = [ModalitySpec(**s) for s in payload["specs"]]
    return CoTrainModel(specs, payload["num_classes"], mode=payload["mode"],
                        fusion=FusionConfig(**payload["fusion"]))


def load_run(run: str | Path) -> tuple[CoTrainModel, dict]:
    """The trained model of RUN and its checkpoint payload."""
    path = Path(run) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train first with `cotrain train --out {run}`, "
                                "or point --run at a finished run directory")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model = build_run_model(payload)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


@torch.no_grad()
def score_branches(model: CoTrainModel, loader: BaseLoader, *, branches: list[str] | None = None,
                   prepare=lambda batch: batch) -> dict[str, dict]:
    """Accuracy of each branch over one pass of `loader`. A unimodal branch sees only its own input."""
    was_training = model.training
    model.eval()
    branches = branches or model.branches
    correct, seen = dict.fromkeys(branches, 0), dict.fromkeys(branches, 0)
    for batch in loader:
        batch = prepare(batch)
        logits = model(batch.inputs, batch.present)
        for branch in branches:
            mask = batch.present[branch] if branch != TEACHER else torch.ones_like(batch.labels, dtype=torch.bool)
            correct[branch] += int(((logits[branch].float().argmax(-1) == batch.labels) & mask).sum())
            seen[branch] += int(mask.sum())
    model.train(was_training)
    return {b: {"accuracy": correct[b] / max(seen[b], 1), "samples": seen[b]} for b in branches}


def _best_weights(run: Path, branch: str) -> Path:
    return run / BEST_DIR / f"{branch}.pt"


def evaluate_run(run: str | Path, *, split: str = "test", shards: str | None = None, which: str = "best") -> dict:
    """Score RUN on `split` and write RUN/eval-<split>.json. With which='best', each branch is scored
    with the weights of its own best validation epoch (a student's best epoch may differ from the
    teacher's); 'last' scores the final weights."""
    run = Path(run)
    model, payload = load_run(run)
    info = load_dataset_info(shards or payload["config"]["shards"])
    loader = make_loader(info, split, LoaderConfig(**payload["config"]["loader"]),
                         modalities=[s["name"] for s in payload["specs"]], training=False)
    # branches that share weights (all of them with which='last') are scored in one pass
    sources: dict[Path | None, list[str]] = {}
    for branch in model.branches:
        best = _best_weights(run, branch)
        sources.setdefault(best if which == "best" and best.is_file() else None, []).append(branch)
    scores = {}
    for source, branches in sources.items():
        state = payload["state_dict"] if source is None else torch.load(source, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        scores.update(score_branches(model, loader, branches=branches))
    scores = {b: scores[b] for b in model.branches}
    result = {"split": split, "mode": payload["mode"], "which": which, "branches": scores}
    (run / f"eval-{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_scores(result: dict) -> str:
    """A plain-text table, one row per branch."""
    lines = [f"{'branch':<14} {'accuracy':>9} {'samples':>8}"]
    for branch, score in result["branches"].items():
        lines.append(f"{branch:<14} {score['accuracy']:>9.4f} {score['samples']:>8}")
    return "\n".join(lines)


def teacher_warning(result: dict) -> str | None:
    """Transfer only helps when the teacher is the strongest branch: say so when it is not."""
    branches = result["branches"]
    if TEACHER not in branches or len(branches) < 2:
        return None
    teacher = branches[TEACHER]["accuracy"]
    stronger = [b for b, s in branches.items() if b != TEACHER and s["accuracy"] > teacher]
    if not stronger:
        return None
    return (f"warning: on {result['split']}, student(s) {', '.join(stronger)} beat the multimodal teacher "
            f"({teacher:.3f}); transfer from a weaker teacher hurts students: give the teacher more capacity "
            "or train longer, or lower --alpha")


def print_warning(result: dict) -> None:
    message = teacher_warning(result)
    if message:
        print(message, file=sys.stderr)

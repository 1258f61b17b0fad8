"""The teacher assembled from its parts' best epochs (fusion.assemble).

A late-fusion teacher is the product of its streams plus w times its Transformer. Scored at one epoch for all,
each stream is somewhere past or short of its own best, while late fusion of the unimodal baselines takes each
baseline at its best epoch: on eval-30 the streams at the teacher's best epoch trailed their baselines by 1.7
and 2.4 points, and the teacher fell 4.1 below late fusion. So training keeps each part's weights from its own
best validation epoch, and at the end scores the assembly on validation under every w:

    best/multimodal.pt + each stream's own weights ── one pass ─> the streams ── late fusion ──────┐
    best/multimodal/transformer.pt ────────────────── one pass ─> the Transformer ─ + w * log p ──┴─> teacher

Where the assembly beats the single-epoch teacher on validation, best/assembly.json says so (with w and each
part's epoch) and `cotrain eval` scores the teacher this way. A stream's file holds only its own weights (its
modality's shared stages, the teacher's stages for it, its head): streams share none, so one pass serves all.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from model.cotrain import TRANSFORMER, CoTrainModel, combine_teacher

from .late_fusion import fuse_runs
from .scores import is_better, make_scorer

__all__ = ["ASSEMBLY_FILE", "part_path", "save_part", "stream_parts", "part_outputs", "assembled_outputs",
           "score_outputs", "choose_assembly", "assemble_on_validation", "read_assembly"]

ASSEMBLY_FILE = "assembly.json"


def part_path(folder: Path, part: str) -> Path:
    """Where a part's best weights live: best/multimodal/<m>.pt, best/multimodal/transformer.pt."""
    return folder / f"{part}.pt"


def save_part(model: CoTrainModel, folder: Path, part: str, state: dict[str, torch.Tensor]) -> None:
    """Keep `state` as `part`'s best weights (a stream's own entries only; the whole model for the Transformer,
    whose tokens come from every stream)."""
    path = part_path(folder, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state if part == TRANSFORMER else model.stream_state(state, part), path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def stream_parts(model: CoTrainModel) -> list[str]:
    """The teacher's streams among its parts ("multimodal/<m>"): the experts its late fusion multiplies."""
    return [p for p in model.teacher_parts if p != TRANSFORMER]


def part_outputs(model: CoTrainModel, loader, folder: Path, base: dict[str, torch.Tensor] | None = None,
                 **scoring) -> dict:
    """Each sample's outputs from every teacher part at its best epoch: key -> {"key", "label", "outputs":
    {part: list}} (a stream only where the sample has its modality). The streams' own weights are laid over
    `base` (any full state of the model; None: the model's own); `scoring` goes to score_branches."""
    from .evaluate import score_branches

    streams = stream_parts(model)
    rows: dict = {}
    if base is not None:
        model.load_state_dict(base)
    for stream in streams:
        model.load_state_dict(_load(part_path(folder, stream)), strict=False)
    score_branches(model, loader, branches=streams, predictions=rows, **scoring)
    model.load_state_dict(_load(part_path(folder, TRANSFORMER)))
    score_branches(model, loader, branches=[TRANSFORMER], predictions=rows, **scoring)
    return rows


def _fused_parts(rows: dict, streams: list[str],
                 task: str) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, late fusion of the streams (N, K), the Transformer's outputs (N, K), labels) from part_outputs' rows:
    what every Transformer weight shares. The streams fuse as late fusion of the baselines does (fuse_runs), each
    stream an expert that saw the samples with its modality."""
    experts = [{key: {"label": row["label"], "outputs": {stream: row["outputs"][stream]}}
                for key, row in rows.items() if stream in row["outputs"]} for stream in streams]
    keys, fused, labels, _ = fuse_runs(experts, task)
    transformer = torch.tensor([rows[k]["outputs"][TRANSFORMER] for k in keys], dtype=torch.float64)
    return keys, fused, transformer, labels


def assembled_outputs(rows: dict, streams: list[str], weight: float,
                      task: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(keys, the assembled teacher's outputs (N, K), labels) from part_outputs' rows, with Transformer weight w."""
    keys, fused, transformer, labels = _fused_parts(rows, streams, task)
    return keys, combine_teacher(fused, transformer, weight, task).float(), labels


def score_outputs(outputs: torch.Tensor, labels: torch.Tensor, task: str, size: int) -> dict:
    """The scores (ops/scores.py) of outputs over every sample."""
    scorer = make_scorer(task, size)
    scorer.update(outputs, labels, torch.ones(len(labels), dtype=torch.bool))
    return scorer.result()


def choose_assembly(rows: dict, streams: list[str], weights: tuple[float, ...], task: str,
                    size: int) -> tuple[float, dict]:
    """(w, score): the Transformer weight under which the assembled teacher scores best on these rows (the first
    of equals, as during training)."""
    _, fused, transformer, labels = _fused_parts(rows, streams, task)
    best = None
    for weight in weights:
        score = score_outputs(combine_teacher(fused, transformer, weight, task).float(), labels, task, size)
        if best is None or is_better(task, score, best[1]):
            best = (weight, score)
    return best


def assemble_on_validation(model: CoTrainModel, loader, folder: Path, *, part_epochs: dict[str, int], single: dict,
                           weights: tuple[float, ...], task: str, size: int, prepare) -> dict:
    """Score the assembly of the parts' best weights in `folder` on `loader` (validation) under every weight,
    compare it with `single` (the single best epoch's teacher score) and write best/assembly.json: {"used",
    "transformer_weight", "val", "single_epoch_val", "parts": {part: epoch}}."""
    rows = part_outputs(model, loader, folder, prepare=prepare, task=task, size=size)
    weight, score = choose_assembly(rows, stream_parts(model), weights, task, size)
    score = {k: v for k, v in score.items() if k != "confusion"}
    record = {"used": is_better(task, score, single), "transformer_weight": weight, "val": score,
              "single_epoch_val": single, "parts": part_epochs}
    (folder / ASSEMBLY_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_assembly(folder: Path) -> dict | None:
    """best/assembly.json where the assembled teacher won on validation and every part's weights are there;
    None otherwise (runs from before fusion.assemble, or where the single-epoch teacher scored higher)."""
    path = folder / ASSEMBLY_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    parts = [part_path(folder, p) for p in record.get("parts", {})]
    return record if record.get("used") and all(p.is_file() for p in parts) else None

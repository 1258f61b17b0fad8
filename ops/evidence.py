"""Accuracy by how clearly a sample shows each modality's class: where a student's errors can still be fixed.

A family corpus (shards/synth_family.py) records, per sample and modality, how visible the class signal was
(`shown.jsonl` beside the manifest: 0 = absent, 1 = full). Scoring each branch per visibility band separates
errors a better-trained student could fix (a faint signal it missed, a clear one it got wrong) from errors no
student can fix (its modality showed nothing; only another modality knew, so the teacher leads there and
transfer cannot pass that on). That tells a missed "the student gains" goal apart from a student already at
what its input allows.
"""
from __future__ import annotations

import json
from pathlib import Path

from .evaluate import read_predictions

__all__ = ["BANDS", "read_visibility", "accuracy_by_band", "band_table"]

BANDS = ((0.0, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.6), (0.6, 1.0))
"""Visibility bands; the family draws obscured signals in 0-0.3 and clear ones in 0.6-1."""


def read_visibility(corpus: Path) -> dict[str, dict[str, float]] | None:
    """key -> {modality: visibility} from CORPUS/shown.jsonl, None for a corpus without one (not a family)."""
    path = Path(corpus) / "shown.jsonl"
    if not path.is_file():
        return None
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    rows = [r for r in rows if all(isinstance(v, (int, float)) for k, v in r.items() if k != "key")]
    return {r["key"]: {k: float(v) for k, v in r.items() if k != "key"} for r in rows} or None


def _band(value: float) -> int:
    return next(i for i, (low, high) in enumerate(BANDS) if value < high or i == len(BANDS) - 1)


def accuracy_by_band(runs: list[Path], branches: list[str], modality: str, visibility: dict, split: str = "test"
                     ) -> dict[str, list[tuple[int, int]]]:
    """branch -> (correct, samples) per band of `modality`'s visibility, pooled over `runs` (seeds), for each of
    `branches`' argmax on `split` (class tasks); each run's predictions are read once."""
    counts = {branch: [[0, 0] for _ in BANDS] for branch in branches}
    for run in runs:
        for key, row in read_predictions(Path(run) / f"predictions-{split}.jsonl").items():
            if key not in visibility or modality not in visibility[key]:
                continue
            band = _band(visibility[key][modality])
            for branch in branches:
                outputs = row["outputs"].get(branch)
                if outputs is not None:
                    counts[branch][band][0] += int(max(range(len(outputs)), key=outputs.__getitem__) == row["label"])
                    counts[branch][band][1] += 1
    return {branch: [tuple(c) for c in per_band] for branch, per_band in counts.items()}


def band_table(rows: dict[str, dict[str, list[tuple[int, int]]]]) -> list[str]:
    """Markdown: one line per (modality, model), accuracy per visibility band with its sample count."""
    head = " | ".join(f"{low:g}-{high:g}" for low, high in BANDS)
    lines = [f"| modality shown (visibility) | model | {head} |", "| --- | --- |" + " ---: |" * len(BANDS)]
    for modality, models in rows.items():
        for model, counts in models.items():
            cells = " | ".join(f"{100 * c / n:.1f} ({n})" if n else "" for c, n in counts)
            lines.append(f"| {modality} | {model} | {cells} |")
    return lines

"""Rules that keep one odd label from silently changing the task (docs/formats.md, "Labels").

- A number with a fraction among integer class ids (scalar labels) is an error, not a switch to regression: one typo
  would otherwise turn a classification corpus into a regression one. `--label-type regression` says
  the integers are regression targets too.
- Class ids must be dense enough: the class count (largest id + 1) sizes every head and the confusion
  matrix, so one stray id of 100000 fails a run after a full epoch (an 80 GB matrix). A count above
  the declared classes, or far above the number of samples, is an error naming the line.
"""
from __future__ import annotations

__all__ = ["SPARSE_FACTOR", "SPARSE_FLOOR", "check_number_mix", "check_class_count"]

SPARSE_FACTOR = 10
"""More classes than this many times the samples is a stray id, not a corpus..."""
SPARSE_FLOOR = 1000
"""...once above this many classes (a small corpus may well leave some classes of a few hundred unseen)."""


def check_number_mix(shapes: list, label_type: str | None) -> None:
    """Refuse integer and fractional scalar labels mixed in one manifest, unless the type is given (vectors
    may hold whole numbers: [2, 3] beside [0.5, -1.0] stays a regression vector).

    `shapes` holds (shape, sample) pairs from shards.manifest (shape 'int', 'float', 'list-int', ...)."""
    from shards.manifest import ManifestError

    if label_type is not None:
        return
    first_whole = next((sample for shape, sample in shapes if shape == "int"), None)
    first_fraction = next((sample for shape, sample in shapes if shape == "float"), None)
    if first_whole is not None and first_fraction is not None:
        raise ManifestError(
            f"line {first_fraction.line}: label {first_fraction.label!r} is a number with a fraction, but "
            f"line {first_whole.line} has the integer label {first_whole.label!r}; fix that line if the "
            f"labels are class ids, or pass --label-type regression if they are all regression targets.")


def check_class_count(encoded: list, count: int, *, multilabel: bool, declared: int | None = None) -> None:
    """Refuse class ids beyond `declared` classes, or a class count far above the number of samples."""
    from shards.manifest import ManifestError

    limit = declared if declared is not None else max(SPARSE_FLOOR, SPARSE_FACTOR * len(encoded))
    if count <= limit:
        return
    ids = (lambda label: list(label)) if multilabel else (lambda label: [label])
    worst = max(encoded, key=lambda sample: max(ids(sample.label), default=-1))
    if declared is not None:
        raise ManifestError(f"line {worst.line}: class id {max(ids(worst.label))} is beyond the {declared} "
                            f"declared classes (ids 0 to {declared - 1}); fix the label or declare more classes.")
    raise ManifestError(
        f"line {worst.line}: class id {max(ids(worst.label))} makes {count} classes for {len(encoded)} samples "
        f"(more than {SPARSE_FACTOR} per sample); every head and the confusion matrix would have {count} "
        f"classes. Number the classes 0 to N-1 without large gaps, or use class names.")

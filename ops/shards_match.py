"""Whether a shard build can be scored by a trained run: `eval --shards` on another build must give the
model inputs of the shapes it was trained on and labels of its task, or it fails deep inside a batch (an
IndexError or a shape RuntimeError). The check names every difference instead."""
from __future__ import annotations

__all__ = ["shards_mismatches", "check_shards_match"]


def _label_mismatches(payload: dict, info) -> list[str]:
    from .evaluate import task_of

    trained_task = payload["config"].get("task", {}).get("type", "class")
    task, size = task_of(info)
    if task != trained_task:
        return [f"task: the run is {trained_task}, the shards are {task}"]
    if size != payload["num_classes"]:
        what = "target dimension" if task == "regression" else "classes"
        return [f"{what}: the run has {payload['num_classes']}, the shards {size}"]
    return []


def _modality_mismatches(payload: dict, info) -> list[str]:
    found = []
    for name, trained in payload["modalities"].items():
        stored = info.modalities.get(name)
        if stored is None:
            found.append(f"modality {name}: the run reads it, the shards lack it (they hold "
                         f"{', '.join(info.modalities) or 'none'})")
            continue
        for key in sorted(set(trained) | set(stored)):
            if trained.get(key) != stored.get(key):
                found.append(f"{name}.{key}: the run's {trained.get(key)!r}, the shards' {stored.get(key)!r}")
    return found


def shards_mismatches(payload: dict, info) -> list[str]:
    """Every difference between what the run (its model.pt payload) was trained on and the shards `info`."""
    return _label_mismatches(payload, info) + _modality_mismatches(payload, info)


def check_shards_match(payload: dict, info) -> None:
    found = shards_mismatches(payload, info)
    if found:
        raise ValueError(f"the shards in {info.root} do not match what the run was trained on: {'; '.join(found)}. "
                         "Evaluate on shards built with the same modalities, options and labels (or leave out "
                         "--shards to use the run's own)")

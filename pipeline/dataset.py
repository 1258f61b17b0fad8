"""The shard directory as the loader sees it: `dataset.json` read once, paths resolved."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DatasetInfo", "load_dataset_info"]


@dataclass(frozen=True)
class DatasetInfo:
    """What `cotrain shards build` wrote: modalities, classes, and shards per split."""

    root: Path
    modalities: dict[str, dict]
    num_classes: int
    splits: dict[str, dict]

    def shard_paths(self, split: str) -> tuple[list[str], list[str]]:
        """(tar paths, DALI index paths) of one split, in stored order."""
        if split not in self.splits:
            raise ValueError(f"split {split!r} is not in {self.root / 'dataset.json'}; "
                             f"it has: {', '.join(sorted(self.splits))}")
        shards = self.splits[split]["shards"]
        return [str(self.root / s["tar"]) for s in shards], [str(self.root / s["index"]) for s in shards]

    def samples(self, split: str) -> int:
        return int(self.splits[split]["samples"]) if split in self.splits else 0

    def select(self, names: list[str] | None) -> dict[str, dict]:
        """The modalities to load, in dataset order; unknown names list the valid ones."""
        if not names:
            return dict(self.modalities)
        unknown = [n for n in names if n not in self.modalities]
        if unknown:
            raise ValueError(f"modalities {unknown} are not in {self.root / 'dataset.json'}; "
                             f"valid: {', '.join(self.modalities)}")
        return {n: self.modalities[n] for n in self.modalities if n in names}


def load_dataset_info(root: str | Path) -> DatasetInfo:
    """Read DIR/dataset.json; a missing file means the build never finished."""
    root = Path(root)
    path = root / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: point --shards at a directory written by `cotrain shards build` "
            "(dataset.json is written last, so its absence also means an unfinished build)"
        )
    meta = json.loads(path.read_text())
    return DatasetInfo(root=root, modalities=meta["modalities"], num_classes=int(meta["label"]["num_classes"]),
                       splits=meta["splits"])

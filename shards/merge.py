"""Join the parts of a build made with `--part I/N` on several machines into one shard directory."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from shards.build import BuildError, _ordered_splits, _remove_stale_shards, _write_json_atomically, write_shard_index
from shards.writer import ShardRecord
from shards.writer import STATS_SUFFIX, shard_name

__all__ = ["merge_parts"]


def merge_parts(parts: list[Path | str], *, out: Path | str) -> dict:
    """Copy every part's shards into `out` with contiguous numbers per split (part 0's first), and write one
    dataset.json, shardindex.json, rejects.jsonl and tokenizer.json. Returns the merged dataset.json."""
    descriptions = _check_parts([Path(part) for part in parts])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").unlink(missing_ok=True)
    ordered = [part for _, part in sorted((d["part"]["index"], (folder, d)) for folder, d in descriptions)]
    splits = _ordered_splits(dict.fromkeys(split for _, d in ordered for split in d["splits"]))
    merged_splits = {split: _merge_split(split, ordered, out) for split in splits}
    _concatenate([folder / "rejects.jsonl" for folder, _ in ordered], out / "rejects.jsonl")
    if (ordered[0][0] / "tokenizer.json").exists():
        shutil.copyfile(ordered[0][0] / "tokenizer.json", out / "tokenizer.json")
    first = ordered[0][1]
    description = {key: value for key, value in first.items() if key not in ("part", "splits", "rejects")}
    description.update(splits=merged_splits, rejects=sum(d["rejects"] for _, d in ordered))
    _remove_stale_shards(out, {split: [ShardRecord(**shard) for shard in content["shards"]]
                               for split, content in merged_splits.items()})
    write_shard_index(out, description)
    _write_json_atomically(out / "dataset.json", description)
    return description


def _check_parts(folders: list[Path]) -> list[tuple[Path, dict]]:
    """Every part of one build (same options hash and N), each index exactly once, each build finished."""
    descriptions = []
    for folder in folders:
        path = folder / "dataset.json"
        if not path.exists():
            raise BuildError(f"{folder}: no dataset.json; finish that part's build (with --resume) first.")
        description = json.loads(path.read_text(encoding="utf-8"))
        if "part" not in description:
            raise BuildError(f"{folder}: not a part (built without --part I/N); only parts can be merged.")
        descriptions.append((folder, description))
    first = descriptions[0][1]["part"]
    for folder, description in descriptions:
        if description["part"]["options"] != first["options"] or description["part"]["count"] != first["count"]:
            raise BuildError(f"{folder}: built from another manifest or with other options than {folders[0]}; "
                             f"build every part with the same manifest and options.")
    indices = sorted(d["part"]["index"] for _, d in descriptions)
    if indices != list(range(first["count"])):
        missing = sorted(set(range(first["count"])) - set(indices))
        raise BuildError(f"parts {indices} of {first['count']} given; each part 0..{first['count'] - 1} is needed "
                         f"exactly once (missing: {missing or 'none'}, repeated: "
                         f"{sorted({i for i in indices if indices.count(i) > 1}) or 'none'}).")
    return descriptions


def _merge_split(split: str, ordered: list[tuple[Path, dict]], out: Path) -> dict:
    shards = []
    for folder, description in ordered:
        for shard in description["splits"].get(split, {"shards": []})["shards"]:
            number = len(shards)
            renamed = dict(shard, tar=shard_name(split, number, "tar"), index=shard_name(split, number, "idx"))
            _copy(folder / shard["tar"], out / renamed["tar"])
            _copy(folder / shard["index"], out / renamed["index"])  # offsets do not depend on the tar's name
            _copy_stats(folder / shard["tar"].replace(".tar", "." + STATS_SUFFIX),
                        out / shard_name(split, number, STATS_SUFFIX), renamed)
            shards.append(renamed)
    return {"samples": sum(shard["samples"] for shard in shards), "shards": shards}


def _copy(source: Path, target: Path) -> None:
    temporary = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def _copy_stats(source: Path, target: Path, renamed: dict) -> None:
    stats = json.loads(source.read_text(encoding="utf-8")) if source.exists() else {}
    stats.update(tar=renamed["tar"], index=renamed["index"])
    target.write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")


def _concatenate(sources: list[Path], target: Path) -> None:
    with open(target, "w", encoding="utf-8") as merged:
        for source in sources:
            if source.exists():
                merged.write(source.read_text(encoding="utf-8"))

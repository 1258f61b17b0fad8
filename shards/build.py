"""Build a shard directory from a manifest: validate, tokenize, convert in parallel, write shards, describe."""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from tqdm import tqdm

from shards.manifest import Manifest, ManifestSample, read_manifest
from shards.tokenizer import train_tokenizer
from shards.transcode import (
    VIDEO_CODECS,
    TranscodeError,
    encode_text,
    read_text,
    transcode_audio,
    transcode_video,
    video_extension,
)
from shards.writer import ShardRecord, ShardWriter

__all__ = ["BuildError", "ConversionSettings", "SampleResult", "build_shards", "convert_sample",
           "shuffle_within_splits"]

FORMAT_NAME, FORMAT_VERSION = "cotrain-shards", 1
CONVENTIONAL_SPLITS = ("train", "val", "test")
SHARD_FILE_PATTERN = re.compile(r"[A-Za-z0-9_-]+-\d{6}\.(tar|idx)(\.tmp)?")


class BuildError(ValueError):
    """A build option out of range; the message names the option, its value and the fix."""


@dataclass(frozen=True)
class ConversionSettings:
    """Everything a worker needs to turn one manifest sample into shard members."""

    fps: float
    frames: int
    height: int
    width: int
    codec: str
    sample_rate: int
    samples: int
    max_tokens: int

    def __post_init__(self) -> None:
        if self.codec not in VIDEO_CODECS:
            raise BuildError(f"codec {self.codec!r} is unknown; use one of {', '.join(VIDEO_CODECS)}.")
        for name in ("fps", "frames", "sample_rate", "samples", "max_tokens"):
            if getattr(self, name) <= 0:
                raise BuildError(f"{name} is {getattr(self, name)}; it must be greater than 0.")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 2 or value % 2:
                raise BuildError(f"{name} is {value}; use an even size >= 2 (4:2:0 chroma needs even frame sizes).")


@dataclass(frozen=True)
class SampleResult:
    """A converted sample: its members in write order, or the reject line that replaces it."""

    key: str
    members: dict[str, bytes] | None = None
    reject: dict | None = None


def build_shards(manifest_path: Path | str, *, out: Path | str, modality_kinds: dict[str, str] | None = None,
                 fps: float = 8, frames: int = 8, height: int = 32, width: int = 32, codec: str = "vp9",
                 sample_rate: int = 16000, audio_seconds: float = 1.0, max_tokens: int = 16,
                 max_shard_samples: int = 1000, seed: int = 0, workers: int = 2) -> dict:
    """Convert the manifest's samples into `out` (see docs/formats.md) and return dataset.json's content."""
    settings = ConversionSettings(fps=fps, frames=frames, height=height, width=width, codec=codec,
                                  sample_rate=sample_rate, samples=round(sample_rate * audio_seconds),
                                  max_tokens=max_tokens)
    _check_counts(max_shard_samples=max_shard_samples, workers=workers)
    manifest = read_manifest(manifest_path, modality_kinds=modality_kinds)
    # At this point the manifest is structurally valid: no work was done before, all of it comes after.
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # dataset.json is the "done" marker: remove it first so a crashed rebuild never looks finished.
    (out / "dataset.json").unlink(missing_ok=True)
    tokenizer = _save_tokenizer(manifest, out, max_tokens=max_tokens)
    ordered = shuffle_within_splits(manifest.samples, seed=seed)
    records, rejects = _convert_and_write(ordered, manifest.kinds, settings, tokenizer, out=out,
                                          max_shard_samples=max_shard_samples, workers=workers)
    _remove_stale_shards(out, records)
    description = _describe(manifest, settings, tokenizer, records, rejects=rejects, seed=seed)
    _write_json_atomically(out / "dataset.json", description)
    return description


def _check_counts(*, max_shard_samples: int, workers: int) -> None:
    if max_shard_samples < 1:
        raise BuildError(f"max_shard_samples is {max_shard_samples}; use 1 or more.")
    if workers < 1:
        raise BuildError(f"workers is {workers}; use 1 or more.")


def _save_tokenizer(manifest: Manifest, out: Path, *, max_tokens: int) -> Tokenizer | None:
    """Train on the train split's texts (all texts if there is no `train` split); save tokenizer.json."""
    text_names = [name for name, kind in manifest.kinds.items() if kind == "text"]
    if not text_names:
        (out / "tokenizer.json").unlink(missing_ok=True)  # an earlier build's tokenizer would mislead
        return None
    has_train = any(sample.split == "train" for sample in manifest.samples)
    texts = [text for sample in manifest.samples if sample.split == "train" or not has_train
             for text in _readable_texts(sample, text_names)]
    tokenizer = train_tokenizer(texts, max_tokens=max_tokens)
    tokenizer.save(str(out / "tokenizer.json"))
    return tokenizer


def _readable_texts(sample: ManifestSample, text_names: list[str]) -> list[str]:
    """The sample's texts; an unreadable .txt file is skipped here and rejected during conversion."""
    texts = []
    for name in text_names:
        if name in sample.values:
            try:
                texts.append(read_text(sample.values[name]))
            except TranscodeError:
                pass
    return texts


def shuffle_within_splits(samples: list[ManifestSample], *, seed: int) -> list[ManifestSample]:
    """Samples grouped by split (conventional splits first), each split shuffled with `seed`.

    DALI shuffles only inside a buffer and reads tars in stored order, so a label-sorted manifest
    must be shuffled here. Each split's order depends only on (seed, split name).
    """
    by_split: dict[str, list[ManifestSample]] = {}
    for sample in samples:
        by_split.setdefault(sample.split, []).append(sample)
    ordered = []
    for split in _ordered_splits(by_split):
        group = list(by_split[split])
        random.Random(f"{seed}:{split}").shuffle(group)
        ordered.extend(group)
    return ordered


def _ordered_splits(splits) -> list[str]:
    """train, val, test first, then other splits in order of first appearance."""
    names = list(splits)
    rank = {name: index for index, name in enumerate(CONVENTIONAL_SPLITS)}
    return sorted(names, key=lambda name: (rank.get(name, len(rank)), names.index(name)))


def _convert_and_write(ordered: list[ManifestSample], kinds: dict[str, str], settings: ConversionSettings,
                       tokenizer: Tokenizer | None, *, out: Path, max_shard_samples: int,
                       workers: int) -> tuple[dict[str, list[ShardRecord]], int]:
    """Convert in a pool (order kept) and stream each split's samples into its shards."""
    split_sizes = Counter(sample.split for sample in ordered)  # first-seen order = write order
    records, rejects = {}, 0
    with _conversion_pool(workers, kinds, settings, tokenizer) as pool, \
            open(out / "rejects.jsonl", "w", encoding="utf-8") as rejects_file, \
            tqdm(total=len(ordered), unit="sample", desc="converting", file=sys.stderr,
                 mininterval=1.0) as progress:
        results = pool.imap(_convert_in_worker, ordered)
        for split, size in split_sizes.items():
            with ShardWriter(out, prefix=split, max_samples=max_shard_samples) as writer:
                for result in itertools.islice(results, size):
                    progress.update()
                    rejects += _store(result, writer, rejects_file)
            records[split] = writer.records
    return records, rejects


def _store(result: SampleResult, writer: ShardWriter, rejects_file) -> int:
    """Write the sample into its shard, or only its reject line beside the shards; return 1 for a reject."""
    if result.reject is not None:
        rejects_file.write(json.dumps(result.reject) + "\n")
        return 1
    writer.write(result.key, result.members)
    return 0


def _conversion_pool(workers: int, kinds: dict[str, str], settings: ConversionSettings,
                     tokenizer: Tokenizer | None):
    """A pool whose workers each hold the kinds, settings and tokenizer.

    forkserver, not fork: callers may hold threads (torch, DALI), and forking a threaded process can
    deadlock the child.
    """
    tokenizer_json = tokenizer.to_str() if tokenizer is not None else None
    return multiprocessing.get_context("forkserver").Pool(
        workers, initializer=_start_worker, initargs=(kinds, settings, tokenizer_json))


_worker_context: dict = {}


def _start_worker(kinds: dict[str, str], settings: ConversionSettings, tokenizer_json: str | None) -> None:
    """Pool initializer: build the tokenizer once per worker instead of pickling it per sample."""
    tokenizer = Tokenizer.from_str(tokenizer_json) if tokenizer_json is not None else None
    _worker_context.update(kinds=kinds, settings=settings, tokenizer=tokenizer)


def _convert_in_worker(sample: ManifestSample) -> SampleResult:
    return convert_sample(sample, **_worker_context)


def convert_sample(sample: ManifestSample, *, kinds: dict[str, str], settings: ConversionSettings,
                   tokenizer: Tokenizer | None) -> SampleResult:
    """All members of one sample (`<name>.json` first), or a reject naming the failing modality."""
    present = [name for name in kinds if name in sample.values]
    if not present:
        return _reject(sample, None, "the sample has no modality; give it at least one non-null field")
    members = {"json": json.dumps({"key": sample.key, "split": sample.split, "label": sample.label,
                                   "present": present}).encode("utf-8")}
    for name in present:
        try:
            members.update(_modality_members(name, kinds[name], sample.values[name], settings, tokenizer))
        except TranscodeError as error:
            return _reject(sample, name, error.reason)
    return SampleResult(key=sample.key, members=members)


def _modality_members(name: str, kind: str, value: Path | str, settings: ConversionSettings,
                      tokenizer: Tokenizer | None) -> dict[str, bytes]:
    if kind == "video":
        video = transcode_video(value, fps=settings.fps, frames=settings.frames, height=settings.height,
                                width=settings.width, codec=settings.codec)
        return {f"{name}.{video_extension(settings.codec)}": video}
    if kind == "audio":
        return {f"{name}.wav": transcode_audio(value, sample_rate=settings.sample_rate,
                                               samples=settings.samples)}
    text, ids = encode_text(read_text(value), tokenizer=tokenizer, max_tokens=settings.max_tokens)
    return {f"{name}.txt": text, f"{name}.ids": ids}


def _reject(sample: ManifestSample, modality: str | None, reason: str) -> SampleResult:
    return SampleResult(key=sample.key, reject={"key": sample.key, "line": sample.line, "modality": modality,
                                                "reason": reason})


def _remove_stale_shards(out: Path, records: dict[str, list[ShardRecord]]) -> None:
    """Delete shard files an earlier build left behind, so globs and brace patterns see only this build."""
    current = {name for shards in records.values() for record in shards for name in (record.tar, record.index)}
    for path in out.iterdir():
        if SHARD_FILE_PATTERN.fullmatch(path.name) and path.name not in current:
            path.unlink()


def _describe(manifest: Manifest, settings: ConversionSettings, tokenizer: Tokenizer | None,
              records: dict[str, list[ShardRecord]], *, rejects: int, seed: int) -> dict:
    """The dataset.json content (docs/formats.md)."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "seed": seed,
        "label": {"type": "class", "num_classes": max(sample.label for sample in manifest.samples) + 1},
        "modalities": {name: _describe_modality(name, kind, settings, tokenizer)
                       for name, kind in manifest.kinds.items()},
        "splits": {split: {"samples": sum(record.samples for record in shards),
                           "shards": [record.as_dict() for record in shards]}
                   for split, shards in records.items()},
        "rejects": rejects,
    }


def _describe_modality(name: str, kind: str, settings: ConversionSettings, tokenizer: Tokenizer | None) -> dict:
    if kind == "video":
        return {"kind": kind, "ext": f"{name}.{video_extension(settings.codec)}", "codec": settings.codec,
                "fps": settings.fps, "frames": settings.frames, "height": settings.height,
                "width": settings.width}
    if kind == "audio":
        return {"kind": kind, "ext": f"{name}.wav", "sample_rate": settings.sample_rate,
                "samples": settings.samples}
    return {"kind": kind, "ext": f"{name}.ids", "text_ext": f"{name}.txt", "max_tokens": settings.max_tokens,
            "vocab_size": tokenizer.get_vocab_size(), "tokenizer": "tokenizer.json"}


def _write_json_atomically(path: Path, content: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)

"""Read and validate a corpus manifest (JSON Lines) before any conversion work starts."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "AUDIO_EXTENSIONS",
    "KINDS",
    "Manifest",
    "ManifestError",
    "ManifestSample",
    "VIDEO_EXTENSIONS",
    "infer_kind",
    "read_manifest",
]

KINDS = ("video", "audio", "text")
VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac", ".opus"})
RESERVED_FIELDS = ("key", "split", "label")

# Keys and splits end up in tar member names, DALI's whitespace-delimited index and shard file names:
# dots, spaces and slashes silently corrupt samples there.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
MODALITY_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class ManifestError(ValueError):
    """A structural problem in the manifest or in --modality; the message names the line and the fix."""


@dataclass(frozen=True)
class ManifestSample:
    """One manifest line: present modalities map to a file Path or, for inline text, the text itself."""

    key: str
    split: str
    label: int
    line: int
    values: dict[str, Path | str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """All samples of a manifest and the kind (video, audio, text) of each modality, in first-seen order."""

    path: Path
    samples: list[ManifestSample]
    kinds: dict[str, str]


def infer_kind(value: str) -> str:
    """The modality kind a value implies: video or audio by file extension, otherwise text."""
    suffix = os.path.splitext(value)[1].lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in AUDIO_EXTENSIONS:
        return "audio"
    return "text"


def read_manifest(path: Path | str, *, modality_kinds: dict[str, str] | None = None) -> Manifest:
    """Parse and validate `path`; raise ManifestError on the first structural problem.

    Missing media files are not structural: they become per-sample rejects during conversion.
    """
    path = Path(path)
    forced_kinds = _check_forced_kinds(modality_kinds or {})
    records = list(_read_json_lines(path))
    if not records:
        raise ManifestError(f"{path}: the manifest has no samples; add one JSON object per line.")
    kinds = _decide_kinds(records, forced_kinds)
    _check_forced_names_exist(forced_kinds, kinds)
    samples = [_build_sample(line, record, kinds, path.parent) for line, record in records]
    _check_unique_keys(samples)
    return Manifest(path=path, samples=samples, kinds=kinds)


def _check_forced_kinds(modality_kinds: dict[str, str]) -> dict[str, str]:
    for name, kind in modality_kinds.items():
        if kind not in KINDS:
            raise ManifestError(
                f"--modality {name}={kind}: unknown kind {kind!r}; use one of {', '.join(KINDS)}."
            )
        _check_modality_name(name, where=f"--modality {name}={kind}")
    return dict(modality_kinds)


def _check_forced_names_exist(forced_kinds: dict[str, str], kinds: dict[str, str]) -> None:
    for name in forced_kinds:
        if name not in kinds:
            raise ManifestError(
                f"--modality {name}={forced_kinds[name]}: no manifest line has a field {name!r}; "
                f"check the spelling (modalities found: {', '.join(kinds) or 'none'})."
            )


def _read_json_lines(path: Path):
    """Yield (line number, object) for each non-blank line."""
    with open(path, encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise ManifestError(
                    f"line {number}: not valid JSON ({error.msg}); write one JSON object per line."
                ) from None
            if not isinstance(record, dict):
                raise ManifestError(
                    f"line {number}: expected a JSON object, got {type(record).__name__}; write one "
                    f"object per line, e.g. {{\"key\": ..., \"split\": ..., \"label\": ...}}."
                )
            yield number, record


def _decide_kinds(records: list[tuple[int, dict]], forced_kinds: dict[str, str]) -> dict[str, str]:
    """Fix each modality's kind: --modality wins, else the first non-null value decides."""
    kinds: dict[str, str] = {}
    decided_at: dict[str, int] = {}
    for line, record in records:
        for name, value in record.items():
            if name in RESERVED_FIELDS:
                continue
            _check_modality_name(name, where=f"line {line}")
            if name in forced_kinds:
                kinds.setdefault(name, forced_kinds[name])
            elif value is not None:
                _check_value_type(name, value, line)
                _check_consistent_kind(name, infer_kind(value), kinds, decided_at, line)
                decided_at.setdefault(name, line)
                kinds.setdefault(name, infer_kind(value))
    return kinds


def _check_consistent_kind(name: str, kind: str, kinds: dict, decided_at: dict, line: int) -> None:
    if name in kinds and kinds[name] != kind:
        raise ManifestError(
            f"line {line}: field {name!r} looks like {kind}, but line {decided_at[name]} made it "
            f"{kinds[name]}; a modality has one kind per manifest. Fix the value, or pass "
            f"--modality {name}=KIND to fix the kind explicitly."
        )


def _check_modality_name(name: str, *, where: str) -> None:
    if not MODALITY_PATTERN.fullmatch(name):
        raise ManifestError(
            f"{where}: modality name {name!r} is invalid; use a letter followed by letters, digits "
            f"or '_' (it becomes part of tar member names)."
        )


def _check_value_type(name: str, value: object, line: int) -> None:
    if not isinstance(value, str):
        raise ManifestError(
            f"line {line}: field {name!r} is {type(value).__name__} {value!r}; a modality is a path, "
            f"inline text or null."
        )


def _build_sample(line: int, record: dict, kinds: dict[str, str], root: Path) -> ManifestSample:
    key, split, label = _required_fields(line, record)
    values = {}
    for name, kind in kinds.items():
        value = record.get(name)
        if value is not None:
            _check_value_type(name, value, line)
            values[name] = _resolve_value(value, kind, line, name, root)
    return ManifestSample(key=key, split=split, label=label, line=line, values=values)


def _required_fields(line: int, record: dict) -> tuple[str, str, int]:
    for name in RESERVED_FIELDS:
        if name not in record:
            raise ManifestError(f"line {line}: missing {name!r}; every line needs key, split and label.")
    key, split, label = (record[name] for name in RESERVED_FIELDS)
    for name, value in (("key", key), ("split", split)):
        if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
            raise ManifestError(
                f"line {line}: {name} {value!r} is invalid; use only letters, digits, '_' and '-' "
                f"(dots, spaces and slashes corrupt WebDataset samples and shard names)."
            )
    # bool is an int subclass in Python, but `true` is not a class label.
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ManifestError(f"line {line}: label {label!r} is invalid; use an integer class >= 0.")
    return key, split, label


def _resolve_value(value: str, kind: str, line: int, name: str, root: Path) -> Path | str:
    """Media and .txt values become paths under the manifest's folder; other text stays inline."""
    if kind == "text" and not value.lower().endswith(".txt"):
        return value
    if os.path.isabs(value):
        return Path(value)
    # normpath (not resolve) so that symlinked data folders inside the corpus stay allowed.
    root_dir = os.path.normpath(os.path.abspath(root))
    resolved = os.path.normpath(os.path.join(root_dir, value))
    if os.path.commonpath([resolved, root_dir]) != root_dir:
        raise ManifestError(
            f"line {line}: field {name!r} path {value!r} escapes the manifest's folder; use a path "
            f"inside {root} or an absolute path."
        )
    return Path(resolved)


def _check_unique_keys(samples: list[ManifestSample]) -> None:
    first_line: dict[str, int] = {}
    for sample in samples:
        if sample.key in first_line:
            raise ManifestError(
                f"line {sample.line}: duplicate key {sample.key!r} (first on line "
                f"{first_line[sample.key]}); keys must be unique."
            )
        first_line[sample.key] = sample.line

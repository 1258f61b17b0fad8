"""Read and validate a corpus manifest (JSON Lines or CSV) before any conversion work starts."""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from shards.label_rules import check_class_count, check_number_mix

__all__ = [
    "AUDIO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "LABEL_TYPES",
    "KINDS",
    "Manifest",
    "ManifestError",
    "ManifestSample",
    "FrameRange",
    "VIDEO_EXTENSIONS",
    "infer_kind",
    "read_manifest",
]

KINDS = ("video", "audio", "text", "depth", "features")
LABEL_TYPES = ("class", "regression", "multilabel")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac", ".opus"})
RESERVED_FIELDS = ("key", "split", "label")

# Keys and splits end up in tar member names, DALI's whitespace-delimited index and shard file names:
# dots, spaces and slashes silently corrupt samples there.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
MODALITY_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


RANGE_SUFFIX = re.compile(r"@(\d+)-(\d+)$")


@dataclass(frozen=True)
class FrameRange:
    """A video file or image sequence restricted to frames `start`..`end` (1-based, inclusive), written
    `path@START-END` in a manifest (EgoGesture and NVGesture annotate gestures as frame ranges)."""

    path: Path
    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.path}@{self.start}-{self.end}"


class ManifestError(ValueError):
    """A structural problem in the manifest or in --modality; the message names the line and the fix."""


@dataclass(frozen=True)
class ManifestSample:
    """One manifest line: present modalities map to a file Path or, for inline text, the text itself."""

    key: str
    split: str
    label: int | float | list  # class id, regression value(s) or multi-label ids (see Manifest.label)
    line: int
    values: dict[str, Path | str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """All samples of a manifest, the kind of each modality (first-seen order) and the label description.

    `label` is dataset.json's "label" object (docs/formats.md), e.g. {"type": "class", "num_classes": 6,
    "names": None}.
    """

    path: Path
    samples: list[ManifestSample]
    kinds: dict[str, str]
    label: dict = field(default_factory=dict)


def infer_kind(value: str, name: str = "") -> str:
    """The modality kind a value (of the field `name`) implies.

    A video file or a folder (`dir/`) or glob pattern of images (`dir/*.png`), optionally with a frame
    range `@START-END`, is video, or depth when the field's name contains "depth"; a video file in a field
    whose name contains "audio" is audio (its audio track). Otherwise: audio by extension, features for
    `.npy`, text for anything else. `--modality NAME=KIND` overrides all of this.
    """
    value = RANGE_SUFFIX.sub("", value)
    suffix = os.path.splitext(value)[1].lower()
    images = value.endswith("/") or (any(c in value for c in "*?[") and suffix in IMAGE_EXTENSIONS)
    if images or suffix in VIDEO_EXTENSIONS:
        if "depth" in name.lower():
            return "depth"
        return "audio" if "audio" in name.lower() and not images else "video"
    if suffix == ".npy":
        return "features"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in AUDIO_EXTENSIONS:
        return "audio"
    return "text"


def read_manifest(path: Path | str, *, modality_kinds: dict[str, str] | None = None,
                  label_type: str | None = None) -> Manifest:
    """Parse and validate `path` (`.csv` is CSV, anything else JSON Lines); raise ManifestError on the
    first structural problem. `label_type` fixes the label type instead of inferring it.

    Missing media files are not structural: they become per-sample rejects during conversion.
    """
    path = Path(path)
    forced_kinds = _check_forced_kinds(modality_kinds or {})
    if label_type is not None and label_type not in LABEL_TYPES:
        raise ManifestError(f"--label-type {label_type}: unknown; use one of {', '.join(LABEL_TYPES)}.")
    records = list(_read_csv(path) if path.suffix.lower() == ".csv" else _read_json_lines(path))
    classes, records = _declared_classes(records)
    if not records:
        raise ManifestError(f"{path}: the manifest has no samples; add one JSON object per line.")
    kinds = _decide_kinds(records, forced_kinds)
    _check_forced_names_exist(forced_kinds, kinds)
    samples = [_build_sample(line, record, kinds, path.parent) for line, record in records]
    _check_unique_keys(samples)
    samples, label = encode_labels(samples, label_type=label_type, classes=classes)
    return Manifest(path=path, samples=samples, kinds=kinds, label=label)


def _declared_classes(records: list[tuple[int, dict]]) -> tuple[list[str] | int | None, list[tuple[int, dict]]]:
    """A first line `{"classes": ["name", ...]}` or `{"classes": N}` declares the classes; the rest are samples.

    The declaration fixes the class count and, for names, each name's id (its position), so a subset of
    the corpus that misses a class keeps the corpus's classes and ids.
    """
    if not records or set(records[0][1]) != {"classes"}:
        return None, records
    line, classes = records[0][0], records[0][1]["classes"]
    valid_count = isinstance(classes, int) and not isinstance(classes, bool) and classes >= 1
    valid_names = (isinstance(classes, list) and classes and all(isinstance(name, str) and name for name in classes)
                   and len(set(classes)) == len(classes))
    if not (valid_count or valid_names):
        raise ManifestError(f"line {line}: classes {classes!r} is invalid; declare the number of classes "
                            f'({{"classes": 83}}) or their distinct names in id order ({{"classes": ["neutral", '
                            f'"calm"]}}).')
    return classes, records[1:]


def _read_csv(path: Path):
    """Yield (line number, object) per CSV row; empty cells are null, labels parsed by `_csv_label`."""
    with open(path, encoding="utf-8-sig", newline="") as rows:  # -sig: spreadsheets write a BOM
        reader = csv.reader(rows)
        header = next(reader, None)
        if header is None:
            return
        header = [name.strip() for name in header]
        line = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):
                if len(row) != len(header):
                    raise ManifestError(f"line {line}: {len(row)} cells but the header (line 1) has "
                                        f"{len(header)}; quote cells that contain commas.")
                record = {name: (cell if cell != "" else None) for name, cell in zip(header, row)}
                if record.get("label") is not None:
                    record["label"] = _csv_label(record["label"])
                yield line, record
            line = reader.line_num + 1


def _csv_label(cell: str):
    """A CSV label cell: a JSON number or list (`3`, `0.5`, `[1, 4]`), otherwise a class name."""
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        return cell.strip()
    return value if isinstance(value, (int, float, list)) and not isinstance(value, bool) else cell.strip()


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
    with open(path, encoding="utf-8-sig") as lines:  # -sig: a byte-order mark is not part of line 1
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
                _check_consistent_kind(name, infer_kind(value, name), kinds, decided_at, line)
                decided_at.setdefault(name, line)
                kinds.setdefault(name, infer_kind(value, name))
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


def _required_fields(line: int, record: dict) -> tuple[str, str, object]:
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
    return key, split, label


def _resolve_value(value: str, kind: str, line: int, name: str, root: Path) -> Path | str | FrameRange:
    """Media and .txt values become paths under the manifest's folder; other text stays inline."""
    if kind == "text" and not value.lower().endswith(".txt"):
        return value
    frame_range = RANGE_SUFFIX.search(value) if kind in ("video", "depth") else None
    if frame_range:
        start, end = int(frame_range[1]), int(frame_range[2])
        if not 1 <= start <= end:
            raise ManifestError(f"line {line}: field {name!r} frame range @{start}-{end} is invalid; write "
                                f"@START-END with 1 <= START <= END (1-based, inclusive).")
        return FrameRange(_resolve_path(value[:frame_range.start()], line, name, root), start, end)
    return _resolve_path(value, line, name, root)


def _resolve_path(value: str, line: int, name: str, root: Path) -> Path:
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


# --- labels ---------------------------------------------------------------------------------------------

def _label_shape(label: object, line: int) -> str:
    """'int', 'float', 'name', 'list-int', 'list-float' or 'list-name'; anything else is an error."""
    # bool is an int subclass in Python, but `true` is not a label.
    if isinstance(label, bool) or label is None or isinstance(label, dict):
        raise ManifestError(f"line {line}: label {label!r} is invalid; use an integer class >= 0, a class "
                            f"name, a number (regression) or a list (multi-label ids/names or a vector).")
    if isinstance(label, list):
        if not label:
            return "list-int"  # a multi-label sample with no positive class
        shapes = {_label_shape(item, line) for item in label}
        if not shapes <= {"int", "float", "name"} or shapes == {"int", "name"} or shapes == {"float", "name"}:
            raise ManifestError(f"line {line}: label {label!r} is invalid; a list label holds only class "
                                f"ids, only class names or only numbers.")
        return "list-name" if "name" in shapes else ("list-float" if "float" in shapes else "list-int")
    if isinstance(label, str):
        return "name"
    if isinstance(label, float):
        return "float"
    if isinstance(label, int):
        return "int"
    raise ManifestError(f"line {line}: label {label!r} is invalid ({type(label).__name__}).")


# Which label shapes each type accepts; an inferred type is the first whose shapes cover the manifest.
ACCEPTED_SHAPES = {
    "class": ({"int"}, {"name"}),
    "multilabel": ({"list-int"}, {"list-name"}),
    "regression": ({"int", "float"}, {"list-int", "list-float"}),
}


def encode_labels(samples: list[ManifestSample], *, label_type: str | None = None,
                  classes: list[str] | int | None = None) -> tuple[list[ManifestSample], dict]:
    """Check every label against one label type and encode it (names -> ids); return the label spec.

    Inference: ints -> class; names -> class (ids in sorted-name order); any float -> regression;
    lists of ids or names -> multilabel; lists with a float -> regression vectors. Lists of ints are
    multilabel unless `label_type="regression"`. Declared `classes` (a count, or names in id order) fix
    the class count and the names' ids; without them the count is the largest id + 1.
    """
    shapes = [(_label_shape(sample.label, sample.line), sample) for sample in samples]
    check_number_mix(shapes, label_type)
    chosen = label_type or _infer_label_type(shapes)
    group = _accepted_group(chosen, shapes)
    if chosen == "regression":
        if classes is not None:
            raise ManifestError(f"line 1: the manifest declares classes, but its labels are regression "
                                f"targets; remove the classes line or give class labels.")
        return _encode_regression(samples)
    return _encode_classes(samples, multilabel=chosen == "multilabel", by_name=group == 1, classes=classes)


def _infer_label_type(shapes: list[tuple[str, ManifestSample]]) -> str:
    found = {shape for shape, _ in shapes}
    if found & {"list-float"} or (found & {"float"} and not found & {"name"}):
        return "regression"
    if any(shape.startswith("list") for shape in found):
        return "multilabel"
    return "class"


def _accepted_group(label_type: str, shapes: list[tuple[str, ManifestSample]]) -> int:
    """Which of the type's shape groups the first label uses; raise at the first label outside it."""
    groups = ACCEPTED_SHAPES[label_type]
    first_shape, first = shapes[0]
    index = next((i for i, group in enumerate(groups) if first_shape in group), None)
    if index is None:
        raise ManifestError(f"line {first.line}: label {first.label!r} is invalid for label type "
                            f"{label_type!r}; {_LABEL_HELP[label_type]}")
    for shape, sample in shapes:
        if shape not in groups[index]:
            raise ManifestError(
                f"line {sample.line}: label {sample.label!r} is invalid: it is {_SHAPE_WORDS[shape]}, but line "
                f"{first.line} made the labels {label_type} with {_SHAPE_WORDS[first_shape]}; use one label "
                f"form per manifest ({_LABEL_HELP[label_type]}).")
    return index


_SHAPE_WORDS = {"int": "an integer class id", "float": "a number", "name": "a class name",
                "list-int": "a list of class ids", "list-float": "a list of numbers",
                "list-name": "a list of class names"}
_LABEL_HELP = {"class": "give every line an integer class >= 0, or every line a class name",
               "regression": "give every line a number, or every line a list of D numbers",
               "multilabel": "give every line a list of class ids >= 0, or every line a list of class names"}


def _encode_classes(samples: list[ManifestSample], *, multilabel: bool, by_name: bool,
                    classes: list[str] | int | None = None) -> tuple[list[ManifestSample], dict]:
    as_list = (lambda label: list(label)) if multilabel else (lambda label: [label])
    if by_name and isinstance(classes, int):
        raise ManifestError(f"line 1: the manifest declares {classes} classes by number, but its labels are "
                            f"class names; declare the names in id order instead, e.g. {{\"classes\": [...]}}.")
    names = classes if isinstance(classes, list) else None
    if by_name and names is None:
        names = sorted({item for sample in samples for item in as_list(sample.label)})
    ids = {name: index for index, name in enumerate(names or [])}
    declared = len(names) if classes is not None and names is not None else classes
    encoded = []
    for sample in samples:
        items = [_class_id(item, ids, sample, declared) for item in as_list(sample.label)] if by_name \
            else as_list(sample.label)
        if any(item < 0 or (declared is not None and item >= declared) for item in items):
            limit = f" below the {declared} declared classes" if declared is not None else ""
            raise ManifestError(f"line {sample.line}: label {sample.label!r} is invalid; class ids are "
                                f"integers >= 0{limit}.")
        label = sorted(set(items)) if multilabel else items[0]
        encoded.append(_with_label(sample, label))
    count = declared if declared is not None else (
        len(names) if by_name else 1 + max((i for s in encoded for i in as_list(s.label)), default=-1))
    check_class_count(encoded, count, multilabel=multilabel)
    kind = "multilabel" if multilabel else "class"
    return encoded, {"type": kind, "num_classes": max(count, 1), "names": names}


def _class_id(name: str, ids: dict[str, int], sample: ManifestSample, declared: int | None) -> int:
    if name not in ids:
        assert declared is not None, "undeclared names are collected from the samples themselves"
        raise ManifestError(f"line {sample.line}: label {name!r} is not one of the declared classes "
                            f"({', '.join(ids)}); fix the label or add it to the classes line.")
    return ids[name]


def _encode_regression(samples: list[ManifestSample]) -> tuple[list[ManifestSample], dict]:
    first = samples[0]
    dim = len(first.label) if isinstance(first.label, list) else 1
    encoded = []
    for sample in samples:
        size = len(sample.label) if isinstance(sample.label, list) else 1
        if size != dim or (isinstance(sample.label, list) != isinstance(first.label, list)):
            raise ManifestError(f"line {sample.line}: label {sample.label!r} has {size} value(s), but line "
                                f"{first.line} made regression targets of dimension {dim}; give every line "
                                f"the same number of values.")
        values = [float(v) for v in (sample.label if isinstance(sample.label, list) else [sample.label])]
        if not all(value == value and abs(value) != float("inf") for value in values):
            raise ManifestError(f"line {sample.line}: label {sample.label!r} is not finite; use real numbers.")
        encoded.append(_with_label(sample, values if isinstance(first.label, list) else values[0]))
    return encoded, {"type": "regression", "dim": dim}


def _with_label(sample: ManifestSample, label) -> ManifestSample:
    return ManifestSample(key=sample.key, split=sample.split, label=label, line=sample.line,
                          values=sample.values)

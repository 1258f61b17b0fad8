"""Manifests for the paper's datasets, read from each dataset's on-disk layout as its publisher ships it.

Each adapter returns an AdapterResult: manifest records (docs/formats.md) with the dataset's standard split,
the dataset's class list, and a Report of everything it skipped or clamped (never dropped in silence).
docs/shards.md describes the layouts read and the splits used.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ADAPTERS", "AdapterError", "AdapterResult", "Report", "write_manifest"]


class AdapterError(ValueError):
    """The folder does not look like the dataset; the message says what was expected where."""


@dataclass
class Report:
    """What an adapter skipped or clamped and why: a count and a first example per reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def count(self, reason: str, example: str = "", times: int = 1) -> None:
        self.counts[reason] += times
        self.examples.setdefault(reason, example)

    def lines(self) -> list[str]:
        return [f"{count} {reason}" + (f" (e.g. {self.examples[reason]})" if self.examples[reason] else "")
                for reason, count in self.counts.items()]


@dataclass
class AdapterResult:
    """Records, the declared classes (names in id order, a count, or None for regression) and the report."""

    records: list[dict]
    classes: list[str] | int | None
    report: Report


# --- RAVDESS ------------------------------------------------------------------------------------------------
# Files MM-VV-EE-II-SS-RR-AA.{mp4,wav} (https://zenodo.org/record/1188976): modality (01 full-AV, 02
# video-only, 03 audio-only), vocal channel (01 speech, 02 song), emotion (01-08), intensity (01 normal,
# 02 strong), statement (01, 02), repetition (01, 02), actor (01-24).
RAVDESS_EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
RAVDESS_NAME = re.compile(r"(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)")
RAVDESS_CODES = (("modality", range(1, 4)), ("vocal channel", range(1, 3)), ("emotion", range(1, 9)),
                 ("intensity", range(1, 3)), ("statement", range(1, 3)), ("repetition", range(1, 3)),
                 ("actor", range(1, 25)))
RAVDESS_SPLIT = {"val": range(21, 23), "test": range(23, 25)}  # actors 1-20 train, 21-22 val, 23-24 test


def ravdess_records(root: Path) -> AdapterResult:
    """One sample per full-AV clip (01-*.mp4): rgb is the clip, audio the matching audio-only 03-*.wav when
    the folder has it, else the clip's own audio track. Label: the emotion name. Split by actor."""
    report = Report()
    files = _ravdess_files(root, report)
    clips = sorted((stem, path) for stem, path in files.items() if stem.startswith("01-") and path.suffix == ".mp4")
    records = []
    for stem, clip in clips:
        emotion, actor = int(stem[6:8]), int(stem[-2:])
        split = next((name for name, actors in RAVDESS_SPLIT.items() if actor in actors), "train")
        audio = files.get("03" + stem[2:], clip)
        records.append({"key": stem, "split": split, "label": RAVDESS_EMOTIONS[emotion - 1],
                        "rgb": _relative(clip, root), "audio": _relative(audio, root)})
    for stem, path in sorted(files.items()):
        if stem.startswith("02-"):
            report.count("video-only clips (02-*) not used: a sample is a full-AV clip (01-*)", _relative(path, root))
        elif stem.startswith("03-") and "01" + stem[2:] not in files:
            report.count("audio-only files (03-*) without their full-AV clip, not used", _relative(path, root))
    if not records:
        raise AdapterError(f"{root}: no RAVDESS full-AV clips (Actor_NN/01-VV-EE-II-SS-RR-AA.mp4) found.")
    return AdapterResult(records, list(RAVDESS_EMOTIONS), report)


def _ravdess_files(root: Path, report: Report) -> dict[str, Path]:
    """Every .mp4 and .wav named MM-VV-EE-II-SS-RR-AA by its stem; unknown codes and duplicates are errors."""
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in (".mp4", ".wav") or not path.is_file():
            continue
        if not RAVDESS_NAME.fullmatch(path.stem):
            report.count("media files not named MM-VV-EE-II-SS-RR-AA, not used", _relative(path, root))
            continue
        _check_ravdess_codes(path)
        if path.stem in files:
            raise AdapterError(f"{path} and {files[path.stem]} are the same RAVDESS recording ({path.stem}); "
                               f"the folder holds an actor twice (extracted twice?): remove one copy.")
        files[path.stem] = path
    return files


def _check_ravdess_codes(path: Path) -> None:
    codes = [int(code) for code in path.stem.split("-")]
    for (name, allowed), code in zip(RAVDESS_CODES, codes):
        if code not in allowed:
            raise AdapterError(f"{path}: {name} code {code:02d} is not a RAVDESS code ({allowed.start:02d}-"
                               f"{allowed.stop - 1:02d}); rename or remove the file (names are "
                               f"modality-channel-emotion-intensity-statement-repetition-actor).")
    expected = ".wav" if codes[0] == 3 else ".mp4"
    if path.suffix.lower() != expected:
        raise AdapterError(f"{path}: modality {codes[0]:02d} files are {expected}; rename or remove the file.")


# --- EgoGesture ---------------------------------------------------------------------------------------------
# http://www.nlpr.ia.ac.cn/iva/yfzhang/datasets/egogesture.html: images_320-240/SubjectNN/SceneN/Color/rgbN/
# 000001.jpg and .../Depth/depthN/000001.jpg (some copies split images_320-240 into _1 to _5), labels in
# labels-final-revised1/subjectNN/SceneN/GroupN.csv (also groupN.csv), rows "class (1-83),start,end".
EGOGESTURE_SPLIT = {"val": {1, 7, 12, 13, 24, 29, 33, 34, 35, 37}, "test": {2, 9, 11, 14, 18, 19, 28, 31, 41, 47}}
EGOGESTURE_CLASSES = 83
EGOGESTURE_IMAGES = re.compile(r"images(_320-240)?(_\d+)?", re.IGNORECASE)
EGOGESTURE_GROUP = re.compile(r"group(\d+)\.csv", re.IGNORECASE)


@dataclass(frozen=True)
class _Group:
    """One recording: subject, scene folder, group number, its label file and its two frame folders."""

    subject: int
    scene: str
    number: int
    labels: Path
    color: Path
    depth: Path


def egogesture_records(root: Path) -> AdapterResult:
    """One sample per annotated gesture: rgb and depth are the group's frame folders cut to the gesture's
    frame range; label = class - 1 (0-82). The official subject split (30 train, 10 val, 10 test)."""
    report = Report()
    records = []
    for group in _egogesture_groups(root):
        last = min(_frame_count(group.color), _frame_count(group.depth))
        split = next((name for name, subjects in EGOGESTURE_SPLIT.items() if group.subject in subjects), "train")
        for number, (line, label, start, end) in enumerate(_egogesture_rows(group.labels), start=1):
            end = _egogesture_range(group, line, start, end, last, report)
            key = f"Subject{group.subject:02d}_{group.scene}_{group.number}_{number}"
            records.append({"key": key, "split": split, "label": label - 1,
                            "rgb": f"{_relative(group.color, root)}/*.jpg@{start}-{end}",
                            "depth": f"{_relative(group.depth, root)}/*.jpg@{start}-{end}"})
    if not records:
        raise AdapterError(f"{root}: no EgoGesture labels (labels-final-revised1/subjectNN/SceneN/GroupN.csv).")
    return AdapterResult(records, EGOGESTURE_CLASSES, report)


def _egogesture_groups(root: Path) -> list[_Group]:
    """Every labelled group with its frame folders; a label file without frames, or frames without a
    label file, is an error naming what is missing."""
    labels = _find_folder(root, "labels-final-revised1")
    image_roots = _egogesture_image_roots(root)
    groups, labelled = [], set()
    for csv_path in sorted(labels.glob("*/*/*.csv"), key=_natural):
        match = EGOGESTURE_GROUP.fullmatch(csv_path.name)
        subject_number = re.search(r"\d+", csv_path.parent.parent.name)
        if not match or not subject_number:
            continue
        subject, scene, number = int(subject_number[0]), csv_path.parent.name, int(match[1])
        scene_folder = _find_subject(image_roots, subject, root, csv_path) / scene
        group = _Group(subject, scene, number, csv_path, scene_folder / "Color" / f"rgb{number}",
                       scene_folder / "Depth" / f"depth{number}")
        for folder in (group.color, group.depth):
            if not folder.is_dir():
                raise AdapterError(f"{folder}: folder not found, but {csv_path} labels its gestures; download "
                                   f"the images of Subject{subject:02d} completely (or remove the label file).")
        groups.append(group)
        labelled.add(group.color)
    _check_every_recording_labelled(image_roots, labelled, labels, root)
    return groups


def _egogesture_image_roots(root: Path) -> list[Path]:
    """images_320-240/ (as downloaded), its parts images_320-240_1 ... _5, or images/; else ROOT itself."""
    found = [child for child in sorted(root.iterdir(), key=_natural)
             if child.is_dir() and EGOGESTURE_IMAGES.fullmatch(child.name)]
    return found or [root]


def _find_subject(image_roots: list[Path], subject: int, root: Path, csv_path: Path) -> Path:
    for image_root in image_roots:
        for child in image_root.iterdir():
            if child.is_dir() and child.name.lower() == f"subject{subject:02d}":
                return child
    searched = ", ".join(_relative(path, root) + "/" if path != root else "ROOT" for path in image_roots)
    raise AdapterError(f"Subject{subject:02d}: no frame folder in {searched} under {root}, but {csv_path} "
                       f"labels its gestures; extract every images_320-240 part into ROOT.")


def _check_every_recording_labelled(image_roots: list[Path], labelled: set[Path], labels: Path, root: Path) -> None:
    for image_root in image_roots:
        for color in sorted(image_root.glob("*/*/Color/rgb*"), key=_natural):
            if color.is_dir() and re.fullmatch(r"[Ss]ubject\d+", color.parent.parent.parent.name) \
                    and color not in labelled:
                scene = color.parent.parent
                expected = labels / scene.parent.name.lower() / scene.name / f"Group{color.name[3:]}.csv"
                raise AdapterError(f"{expected}: label file not found, but {_relative(color, root)} holds that "
                                   f"recording's frames; download labels-final-revised1 completely.")


def _egogesture_range(group: _Group, line: int, start: int, end: int, last: int, report: Report) -> int:
    """The row's end frame, clamped (and counted) to the recording's last frame; a start past it is an error."""
    where = f"{group.labels} line {line}"
    if not 1 <= start <= end:
        raise AdapterError(f"{where}: frames {start}-{end} are not a range (1 <= start <= end); fix the row.")
    if start > last:
        raise AdapterError(f"{where}: frames {start}-{end} start after the last frame ({last}) of {group.color}; "
                           f"fix the row, or download the recording's frames completely.")
    if end > last:
        report.count("gesture ranges ending after the recording's last frame, clamped to it",
                     f"{where}: {start}-{end} -> {start}-{last}")
    return min(end, last)


def _frame_count(folder: Path) -> int:
    return sum(1 for name in os.listdir(folder) if name.lower().endswith(".jpg"))


def _egogesture_rows(path: Path) -> list[tuple[int, int, int, int]]:
    """(line, class, start, end) per non-empty row."""
    rows = []
    with open(path, newline="", encoding="utf-8") as file:
        for line, row in enumerate(csv.reader(file), start=1):
            cells = [cell.strip() for cell in row if cell.strip()]
            if not cells:
                continue
            if len(cells) < 3 or not all(cell.isdigit() for cell in cells[:3]):
                raise AdapterError(f"{path} line {line}: expected 'class,start,end' integers, got {row}.")
            if not 1 <= int(cells[0]) <= EGOGESTURE_CLASSES:
                raise AdapterError(f"{path} line {line}: class {cells[0]} is not an EgoGesture class (1-83); "
                                   f"fix the row.")
            rows.append((line, int(cells[0]), int(cells[1]), int(cells[2])))
    return rows


# --- NVGesture ----------------------------------------------------------------------------------------------
# https://research.nvidia.com/publication/2016-06_online-detection-and-classification-dynamic-hand-gestures-
# recurrent-3d: nvgesture_{train,test}_correct_cvpr2016_v2.lst lines
# "path:./Video_data/class_01/subject13_r0 depth:sk_depth:138:218 color:sk_color:138:218 duo_left:... label:1"
NVGESTURE_LISTS = {"train": "nvgesture_train_correct_cvpr2016_v2.lst", "test": "nvgesture_test_correct_cvpr2016_v2.lst"}
NVGESTURE_CLASSES = 25


def nvgesture_records(root: Path, lists: dict[str, str] | None = None) -> AdapterResult:
    """One sample per list line: rgb = sk_color.avi and depth = sk_depth.avi cut to the annotated frames;
    label = label - 1 (0-24). Splits: the publisher's train and test lists (1050 / 482), or `lists`
    (split -> list file, relative to ROOT) instead."""
    report = Report()
    chosen = {split: root / name for split, name in {**NVGESTURE_LISTS, **(lists or {})}.items()}
    records = []
    for split, path in chosen.items():
        if not path.is_file():
            raise AdapterError(f"{path}: list not found; the publisher's {split} list is "
                               f"{NVGESTURE_LISTS.get(split, path.name)} (choose another with --list {split}=FILE).")
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                records.append(_nvgesture_record(line, split, root, f"{path} line {line_number}"))
    for other in sorted(set(root.glob("*.lst")) - set(chosen.values())):
        report.count("other .lst files beside the lists read, not used (choose one with --list SPLIT=FILE)",
                     other.name)
    return AdapterResult(records, NVGESTURE_CLASSES, report)


def _nvgesture_record(line: str, split: str, root: Path, where: str) -> dict:
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    try:
        folder = root / fields["path"]
        label = int(fields["label"])
        record = {"key": "_".join(Path(fields["path"]).parts[-2:]), "split": split, "label": label - 1}
        for name, field_name in (("rgb", "color"), ("depth", "depth")):
            video, start, end = fields[field_name].split(":")
            record[name] = f"{_relative(folder / (video + '.avi'), root)}@{int(start) + 1}-{int(end)}"
    except (KeyError, ValueError) as error:
        raise AdapterError(f"{where}: cannot parse {line!r} ({error}); expected path:, color:, depth: and label:.")
    if not 1 <= label <= NVGESTURE_CLASSES:
        raise AdapterError(f"{where}: label {label} is not an NVGesture class (1-25); fix the line.")
    return record


# --- registry and writing -----------------------------------------------------------------------------------

def _mosei(root: Path, *, segments: Path) -> AdapterResult:
    from shards.mosei import mosei_records
    return mosei_records(root, segments=segments)


ADAPTERS = {"ravdess": ravdess_records, "egogesture": egogesture_records, "nvgesture": nvgesture_records,
            "cmu-mosei": _mosei}


def write_manifest(dataset: str, root: Path | str, out: Path | str, *,
                   lists: dict[str, str] | None = None) -> AdapterResult:
    """Write the manifest of `dataset` found under `root` to `out` (paths relative to out's folder).

    The first line declares the dataset's classes when it has classes. CMU-MOSEI's `.csd` sequences are
    cut into per-segment `.npy` files in `<out stem>-segments/` beside `out`. `lists` (NVGesture only)
    replaces the publisher's list of a split.
    """
    root, out = Path(root).resolve(), Path(out)
    if dataset not in ADAPTERS:
        raise AdapterError(f"unknown dataset {dataset!r}; use one of {', '.join(ADAPTERS)}.")
    if not root.is_dir():
        raise AdapterError(f"{root} is not a folder; give the dataset's root folder.")
    if lists and dataset != "nvgesture":
        raise AdapterError(f"--list applies to --format nvgesture only, not {dataset}; remove it.")
    options = {"lists": lists} if dataset == "nvgesture" else {}
    if dataset == "cmu-mosei":
        options = {"segments": out.resolve().parent / f"{out.stem}-segments"}
    result = ADAPTERS[dataset](root, **options)
    base = out.resolve().parent
    for record in result.records:
        for name, value in record.items():
            if name not in ("key", "split", "label") and isinstance(value, str):
                record[name] = _rebase(value, root, base)
    header = [json.dumps({"classes": result.classes}) + "\n"] if result.classes is not None else []
    out.write_text("".join(header + [json.dumps(record) + "\n" for record in result.records]), encoding="utf-8")
    return result


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _rebase(value: str, root: Path, base: Path) -> str:
    """A root-relative (or absolute) value made relative to the manifest's folder, or absolute when outside it."""
    absolute = root / value
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return absolute.as_posix()


def _find_folder(parent: Path, name: str) -> Path:
    """`parent/name`, matched case-insensitively (the labels use subjectNN where images use SubjectNN)."""
    if (parent / name).is_dir():
        return parent / name
    for child in parent.iterdir() if parent.is_dir() else ():
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    raise AdapterError(f"{parent / name}: folder not found.")


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]

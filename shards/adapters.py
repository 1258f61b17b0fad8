"""Manifests for the paper's datasets, read from each dataset's on-disk layout as its publisher ships it.

Each adapter returns manifest records (docs/formats.md) with the dataset's standard split; docs/shards.md
describes the layouts expected and the splits used.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

__all__ = ["ADAPTERS", "AdapterError", "write_manifest"]


class AdapterError(ValueError):
    """The folder does not look like the dataset; the message says what was expected where."""


# --- RAVDESS ------------------------------------------------------------------------------------------------
# Files MM-VV-EE-II-SS-RR-AA.{mp4,wav}: modality (01 full-AV, 02 video-only, 03 audio-only), vocal channel
# (01 speech, 02 song), emotion, intensity, statement, repetition, actor (01-24).
RAVDESS_EMOTIONS = {1: "neutral", 2: "calm", 3: "happy", 4: "sad", 5: "angry", 6: "fearful", 7: "disgust",
                    8: "surprised"}
RAVDESS_NAME = re.compile(r"(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)")
RAVDESS_SPLIT = {"val": range(21, 23), "test": range(23, 25)}  # actors 1-20 train, 21-22 val, 23-24 test


def ravdess_records(root: Path) -> list[dict]:
    """One sample per full-AV clip (01-*.mp4): rgb is the clip, audio the matching audio-only 03-*.wav when
    the folder has it, else the clip's own audio track. Label: the emotion name. Split by actor."""
    wavs = {RAVDESS_NAME.fullmatch(p.stem)[0][3:]: p for p in root.rglob("03-*.wav") if RAVDESS_NAME.fullmatch(p.stem)}
    records = []
    for clip in sorted(root.rglob("01-*.mp4"), key=lambda p: p.name):
        fields = RAVDESS_NAME.fullmatch(clip.stem)
        if not fields:
            continue
        emotion, actor = int(fields[3]), int(fields[7])
        split = next((name for name, actors in RAVDESS_SPLIT.items() if actor in actors), "train")
        audio = wavs.get(clip.stem[3:], clip)
        records.append({"key": clip.stem, "split": split, "label": RAVDESS_EMOTIONS[emotion],
                        "rgb": _relative(clip, root), "audio": _relative(audio, root)})
    if not records:
        raise AdapterError(f"{root}: no RAVDESS full-AV clips (Actor_NN/01-VV-EE-II-SS-RR-AA.mp4) found.")
    return records


# --- EgoGesture ---------------------------------------------------------------------------------------------
# images/SubjectNN/SceneN/Color/rgbN/000001.jpg and .../Depth/depthN/000001.jpg, labels in
# labels-final-revised1/subjectNN/SceneN/GroupN.csv with rows "class (1-83), start frame, end frame".
EGOGESTURE_SPLIT = {"val": {1, 7, 12, 13, 24, 29, 33, 34, 35, 37}, "test": {2, 9, 11, 14, 18, 19, 28, 31, 41, 47}}


def egogesture_records(root: Path) -> list[dict]:
    """One sample per annotated gesture: rgb and depth are the group's frame folders cut to the gesture's
    frame range; label = class - 1 (0-82). The official subject split (30 train, 10 val, 10 test)."""
    labels = _find_folder(root, "labels-final-revised1")
    images = _find_folder(root, "images") if (root / "images").is_dir() else root
    records = []
    for group_csv in sorted(labels.glob("*/*/Group*.csv"), key=_natural):
        subject = int(re.search(r"\d+", group_csv.parent.parent.name)[0])
        scene, group = group_csv.parent.name, int(re.search(r"\d+", group_csv.stem)[0])
        folder = _find_folder(images, f"Subject{subject:02d}") / scene
        for number, (label, start, end) in enumerate(_egogesture_rows(group_csv), start=1):
            key = f"Subject{subject:02d}_{scene}_{group}_{number}"
            split = next((name for name, subjects in EGOGESTURE_SPLIT.items() if subject in subjects), "train")
            records.append({"key": key, "split": split, "label": label - 1,
                            "rgb": f"{_relative(folder / 'Color' / f'rgb{group}', root)}/*.jpg@{start}-{end}",
                            "depth": f"{_relative(folder / 'Depth' / f'depth{group}', root)}/*.jpg@{start}-{end}"})
    if not records:
        raise AdapterError(f"{root}: no EgoGesture labels (labels-final-revised1/subjectNN/SceneN/GroupN.csv).")
    return records


def _egogesture_rows(path: Path) -> list[tuple[int, int, int]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as file:
        for line, row in enumerate(csv.reader(file), start=1):
            cells = [cell.strip() for cell in row if cell.strip()]
            if not cells:
                continue
            if len(cells) < 3 or not all(cell.isdigit() for cell in cells[:3]):
                raise AdapterError(f"{path} line {line}: expected 'class,start,end' integers, got {row}.")
            rows.append((int(cells[0]), int(cells[1]), int(cells[2])))
    return rows


# --- NVGesture ----------------------------------------------------------------------------------------------
# nvgesture_{train,test}_correct_cvpr2016_v2.lst lines:
# "path:./Video_data/class_01/subject13_r0 depth:sk_depth:138:218 color:sk_color:138:218 duo_left:... label:1"
def nvgesture_records(root: Path) -> list[dict]:
    """One sample per list line: rgb = sk_color.avi and depth = sk_depth.avi cut to the annotated frames;
    label = label - 1 (0-24). Splits: the publisher's train and test lists (1050 / 482)."""
    records = []
    for split in ("train", "test"):
        lists = sorted(root.glob(f"nvgesture*_{split}_correct_cvpr2016_v2.lst"))
        if not lists:
            raise AdapterError(f"{root}: nvgesture_{split}_correct_cvpr2016_v2.lst is missing.")
        for line_number, line in enumerate(lists[0].read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                records.append(_nvgesture_record(line, split, root, f"{lists[0].name} line {line_number}"))
    return records


def _nvgesture_record(line: str, split: str, root: Path, where: str) -> dict:
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    try:
        folder = root / fields["path"]
        record = {"key": "_".join(Path(fields["path"]).parts[-2:]), "split": split, "label": int(fields["label"]) - 1}
        for name, field in (("rgb", "color"), ("depth", "depth")):
            video, start, end = fields[field].split(":")
            record[name] = f"{_relative(folder / (video + '.avi'), root)}@{int(start) + 1}-{int(end)}"
    except (KeyError, ValueError) as error:
        raise AdapterError(f"{where}: cannot parse {line!r} ({error}); expected path:, color:, depth: and label:.")
    return record


# --- CMU-MOSEI ----------------------------------------------------------------------------------------------
# The CMU Multimodal SDK stores computational sequences (.csd, HDF5). cotrain reads them exported to this
# on-disk form (one file per segment, what the SDK's `dataset[seq][segment_id]["features"]` holds):
#   ROOT/labels.csv                   video_id,segment,sentiment   (sentiment in [-3, 3])
#   ROOT/<SEQ>/<video_id>_<segment>.npy   features per modality, e.g. COVAREP/, FACET 4.2/ -> FACET/, glove_vectors/
#   ROOT/text/<video_id>_<segment>.txt    the transcript (optional)
#   ROOT/splits/{train,valid,test}.txt    the SDK's standard_train_fold / valid / test video ids, one a line
MOSEI_FEATURES = ("COVAREP", "FACET", "glove_vectors", "OpenFace")


def mosei_records(root: Path) -> list[dict]:
    """One sample per labelled segment: each feature folder present becomes a features modality, the
    transcript a text modality; label = the sentiment score (regression). Split: the SDK's standard folds."""
    folds = {}
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        path = root / "splits" / f"{name}.txt"
        if not path.exists():
            raise AdapterError(f"{path} is missing; write the SDK's standard_{name}_fold video ids there, one a line.")
        folds.update({video: split for video in path.read_text(encoding="utf-8").split()})
    labels = root / "labels.csv"
    if not labels.exists():
        raise AdapterError(f"{labels} is missing; write video_id,segment,sentiment rows (sentiment in [-3, 3]).")
    records = []
    with open(labels, newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            key = f"{row['video_id']}_{row['segment']}"
            if row["video_id"] not in folds:
                continue  # the SDK leaves a few videos out of every standard fold
            record = {"key": key, "split": folds[row["video_id"]], "label": float(row["sentiment"])}
            for sequence in MOSEI_FEATURES:
                if (root / sequence / f"{key}.npy").exists():
                    record[sequence.lower()] = _relative(root / sequence / f"{key}.npy", root)
            if (root / "text" / f"{key}.txt").exists():
                record["text"] = _relative(root / "text" / f"{key}.txt", root)
            records.append(record)
    if not records:
        raise AdapterError(f"{labels}: no labelled segment belongs to a standard fold.")
    return records


ADAPTERS = {"ravdess": ravdess_records, "egogesture": egogesture_records, "nvgesture": nvgesture_records,
            "cmu-mosei": mosei_records}


def write_manifest(dataset: str, root: Path | str, out: Path | str) -> list[dict]:
    """Write the manifest of `dataset` found under `root` to `out` (paths relative to out's folder)."""
    root, out = Path(root).resolve(), Path(out)
    if dataset not in ADAPTERS:
        raise AdapterError(f"unknown dataset {dataset!r}; use one of {', '.join(ADAPTERS)}.")
    if not root.is_dir():
        raise AdapterError(f"{root} is not a folder; give the dataset's root folder.")
    records = ADAPTERS[dataset](root)
    base = out.resolve().parent
    for record in records:
        for name, value in record.items():
            if name not in ("key", "split", "label") and isinstance(value, str):
                record[name] = _rebase(value, root, base)
    out.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return records


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _rebase(value: str, root: Path, base: Path) -> str:
    """A root-relative value made relative to the manifest's folder, or absolute when outside it."""
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

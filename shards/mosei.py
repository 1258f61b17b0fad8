"""CMU-MOSEI as the CMU-MultimodalSDK ships it (`.csd` computational sequences), or exported per segment.

SDK download: HDF5 files, each with one top-level group named after its sequence ("All Labels",
"COVAREP", "FACET 4.2", "OpenFace_2", "glove_vectors", ...) holding `data/<video id>/features` (rows) and
`data/<video id>/intervals` (rows x [start, end] seconds) plus `metadata` (mmsdk/mmdatasdk/
computational_sequence/file_ops.py, read_CSD / write_CSD). Labels are one row per segment: sentiment
(-3..3) first, then happy, sad, anger, surprise, disgust, fear. A segment's features are the rows of each
sequence whose interval intersects the segment's (mmsdk/mmdatasdk/dataset/dataset.py, align and
__intersect_and_copy); the SDK names the aligned segment `<video id>[<segment index>]`.

Exported form (one file per segment, what the SDK's aligned `dataset[sequence][segment]["features"]` holds):
ROOT/labels.csv (video_id,segment,sentiment), ROOT/<SEQUENCE>/<video_id>_<segment>.npy,
optional ROOT/text/<video_id>_<segment>.txt and ROOT/splits/{train,valid,test}.txt.
"""
from __future__ import annotations

import csv
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np

from shards.adapters import AdapterError, AdapterResult, Report

__all__ = ["MOSEI_SEQUENCES", "mosei_records", "standard_folds"]

# Modality name -> the sequence's names: the SDK's top-level group (first) and older export folder names.
MOSEI_SEQUENCES = {"covarep": ("COVAREP",), "facet": ("FACET 4.2", "FACET"), "openface": ("OpenFace_2", "OpenFace"),
                   "glove_vectors": ("glove_vectors",)}
LABELS_SEQUENCE = "All Labels"
# Video ids become sample keys `<video id>_<segment index>`: the SDK's ids already match the shard key pattern.
VIDEO_ID = re.compile(r"[A-Za-z0-9_-]+")
# Segments shorter than this are dropped, like the SDK's align (its epsilon).
EPSILON = 1e-6


def standard_folds() -> dict[str, str]:
    """Video id -> split (train, val, test): the SDK's standard folds, shipped in shards/data/.

    Source: CMU-MultimodalSDK, mmsdk/mmdatasdk/dataset/standard_datasets/CMU_MOSEI/cmu_mosei_std_folds.py
    (standard_train_fold, standard_valid_fold, standard_test_fold); the data file names the commit.
    """
    text = resources.files("shards").joinpath("data/cmu_mosei_std_folds.json").read_text(encoding="utf-8")
    folds = json.loads(text)
    return {video: split for split, name in (("train", "train"), ("val", "valid"), ("test", "test"))
            for video in folds[name]}


def mosei_records(root: Path, *, segments: Path) -> AdapterResult:
    """The SDK's `.csd` files under ROOT when there are any (segments cut into `segments/`), else the export."""
    csd_files = sorted(root.rglob("*.csd"))
    if csd_files:
        return _sdk_records(root, csd_files, segments)
    if (root / "labels.csv").exists():
        return _exported_records(root)
    raise AdapterError(f"{root}: no CMU-MOSEI found: neither the SDK's .csd files (CMU_MOSEI_Labels.csd with "
                       f"'All Labels', CMU_MOSEI_COVAREP.csd, ...) nor an exported labels.csv; give the folder "
                       f"the SDK downloaded into.")


# --- the SDK's .csd files -----------------------------------------------------------------------------------

def _sdk_records(root: Path, csd_files: list[Path], segments: Path) -> AdapterResult:
    import h5py
    report = Report()
    handles = [_open_csd(path, h5py) for path in csd_files]
    try:
        sequences = _sequences_by_name(handles, report, root)
        if LABELS_SEQUENCE not in sequences:
            raise AdapterError(f"{root}: no .csd holds the '{LABELS_SEQUENCE}' sequence (CMU_MOSEI_Labels.csd); "
                               f"download the SDK's labels beside the features.")
        features = {modality: sequences[names[0]] for modality, names in MOSEI_SEQUENCES.items()
                    if names[0] in sequences}
        records = _cut_segments(sequences[LABELS_SEQUENCE], features, segments, report)
    finally:
        for handle in handles:
            handle.close()
    if not records:
        raise AdapterError(f"{root}: no labelled segment of a standard fold has features; see the report above.")
    return AdapterResult(records, None, report)


def _open_csd(path: Path, h5py):
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise AdapterError(f"{path}: not an HDF5 computational sequence ({error}); download it again.") from None


def _sequences_by_name(handles: list, report: Report, root: Path) -> dict[str, object]:
    """Top-level group name -> the group's `data`; sequences cotrain does not use are reported."""
    used = {LABELS_SEQUENCE} | {names[0] for names in MOSEI_SEQUENCES.values()}
    sequences, files = {}, {}
    for handle in handles:
        path = Path(handle.filename)
        names = list(handle.keys())
        if len(names) != 1 or "data" not in handle[names[0]]:
            raise AdapterError(f"{path}: expected one top-level sequence group holding data/<video id>/"
                               f"{{features, intervals}}, found {names}; is it a CMU-MultimodalSDK .csd file?")
        name = names[0]
        if name in files:
            raise AdapterError(f"{path} and {files[name]} both hold the sequence {name!r}; remove one copy.")
        files[name] = path
        if name in used:
            sequences[name] = handle[name]["data"]
        else:
            report.count("sequences not used (cotrain reads All Labels, COVAREP, FACET 4.2, OpenFace_2, "
                         "glove_vectors)", f"{name!r} in {path.relative_to(root)}")
    return sequences


def _cut_segments(labels, features: dict, segments: Path, report: Report) -> list[dict]:
    folds = standard_folds()
    for video in sorted(set().union(*(set(data) for data in features.values())) - set(labels)):
        report.count("videos with features but no labels, skipped", video)
    records = []
    for video in sorted(labels):
        intervals, values = _video_arrays(labels, video, LABELS_SEQUENCE)
        if video not in folds:
            report.count("labelled segments of videos in no standard fold, skipped (the SDK leaves them out too)",
                         video, times=len(values))
            continue
        if not VIDEO_ID.fullmatch(video):
            raise AdapterError(f"'{LABELS_SEQUENCE}' video id {video!r} has characters outside [A-Za-z0-9_-]; "
                               f"it cannot name shard samples. Rename it in every .csd file.")
        video_features = {modality: _video_arrays(data, video, modality) if video in data else None
                          for modality, data in features.items()}
        for index, (interval, label) in enumerate(zip(intervals, values)):
            record = _segment_record(video, index, interval, label, folds[video], video_features, segments, report)
            if record is not None:
                records.append(record)
    return records


def _video_arrays(data, video: str, sequence: str) -> tuple[np.ndarray, np.ndarray]:
    intervals, features = data[video]["intervals"][()], data[video]["features"][()]
    if intervals.ndim != 2 or intervals.shape[1] != 2 or features.ndim != 2 or len(features) != len(intervals):
        raise AdapterError(f"{sequence} video {video!r}: intervals {intervals.shape} and features {features.shape} "
                           f"are not n x 2 and n x D; the .csd file is damaged, download it again.")
    return intervals.astype(np.float64), features


def _segment_record(video: str, index: int, interval: np.ndarray, label: np.ndarray, split: str,
                    video_features: dict, segments: Path, report: Report) -> dict | None:
    """The manifest record of segment `index` of `video`, its features cut and saved; None when skipped."""
    key, (start, end) = f"{video}_{index}", interval
    sentiment = float(label[0])
    if not end - start > EPSILON:
        report.count("segments of zero length, skipped (as the SDK's align does)", f"{video}[{index}]")
        return None
    if not np.isfinite(sentiment):
        report.count("segments whose sentiment is not a number, skipped", f"{video}[{index}]")
        return None
    record = {"key": key, "split": split, "label": sentiment}
    for modality, arrays in video_features.items():
        rows = arrays is not None and (arrays[0][:, 0] < end - EPSILON) & (arrays[0][:, 1] > start + EPSILON)
        if not np.any(rows):
            report.count(f"segments without {modality} frames in their interval (modality left out)",
                         f"{video}[{index}]")
            continue
        record[modality] = str(_save_segment(arrays[1][rows], segments / modality / f"{key}.npy", modality, report))
    if len(record) == 3:
        report.count("segments with no frame of any feature sequence, skipped", f"{video}[{index}]")
        return None
    return record


def _save_segment(rows: np.ndarray, path: Path, modality: str, report: Report) -> Path:
    """float32 rows with NaN and +-inf set to 0 (as the SDK's authors do for COVAREP), counted."""
    values = rows.astype(np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        report.count(f"non-finite {modality} values (NaN, -inf, inf) set to 0", path.stem, times=int(bad.sum()))
        values[bad] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, values)
    return path


# --- the exported per-segment form --------------------------------------------------------------------------

def _exported_records(root: Path) -> AdapterResult:
    """One sample per labelled segment: each feature folder present becomes a features modality, the
    transcript a text modality; label = the sentiment score (regression). Split: splits/*.txt when given,
    else the SDK's standard folds."""
    report = Report()
    folds = _exported_folds(root)
    folders = _exported_feature_folders(root, report)
    records = []
    with open(root / "labels.csv", newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            key = f"{row['video_id']}_{row['segment']}"
            if row["video_id"] not in folds:
                report.count("labelled segments of videos in no fold, skipped", key)
                continue
            record = {"key": key, "split": folds[row["video_id"]], "label": float(row["sentiment"])}
            for modality, folder in folders.items():
                if (folder / f"{key}.npy").exists():
                    record[modality] = _relative(folder / f"{key}.npy", root)
            if (root / "text" / f"{key}.txt").exists():
                record["text"] = _relative(root / "text" / f"{key}.txt", root)
            records.append(record)
    if not records:
        raise AdapterError(f"{root / 'labels.csv'}: no labelled segment belongs to a fold.")
    return AdapterResult(records, None, report)


def _exported_folds(root: Path) -> dict[str, str]:
    paths = {split: root / "splits" / f"{name}.txt" for split, name in (("train", "train"), ("val", "valid"),
                                                                         ("test", "test"))}
    if not (root / "splits").is_dir():
        return standard_folds()
    folds = {}
    for split, path in paths.items():
        if not path.exists():
            raise AdapterError(f"{path} is missing; write the {split} video ids there, one a line (or remove "
                               f"splits/ to use the SDK's standard folds).")
        folds.update({video: split for video in path.read_text(encoding="utf-8").split()})
    return folds


def _exported_feature_folders(root: Path, report: Report) -> dict[str, Path]:
    """Modality -> folder, folders named as the SDK names sequences or as older exports did."""
    aliases = {name.lower(): modality for modality, names in MOSEI_SEQUENCES.items() for name in names}
    folders = {}
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name in ("text", "splits"):
            continue
        if child.name.lower() in aliases:
            folders[aliases[child.name.lower()]] = child
        elif any(child.glob("*.npy")):
            known = ", ".join(name for names in MOSEI_SEQUENCES.values() for name in names)
            report.count(f"feature folders not used (known: {known})", child.name)
    return folders


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()

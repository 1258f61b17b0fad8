"""shards/: `cotrain shards manifest` on tiny fixtures laid out as each dataset's publisher ships it, each
taken through manifest -> build -> verify --full with every sample, and the adapters' errors and reports."""
import io
import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from shards.cli import shards_group
from shards.verify import read_samples


def _video(path: Path, *, frames: int, audio: bool = False, gray: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    command = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc=size=40x30:rate=10:duration={frames / 10}"]
    if audio:
        command += ["-f", "lavfi", "-i", f"sine=frequency=300:sample_rate=16000:duration={frames / 10}", "-shortest"]
    command += ["-pix_fmt", "gray" if gray else "yuv420p", "-c:v", "ffv1" if gray else "mpeg4", str(path)]
    subprocess.run(command, check=True)


def _cli(*args: str) -> str:
    result = CliRunner().invoke(shards_group, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


def _manifest(dataset: str, root: Path, out: Path, *options: str) -> tuple[dict | None, list[dict], str]:
    """(the classes line or None, the sample records, the command's output)."""
    output = _cli("manifest", "--format", dataset, root, "-o", out, *options)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    header = lines.pop(0) if "classes" in lines[0] else None
    return header, lines, output


def _manifest_error(dataset: str, root: Path, tmp_path: Path, *options: str) -> str:
    result = CliRunner().invoke(shards_group, ["manifest", "--format", dataset, str(root), "-o",
                                               str(tmp_path / "bad.jsonl"), *options])
    assert result.exit_code == 1, result.output
    return result.output


def _build_and_verify(manifest: Path, out: Path) -> tuple[dict, str]:
    """Build tiny shards through the CLI, check every sample is stored and decodes; (dataset.json, build output)."""
    output = _cli("build", manifest, "--out", out, "--frames", "4", "--size", "16x16", "--workers", "1")
    dataset = json.loads((out / "dataset.json").read_text())
    samples = sum(1 for line in manifest.read_text().splitlines() if "key" in json.loads(line))
    assert dataset["rejects"] == 0 and sum(s["samples"] for s in dataset["splits"].values()) == samples, output
    assert "all samples decoded" in _cli("verify", out, "--full")
    return dataset, output


def _sample(out: Path, split: str, key: str) -> dict:
    with open(out / f"{split}-000000.tar", "rb") as file:
        return read_samples(file)[key]


# --- RAVDESS ------------------------------------------------------------------------------------------------

def test_ravdess_download_goes_through_build_with_the_publishers_eight_emotions(tmp_path):
    """Layout of https://zenodo.org/record/1188976: Video_Speech_Actor_NN.zip extracts to Actor_NN/ with
    01- (audio+video) and 02- (video only) .mp4 clips; Audio_Speech_Actors_01-24.zip holds Actor_NN/03-*.wav."""
    root = tmp_path / "RAVDESS"
    _video(root / "Actor_01/01-01-03-01-01-01-01.mp4", frames=6, audio=True)
    _video(root / "Actor_24/01-01-01-01-02-01-24.mp4", frames=6, audio=True)
    (root / "Actor_24/02-01-01-01-02-01-24.mp4").write_bytes(b"")  # video-only: not a sample, reported
    wav = root / "Audio_Speech_Actors_01-24/Actor_01/03-01-03-01-01-01-01.wav"
    wav.parent.mkdir(parents=True)
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=sample_rate=16000:duration=0.5", str(wav)],
                   check=True)
    header, records, output = _manifest("ravdess", root, tmp_path / "m.jsonl")
    emotions = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
    assert header == {"classes": emotions}
    assert [(r["key"], r["split"], r["label"]) for r in records] == [
        ("01-01-01-01-02-01-24", "test", "neutral"), ("01-01-03-01-01-01-01", "train", "happy")]
    assert records[1]["audio"].endswith("03-01-03-01-01-01-01.wav") and records[0]["audio"] == records[0]["rgb"]
    assert "label type: class, 8 classes (neutral, calm, happy" in output
    assert "1 video-only clips (02-*) not used" in output and "train 1, test 1" in output
    dataset, built = _build_and_verify(tmp_path / "m.jsonl", tmp_path / "out")
    # 8 classes although only two emotions are present; ids follow the publisher's codes (happy = 03 -> 2)
    assert dataset["label"] == {"type": "class", "num_classes": 8, "names": emotions}
    assert json.loads(_sample(tmp_path / "out", "train", "01-01-03-01-01-01-01")["json"])["label"] == 2
    assert "label type: class, 8 classes" in built and "skipped or clamped: nothing" in built


def test_ravdess_unknown_codes_and_an_actor_extracted_twice_are_errors_naming_the_files(tmp_path):
    """Names MM-VV-EE-II-SS-RR-AA with the codes of https://zenodo.org/record/1188976 (emotion 01-08)."""
    root = tmp_path / "RAVDESS"
    (root / "Actor_01").mkdir(parents=True)
    (root / "Actor_01/01-01-09-01-01-01-01.mp4").write_bytes(b"")
    assert "Actor_01/01-01-09-01-01-01-01.mp4: emotion code 09 is not a RAVDESS code" in _manifest_error(
        "ravdess", root, tmp_path)
    (root / "Actor_01/01-01-09-01-01-01-01.mp4").unlink()
    for copy in ("Actor_01", "Video_Speech_Actor_01/Actor_01"):
        (root / copy).mkdir(parents=True, exist_ok=True)
        (root / copy / "01-01-03-01-01-01-01.mp4").write_bytes(b"")
    output = _manifest_error("ravdess", root, tmp_path)
    assert "Video_Speech_Actor_01/Actor_01/01-01-03-01-01-01-01.mp4 and" in output
    assert "RAVDESS/Actor_01/01-01-03-01-01-01-01.mp4 are the same RAVDESS recording" in output


# --- EgoGesture ---------------------------------------------------------------------------------------------

def _egogesture_group(images: Path, subject: int, frames: int, *, labels: Path | None = None,
                      rows: str = "", label_name: str = "Group1.csv") -> None:
    """Frames images/SubjectNN/Scene1/{Color/rgb1, Depth/depth1}/NNNNNN.jpg (pixel value = 20 x frame number)
    and, with `labels`, labels/subjectNN/Scene1/<label_name> holding `rows`."""
    scene = images / f"Subject{subject:02d}/Scene1"
    for folder, channels in (("Color/rgb1", 3), ("Depth/depth1", 1)):
        (scene / folder).mkdir(parents=True)
        for frame in range(1, frames + 1):
            pixels = np.full((12, 16, channels), frame * 20, dtype=np.uint8).squeeze()
            Image.fromarray(pixels).save(scene / folder / f"{frame:06d}.jpg", quality=95)
    if labels is not None:
        path = labels / f"subject{subject:02d}/Scene1/{label_name}"
        path.parent.mkdir(parents=True)
        path.write_text(rows)


def test_egogesture_download_goes_through_build_with_83_classes_and_a_reported_clamp(tmp_path):
    """Layout of http://www.nlpr.ia.ac.cn/iva/yfzhang/datasets/egogesture.html: images_320-240/SubjectNN/
    SceneN/{Color/rgbN, Depth/depthN}/NNNNNN.jpg and labels-final-revised1/subjectNN/SceneN/GroupN.csv
    (some copies spell it groupN.csv), headerless rows class,start,end with classes 1-83."""
    root, labels = tmp_path / "EgoGesture", tmp_path / "EgoGesture/labels-final-revised1"
    _egogesture_group(root / "images_320-240", 2, 8, labels=labels, rows="5,2,5\n")
    _egogesture_group(root / "images_320-240", 3, 8, labels=labels, rows="83,6,9\n", label_name="group1.csv")
    header, records, output = _manifest("egogesture", root, tmp_path / "m.jsonl")
    assert header == {"classes": 83}
    assert [(r["key"], r["split"], r["label"]) for r in records] == [
        ("Subject02_Scene1_1_1", "test", 4), ("Subject03_Scene1_1_1", "train", 82)]
    assert records[0]["depth"].endswith("images_320-240/Subject02/Scene1/Depth/depth1/*.jpg@2-5")
    assert records[1]["rgb"].endswith("Color/rgb1/*.jpg@6-8")  # the row's end 9 lies past the 8 frames
    assert "1 gesture ranges ending after the recording's last frame, clamped to it" in output
    assert "group1.csv line 1: 6-9 -> 6-8" in output and "label type: class, 83 classes" in output
    out = tmp_path / "out"
    dataset, built = _build_and_verify(tmp_path / "m.jsonl", out)
    assert dataset["label"] == {"type": "class", "num_classes": 83, "names": None}  # not 82 + 1 by chance
    assert "train 1, test 1" in built and "label type: class, 83 classes" in built
    depth = np.load(io.BytesIO(_sample(out, "test", "Subject02_Scene1_1_1")["depth.npy"]))
    assert depth.shape == (4, 16, 16)  # frames 2..5 of the folder, whose pixels are 20 * frame number
    assert all(abs(int(value) - 20 * frame) <= 3 for value, frame in zip(depth[:, 8, 8], (2, 3, 4, 5)))


def test_egogesture_reads_the_five_part_images_and_names_missing_labels_and_ranges(tmp_path):
    """The same publisher layout with images_320-240 split into images_320-240_1 ... _5 (as some copies are)."""
    root, labels = tmp_path / "EgoGesture", tmp_path / "EgoGesture/labels-final-revised1"
    _egogesture_group(root / "images_320-240_1", 1, 3, labels=labels, rows="1,1,3\n")
    _egogesture_group(root / "images_320-240_5", 47, 3, labels=labels, rows="2,2,3\n")
    _, records, _ = _manifest("egogesture", root, tmp_path / "m.jsonl")
    assert [(r["key"], r["split"]) for r in records] == [("Subject01_Scene1_1_1", "val"),
                                                         ("Subject47_Scene1_1_1", "test")]
    assert records[1]["rgb"].endswith("images_320-240_5/Subject47/Scene1/Color/rgb1/*.jpg@2-3")
    (labels / "subject47/Scene1/Group1.csv").write_text("2,4,5\n")
    output = _manifest_error("egogesture", root, tmp_path)
    assert "Group1.csv line 1: frames 4-5 start after the last frame (3)" in output
    (labels / "subject47/Scene1/Group1.csv").unlink()
    output = _manifest_error("egogesture", root, tmp_path)
    assert "labels-final-revised1/subject47/Scene1/Group1.csv: label file not found" in output
    assert "images_320-240_5/Subject47/Scene1/Color/rgb1 holds that recording's frames" in output


# --- NVGesture ----------------------------------------------------------------------------------------------

def test_nvgesture_download_goes_through_build_with_the_main_lists_whatever_lies_beside(tmp_path):
    """Layout of the NVGesture release (https://research.nvidia.com/publication/2016-06_online-detection-and-
    classification-dynamic-hand-gestures-recurrent-3d): nvgesture_{train,test}_correct_cvpr2016_v2.lst beside
    Video_data/class_CC/subjectS_rR/{sk_color.avi, sk_depth.avi}; lines with 0-based start, exclusive end,
    labels 1-25 and a trailing space; other lists (nvgesture_arm_...) lie in the same folder."""
    root = tmp_path / "nvGesture"

    def line(clip: str, label: int) -> str:
        return (f"path:./Video_data/{clip} depth:sk_depth:5:25 color:sk_color:5:25 duo_left:duo_left:7:27 "
                f"label:{label} \n")
    for clip in ("class_03/subject1_r0", "class_25/subject2_r1"):
        _video(root / "Video_data" / clip / "sk_color.avi", frames=30)
        _video(root / "Video_data" / clip / "sk_depth.avi", frames=30, gray=True)
    (root / "nvgesture_train_correct_cvpr2016_v2.lst").write_text(line("class_03/subject1_r0", 3))
    (root / "nvgesture_test_correct_cvpr2016_v2.lst").write_text(line("class_25/subject2_r1", 25))
    (root / "nvgesture_arm_train_correct_cvpr2016_v2.lst").write_text(line("class_25/subject2_r1", 25))
    header, records, output = _manifest("nvgesture", root, tmp_path / "m.jsonl")
    assert header == {"classes": 25}
    assert [(r["key"], r["split"], r["label"]) for r in records] == [
        ("class_03_subject1_r0", "train", 2), ("class_25_subject2_r1", "test", 24)]
    assert records[0]["rgb"].endswith("sk_color.avi@6-25") and records[0]["depth"].endswith("sk_depth.avi@6-25")
    assert "1 other .lst files beside the lists read, not used" in output
    assert "nvgesture_arm_train_correct_cvpr2016_v2.lst" in output
    dataset, built = _build_and_verify(tmp_path / "m.jsonl", tmp_path / "out")
    assert dataset["label"] == {"type": "class", "num_classes": 25, "names": None}
    assert dataset["modalities"]["depth"]["kind"] == "depth" and "label type: class, 25 classes" in built
    _, chosen, _ = _manifest("nvgesture", root, tmp_path / "arm.jsonl",
                             "--list", "train=nvgesture_arm_train_correct_cvpr2016_v2.lst",
                             "--list", "test=nvgesture_train_correct_cvpr2016_v2.lst")
    assert [(r["key"], r["split"]) for r in chosen] == [("class_25_subject2_r1", "train"),
                                                        ("class_03_subject1_r0", "test")]


def test_a_folder_that_is_not_the_dataset_gets_a_clear_message(tmp_path):
    assert "nvgesture_train_correct_cvpr2016_v2.lst: list not found" in _manifest_error("nvgesture", tmp_path, tmp_path)
    assert "--list applies to --format nvgesture only" in _manifest_error("ravdess", tmp_path, tmp_path,
                                                                          "--list", "train=x.lst")
    assert "neither the SDK's .csd files" in _manifest_error("cmu-mosei", tmp_path, tmp_path)


# --- CMU-MOSEI ----------------------------------------------------------------------------------------------

def _csd(path: Path, sequence: str, videos: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """A computational sequence as the SDK's write_CSD (mmsdk/mmdatasdk/computational_sequence/file_ops.py)
    stores it: one top-level group named after the sequence, data/<video id>/{features, intervals} and
    metadata/<key> holding one JSON string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        group = file.create_group(sequence)
        for video, (intervals, features) in videos.items():
            group.create_dataset(f"data/{video}/intervals", data=intervals)
            group.create_dataset(f"data/{video}/features", data=features)
        metadata = group.create_group("metadata")
        for key, value in (("root name", sequence), ("computational sequence version", "1.0")):
            metadata.create_dataset(key, (1,), dtype=h5py.special_dtype(vlen=str))
            metadata[key][0] = json.dumps(value)


def _frames(start: float, end: float, rate: float, dim: int, offset: float = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame intervals from start to end at `rate` Hz and features whose first column is the frame's start."""
    starts = np.arange(start, end, 1 / rate)
    features = np.full((len(starts), dim), offset, dtype=np.float64)
    features[:, 0] = starts
    return np.stack([starts, starts + 1 / rate], axis=1), features


def test_cmu_mosei_sdk_download_goes_through_build_with_segments_cut_from_the_csd_files(tmp_path):
    """The SDK's download (mmsdk/mmdatasdk/dataset/standard_datasets/CMU_MOSEI/cmu_mosei.py: highlevel
    CMU_MOSEI_COVAREP.csd, CMU_MOSEI_VisualFacet42.csd, CMU_MOSEI_VisualOpenFace2.csd,
    CMU_MOSEI_TimestampedWordVectors.csd; labels CMU_MOSEI_Labels.csd; raw CMU_MOSEI_TimestampedWords.csd),
    with the real data's quirks: -inf in COVAREP, `sp` words as zero GloVe vectors, ids starting with - or _
    and numeric ids, a video with features but no labels, a labelled video in no standard fold."""
    root = tmp_path / "cmumosei"
    # -iRBcNs9oI8 and _iRAn6feOmw are in the standard train fold, 188343 in valid; zzzNoFoldzz in none
    labelled = {"-iRBcNs9oI8": [(0.5, 1.5), (2.0, 3.0)], "_iRAn6feOmw": [(0.0, 1.0)], "188343": [(1.0, 2.0)],
                "zzzNoFoldzz": [(0.0, 1.0)]}
    labels = {video: (np.array(spans), np.array([[1.5 - i, 0, 0.3, 0, 0, 0, 0.6] for i in range(len(spans))]))
              for video, spans in labelled.items()}
    _csd(root / "cmumosei_labels/CMU_MOSEI_Labels.csd", "All Labels", labels)
    videos = [*labelled, "-unlabelled"]
    covarep = {video: _frames(0, 3.2, 100, 74) for video in videos}
    covarep["-iRBcNs9oI8"][1][60, 5] = -np.inf  # inside segment 0 (0.5-1.5 s)
    covarep["-iRBcNs9oI8"][1][61, 7] = np.nan
    highlevel = root / "cmumosei_highlevel"
    _csd(highlevel / "CMU_MOSEI_COVAREP.csd", "COVAREP", covarep)
    _csd(highlevel / "CMU_MOSEI_VisualFacet42.csd", "FACET 4.2", {v: _frames(0, 3.2, 30, 35) for v in videos})
    _csd(highlevel / "CMU_MOSEI_VisualOpenFace2.csd", "OpenFace_2", {v: _frames(0, 3.2, 30, 713) for v in videos})
    words = (np.array([[0.4, 0.9], [0.9, 1.2], [1.2, 1.6], [2.1, 2.8]]), np.ones((4, 300)))
    words[1][1] = 0  # an `sp` (silence) token: a zero vector, kept as the SDK keeps it
    _csd(highlevel / "CMU_MOSEI_TimestampedWordVectors.csd", "glove_vectors", {"-iRBcNs9oI8": words})
    _csd(root / "cmumosei_raw/CMU_MOSEI_TimestampedWords.csd", "words",
         {"-iRBcNs9oI8": (words[0], np.array([[b"so"], [b"sp"], [b"good"], [b"yes"]]))})

    header, records, output = _manifest("cmu-mosei", root, tmp_path / "m.jsonl")
    assert header is None  # regression: no classes
    assert [(r["key"], r["split"], r["label"]) for r in records] == [
        ("-iRBcNs9oI8_0", "train", 1.5), ("-iRBcNs9oI8_1", "train", 0.5), ("188343_0", "val", 1.5),
        ("_iRAn6feOmw_0", "train", 1.5)]
    assert set(records[0]) == {"key", "split", "label", "covarep", "facet", "openface", "glove_vectors"}
    assert "glove_vectors" not in records[2]  # 188343 has no words
    segments = tmp_path / "m-segments"
    covarep_0 = np.load(segments / "covarep/-iRBcNs9oI8_0.npy")
    assert covarep_0.dtype == np.float32 and covarep_0.shape == (100, 74)  # the 100 Hz frames of 0.5-1.5 s
    assert covarep_0[0, 0] == pytest.approx(0.5) and covarep_0[-1, 0] == pytest.approx(1.49)
    assert covarep_0[10, 5] == 0 and covarep_0[11, 7] == 0 and np.isfinite(covarep_0).all()
    glove_0 = np.load(segments / "glove_vectors/-iRBcNs9oI8_0.npy")
    assert glove_0.shape == (3, 300) and not glove_0[1].any() and glove_0[2].all()  # so, sp, good
    assert "2 non-finite covarep values (NaN, -inf, inf) set to 0" in output
    assert "1 videos with features but no labels, skipped (e.g. -unlabelled)" in output
    assert "1 labelled segments of videos in no standard fold, skipped" in output
    assert "1 sequences not used" in output and "'words'" in output
    assert "2 segments without glove_vectors frames" in output and "label type: regression, dim 1" in output

    dataset, built = _build_and_verify(tmp_path / "m.jsonl", tmp_path / "out")
    assert dataset["label"] == {"type": "regression", "dim": 1}
    assert {name: spec["dim"] for name, spec in dataset["modalities"].items()} == {
        "covarep": 74, "facet": 35, "openface": 713, "glove_vectors": 300}
    assert "train 3, val 1" in built and "label type: regression, dim 1" in built
    stored = np.load(io.BytesIO(_sample(tmp_path / "out", "train", "-iRBcNs9oI8_1")["facet.npy"]))
    assert stored.shape == (30, 35) and stored[0, 0] == pytest.approx(2.0, abs=1e-3)  # 30 Hz frames of 2-3 s
    _cli("inspect", tmp_path / "out", "--key", "-iRBcNs9oI8_1", "--out", tmp_path / "sample")  # a key starting with -
    exported = np.loadtxt(tmp_path / "sample/-iRBcNs9oI8_1.facet.csv", delimiter=",")
    assert exported.shape == (30, 35) and (tmp_path / "sample/-iRBcNs9oI8_1.covarep.csv").exists()


def test_cmu_mosei_exported_folders_named_as_the_sdk_names_sequences(tmp_path):
    """The per-segment export of the SDK's aligned sequences (`dataset[sequence]["<video>[<i>]"]["features"]`)
    with folders named as the SDK names the sequences; without splits/ the SDK's standard folds apply."""
    root = tmp_path / "mosei"
    for folder in ("COVAREP", "FACET 4.2", "OpenFace_2", "text", "extra"):
        (root / folder).mkdir(parents=True)
    (root / "labels.csv").write_text("video_id,segment,sentiment\n-iRBcNs9oI8,0,1.6667\n188343,1,-2.0\nzzz,0,0.5\n")
    for key in ("-iRBcNs9oI8_0", "188343_1", "zzz_0"):
        np.save(root / "COVAREP" / f"{key}.npy", np.ones((7, 74), dtype=np.float32))
        (root / "text" / f"{key}.txt").write_text("so happy with it")
    np.save(root / "FACET 4.2" / "188343_1.npy", np.zeros((3, 35), dtype=np.float32))
    np.save(root / "OpenFace_2" / "188343_1.npy", np.zeros((3, 713), dtype=np.float32))
    np.save(root / "extra" / "188343_1.npy", np.zeros((3, 2), dtype=np.float32))
    _, records, output = _manifest("cmu-mosei", root, tmp_path / "m.jsonl")
    assert [(r["key"], r["split"], r["label"]) for r in records] == [("-iRBcNs9oI8_0", "train", 1.6667),
                                                                    ("188343_1", "val", -2.0)]
    assert {"facet", "openface", "text"} <= set(records[1]) and "facet" not in records[0]
    assert "1 labelled segments of videos in no fold, skipped (e.g. zzz_0)" in output
    assert "1 feature folders not used" in output and "(e.g. extra)" in output


def test_the_build_summary_counts_rejected_samples_by_reason(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(record) + "\n" for record in [
        {"classes": ["no", "yes"]}, {"key": "a", "split": "train", "label": "yes", "text": "fine"},
        {"key": "b", "split": "train", "label": "no", "note": "missing-1.txt"},
        {"key": "c", "split": "val", "label": "no", "note": "missing-2.txt"}]))
    result = CliRunner().invoke(shards_group, ["build", str(manifest), "--out", str(tmp_path / "out"),
                                               "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "label type: class, 2 classes (no, yes)" in result.output
    assert "2 rejected, note: " in result.output and "(e.g. b)" in result.output

"""shards/: `cotrain shards manifest` on tiny fixtures laid out as each dataset's publisher ships it."""
import io
import json
import subprocess
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from shards.build import build_shards
from shards.cli import shards_group


def _video(path: Path, *, frames: int, audio: bool = False, gray: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    command = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc=size=40x30:rate=10:duration={frames / 10}"]
    if audio:
        command += ["-f", "lavfi", "-i", f"sine=frequency=300:sample_rate=16000:duration={frames / 10}", "-shortest"]
    command += ["-pix_fmt", "gray" if gray else "yuv420p", "-c:v", "ffv1" if gray else "mpeg4", str(path)]
    subprocess.run(command, check=True)


def _manifest(dataset: str, root: Path, out: Path) -> list[dict]:
    result = CliRunner().invoke(shards_group, ["manifest", "--format", dataset, str(root), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in out.read_text().splitlines()]


def _build(manifest: Path, out: Path) -> dict:
    dataset = build_shards(manifest, out=out, frames=4, height=16, width=16, workers=1, progress=False)
    rejects = (out / "rejects.jsonl").read_text()
    assert dataset["rejects"] == 0, rejects
    return dataset


def test_ravdess_pairs_clips_with_audio_and_splits_by_actor(tmp_path):
    root = tmp_path / "RAVDESS"
    _video(root / "Actor_01/01-01-03-01-01-01-01.mp4", frames=10, audio=True)
    _video(root / "Actor_22/01-01-05-02-01-02-22.mp4", frames=10, audio=True)
    _video(root / "Actor_24/01-01-01-01-02-01-24.mp4", frames=10, audio=True)
    _video(root / "Actor_24/02-01-01-01-02-01-24.mp4", frames=10)  # video-only: not a full-AV sample
    wav = root / "Audio_Speech_Actors_01-24/Actor_01/03-01-03-01-01-01-01.wav"
    wav.parent.mkdir(parents=True)
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=sample_rate=16000:duration=1", str(wav)], check=True)
    records = _manifest("ravdess", root, tmp_path / "m.jsonl")
    by_key = {r["key"]: r for r in records}
    assert set(by_key) == {"01-01-03-01-01-01-01", "01-01-05-02-01-02-22", "01-01-01-01-02-01-24"}
    assert [by_key[k]["split"] for k in sorted(by_key)] == ["test", "train", "val"]
    assert by_key["01-01-03-01-01-01-01"]["label"] == "happy"
    assert by_key["01-01-03-01-01-01-01"]["audio"].endswith("03-01-03-01-01-01-01.wav")
    assert by_key["01-01-05-02-01-02-22"]["audio"] == by_key["01-01-05-02-01-02-22"]["rgb"]  # the clip's own track
    dataset = _build(tmp_path / "m.jsonl", tmp_path / "out")
    assert dataset["label"] == {"type": "class", "num_classes": 3, "names": ["angry", "happy", "neutral"]}
    assert dataset["modalities"]["audio"]["kind"] == "audio"


def test_egogesture_cuts_gestures_out_of_frame_folders_with_the_official_subject_split(tmp_path):
    root = tmp_path / "EgoGesture"
    for subject in (2, 3):
        scene = root / f"images/Subject{subject:02d}/Scene1"
        for folder, mode in (("Color/rgb1", "RGB"), ("Depth/depth1", "L")):
            (scene / folder).mkdir(parents=True)
            for frame in range(1, 13):
                pixels = np.full((12, 16, 3 if mode == "RGB" else 1), frame * 20, dtype=np.uint8).squeeze()
                Image.fromarray(pixels).save(scene / folder / f"{frame:06d}.jpg", quality=95)
        labels = root / f"labels-final-revised1/subject{subject:02d}/Scene1/Group1.csv"
        labels.parent.mkdir(parents=True)
        labels.write_text("5,2,5\n83,7,12\n")
    records = _manifest("egogesture", root, tmp_path / "m.jsonl")
    assert [(r["key"], r["split"], r["label"]) for r in records] == [
        ("Subject02_Scene1_1_1", "test", 4), ("Subject02_Scene1_1_2", "test", 82),
        ("Subject03_Scene1_1_1", "train", 4), ("Subject03_Scene1_1_2", "train", 82)]
    assert records[0]["depth"].endswith("Subject02/Scene1/Depth/depth1/*.jpg@2-5")
    out = tmp_path / "out"
    dataset = _build(tmp_path / "m.jsonl", out)
    assert dataset["modalities"]["depth"]["dtype"] == "uint8" and dataset["modalities"]["rgb"]["kind"] == "video"
    from shards.verify import read_samples
    with open(out / "train-000000.tar", "rb") as file:
        sample = read_samples(file)["Subject03_Scene1_1_1"]
    depth = np.load(io.BytesIO(sample["depth.npy"]))
    assert depth.shape == (4, 16, 16)  # frames 2..5 of the folder, whose pixels are 20 * frame number
    assert all(abs(int(value) - 20 * frame) <= 3 for value, frame in zip(depth[:, 8, 8], (2, 3, 4, 5)))


def test_nvgesture_reads_the_lists_and_cuts_the_annotated_frames(tmp_path):
    root = tmp_path / "nvGesture"
    clip = root / "Video_data/class_03/subject1_r0"
    _video(clip / "sk_color.avi", frames=30)
    _video(clip / "sk_depth.avi", frames=30, gray=True)
    line = "path:./Video_data/class_03/subject1_r0 depth:sk_depth:5:25 color:sk_color:5:25 duo_left:duo_left:7:27 label:3\n"
    (root / "nvgesture_train_correct_cvpr2016_v2.lst").write_text(line)
    (root / "nvgesture_test_correct_cvpr2016_v2.lst").write_text(line)
    records = _manifest("nvgesture", root, tmp_path / "m.jsonl")
    assert [(r["key"], r["split"], r["label"]) for r in records] == [
        ("class_03_subject1_r0", "train", 2), ("class_03_subject1_r0", "test", 2)]
    assert records[0]["rgb"].endswith("sk_color.avi@6-25") and records[0]["depth"].endswith("sk_depth.avi@6-25")
    records.pop()  # the same clip twice would be a duplicate key; the build needs unique keys
    (tmp_path / "one.jsonl").write_text(json.dumps(records[0]) + "\n")
    dataset = _build(tmp_path / "one.jsonl", tmp_path / "out")
    assert dataset["modalities"]["depth"]["kind"] == "depth" and dataset["modalities"]["depth"]["dtype"] == "uint8"


def test_cmu_mosei_reads_exported_sequences_with_the_standard_folds(tmp_path):
    root = tmp_path / "mosei"
    for folder in ("COVAREP", "FACET", "text", "splits"):
        (root / folder).mkdir(parents=True)
    (root / "labels.csv").write_text("video_id,segment,sentiment\n-3g5yACwYnA,0,1.6667\nabc,1,-2.0\nzzz,0,0.5\n")
    for key in ("-3g5yACwYnA_0", "abc_1", "zzz_0"):
        np.save(root / "COVAREP" / f"{key}.npy", np.ones((7, 74), dtype=np.float32))
        (root / "text" / f"{key}.txt").write_text("so happy with it")
    np.save(root / "FACET" / "abc_1.npy", np.zeros((3, 35), dtype=np.float32))
    (root / "splits/train.txt").write_text("-3g5yACwYnA\n")
    (root / "splits/valid.txt").write_text("abc\n")
    (root / "splits/test.txt").write_text("")
    records = _manifest("cmu-mosei", root, tmp_path / "m.jsonl")
    assert [(r["key"], r["split"], r["label"]) for r in records] == [("-3g5yACwYnA_0", "train", 1.6667),
                                                                    ("abc_1", "val", -2.0)]  # zzz: in no fold
    assert "facet" in records[1] and "facet" not in records[0]
    dataset = _build(tmp_path / "m.jsonl", tmp_path / "out")
    assert dataset["label"] == {"type": "regression", "dim": 1}
    assert dataset["modalities"]["covarep"]["dim"] == 74 and dataset["modalities"]["facet"]["dim"] == 35


def test_a_folder_that_is_not_the_dataset_gets_a_clear_message(tmp_path):
    result = CliRunner().invoke(shards_group, ["manifest", "--format", "nvgesture", str(tmp_path), "-o",
                                               str(tmp_path / "m.jsonl")])
    assert result.exit_code == 1 and "nvgesture_train_correct_cvpr2016_v2.lst is missing" in result.output

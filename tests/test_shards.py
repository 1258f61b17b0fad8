"""shards/: manifest validation, transcoding, shard writing, and what WebDataset and DALI read back."""
import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from nvidia.dali import fn, pipeline_def

from shards.build import build_shards
from shards.cli import shards_group
from shards.manifest import ManifestError, read_manifest
from shards.synth import write_synthetic_corpus
from shards.transcode import TranscodeError, pick_frame_indices

WDS2IDX = Path(sys.executable).parent / "wds2idx"
MEMBERS = ["json", "rgb.webm", "audio.wav", "text.txt", "text.ids"]


def _dataset(shards: Path) -> dict:
    return json.loads((shards / "dataset.json").read_text())


def _shard_paths(shards: Path, split: str, field: str) -> list[str]:
    return [str(shards / shard[field]) for shard in _dataset(shards)["splits"][split]["shards"]]


def _wds_samples(shards: Path, split: str) -> dict[str, dict]:
    """key -> {extension: bytes}, read by plain WebDataset."""
    tars = _shard_paths(shards, split, "tar")
    if not tars:  # a split whose samples were all rejected
        return {}
    samples = wds.WebDataset(tars, shardshuffle=False)
    return {sample["__key__"]: {k: v for k, v in sample.items() if not k.startswith("__")} for sample in samples}


def _dali_samples(shards: Path, split: str, extensions: list[str]) -> dict[str, dict]:
    """key -> {extension: bytes}, read by DALI's webdataset reader on CPU; missing members read as b""."""
    count = _dataset(shards)["splits"][split]["samples"]

    @pipeline_def(batch_size=count, num_threads=1, device_id=None)
    def read():
        return tuple(fn.readers.webdataset(
            paths=_shard_paths(shards, split, "tar"), index_paths=_shard_paths(shards, split, "index"),
            ext=extensions, missing_component_behavior="empty"))

    pipe = read()
    pipe.build()
    outputs = pipe.run()
    columns = [[np.array(output.at(i)).tobytes() for i in range(count)] for output in outputs]
    rows = [dict(zip(extensions, values)) for values in zip(*columns)]
    return {json.loads(row["json"])["key"]: row for row in rows}


def _write_manifest(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _synthetic_records(manifest: Path, count: int) -> list[dict]:
    """The first `count` records of a synthetic manifest, with absolute paths so they move anywhere."""
    records = [json.loads(line) for line in manifest.read_text().splitlines()[:count]]
    for record in records:
        for name in ("rgb", "audio"):
            record[name] = str(manifest.parent / record[name])
    return records


# --- reading back ---------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_webdataset_and_dali_read_identical_samples_matching_dataset_json(tiny_shards, split):
    dataset = _dataset(tiny_shards)
    from_wds = _wds_samples(tiny_shards, split)
    from_dali = _dali_samples(tiny_shards, split, MEMBERS)
    assert from_wds == from_dali
    assert len(from_wds) == dataset["splits"][split]["samples"] > 0
    for shard in dataset["splits"][split]["shards"]:
        data = (tiny_shards / shard["tar"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]


def test_splits_and_shards_follow_the_corpus(tiny_shards, synthetic_manifest):
    dataset = _dataset(tiny_shards)
    assert {split: s["samples"] for split, s in dataset["splits"].items()} == {"train": 22, "val": 5, "test": 5}
    assert [s["tar"] for s in dataset["splits"]["train"]["shards"]] == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert dataset["rejects"] == 0 and (tiny_shards / "rejects.jsonl").read_text() == ""
    assert dataset["label"] == {"type": "class", "num_classes": 6, "names": None}
    assert not list(tiny_shards.glob("*.tmp"))


def test_index_equals_dali_wds2idx_output(tiny_shards, tmp_path):
    for split in ("train", "val", "test"):
        for shard in _dataset(tiny_shards)["splits"][split]["shards"]:
            reference = tmp_path / shard["index"]
            subprocess.run([str(WDS2IDX), str(tiny_shards / shard["tar"]), str(reference)], check=True,
                           capture_output=True)
            assert (tiny_shards / shard["index"]).read_bytes() == reference.read_bytes()


def test_tar_members_have_fixed_metadata(tiny_shards):
    with tarfile.open(tiny_shards / "val-000000.tar") as tar:
        for member in tar.getmembers():
            assert (member.mtime, member.uid, member.gid, member.mode, member.uname, member.gname) == (
                0, 0, 0, 0o644, "", "")


def _dali_decoded_videos(shards: Path, split: str, extension: str) -> list[np.ndarray]:
    """Every video member of a split, decoded by DALI's CPU video decoder."""
    count = _dataset(shards)["splits"][split]["samples"]

    @pipeline_def(batch_size=count, num_threads=1, device_id=None)
    def decode():
        video = fn.readers.webdataset(paths=_shard_paths(shards, split, "tar"),
                                      index_paths=_shard_paths(shards, split, "index"), ext=[extension])
        return fn.decoders.video(video, device="cpu")

    pipe = decode()
    pipe.build()
    (frames,) = pipe.run()
    return [np.array(frames.at(i)) for i in range(count)]


def test_dali_decodes_stored_vp9_video_on_cpu(tiny_shards):
    rgb = _dataset(tiny_shards)["modalities"]["rgb"]
    for clip in _dali_decoded_videos(tiny_shards, "val", "rgb.webm"):
        assert clip.shape == (rgb["frames"], rgb["height"], rgb["width"], 3) and clip.dtype == np.uint8


def test_sample_json_and_members_list_only_present_modalities(shards_with_gaps):
    samples = _wds_samples(shards_with_gaps["shards"], "train")
    no_audio, no_text = samples[shards_with_gaps["no_audio"]], samples[shards_with_gaps["no_text"]]
    assert set(no_audio) == {"json", "rgb.webm", "text.txt", "text.ids"}
    assert json.loads(no_audio["json"])["present"] == ["rgb", "text"]
    assert set(no_text) == {"json", "rgb.webm", "audio.wav"}
    assert json.loads(no_text["json"])["present"] == ["rgb", "audio"]
    dali = _dali_samples(shards_with_gaps["shards"], "train", MEMBERS)
    assert dali[shards_with_gaps["no_audio"]]["audio.wav"] == b""


# --- rejects, determinism ---------------------------------------------------------------------------

def test_corrupt_and_missing_inputs_are_rejected_and_the_rest_converted(synthetic_manifest, tmp_path):
    records = _synthetic_records(synthetic_manifest, 8)
    truncated, noise = tmp_path / "truncated.mp4", tmp_path / "noise.wav"
    truncated.write_bytes(Path(records[1]["rgb"]).read_bytes()[:300])
    noise.write_bytes(np.random.default_rng(0).bytes(4000))
    records[1]["rgb"], records[2]["audio"] = str(truncated), str(noise)
    records[3]["rgb"] = str(tmp_path / "absent.mp4")
    out = tmp_path / "shards"
    dataset = build_shards(_write_manifest(tmp_path / "manifest.jsonl", records), out=out)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted((r["line"], r["key"], r["modality"]) for r in rejects) == [
        (2, records[1]["key"], "rgb"), (3, records[2]["key"], "audio"), (4, records[3]["key"], "rgb")]
    assert all(r["reason"] for r in rejects) and dataset["rejects"] == 3
    stored = {key for split in dataset["splits"] for key in _wds_samples(out, split)}
    assert stored == {r["key"] for i, r in enumerate(records) if i not in (1, 2, 3)}


def test_a_split_whose_samples_are_all_rejected_has_no_shards(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF....not audio")
    manifest = _write_manifest(tmp_path / "m.jsonl", [{"key": "a", "split": "train", "label": 0, "audio": "bad.wav"}])
    dataset = build_shards(manifest, out=tmp_path / "out", workers=1)
    assert dataset["splits"]["train"] == {"samples": 0, "shards": []} and dataset["rejects"] == 1
    assert not list((tmp_path / "out").glob("*.tar"))


def test_building_twice_gives_identical_shards(synthetic_manifest, tiny_shards, tmp_path):
    again = build_shards(synthetic_manifest, out=tmp_path / "again", max_shard_samples=8, workers=1)
    assert again == _dataset(tiny_shards)


def test_synthetic_corpus_is_deterministic_for_any_worker_count(tmp_path):
    first = write_synthetic_corpus(tmp_path / "a", n=6, seed=3, workers=1)
    second = write_synthetic_corpus(tmp_path / "b", n=6, seed=3, workers=2)
    assert first.read_text() == second.read_text()
    for path in (first.parent / "video").iterdir():
        assert path.read_bytes() == (second.parent / "video" / path.name).read_bytes()
    record = json.loads(first.read_text().splitlines()[0])
    assert set(record) == {"key", "split", "label", "rgb", "audio", "text"}


# --- other codecs and sizes ---------------------------------------------------------------------------

@pytest.mark.parametrize("codec,extension", [("mjpeg", "avi"), ("h264", "mp4")])
def test_other_codecs_store_exactly_the_requested_frames(synthetic_manifest, tmp_path, codec, extension):
    manifest = _write_manifest(tmp_path / "m.jsonl", _synthetic_records(synthetic_manifest, 2))
    out = tmp_path / "out"
    dataset = build_shards(manifest, out=out, codec=codec, frames=5, height=24, width=40, workers=1)
    assert dataset["modalities"]["rgb"]["ext"] == f"rgb.{extension}"
    for sample in (s for split in dataset["splits"] for s in _wds_samples(out, split).values()):
        probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                                "stream=nb_read_frames,width,height", "-of", "csv=p=0", "pipe:"],
                               input=sample[f"rgb.{extension}"], capture_output=True, check=True)
        assert probe.stdout.decode().strip() == "40,24,5"
    if codec == "mjpeg":  # DALI's CPU decoder reads MJPEG too (H.264 needs NVDEC)
        split = next(split for split, s in dataset["splits"].items() if s["samples"])
        assert all(clip.shape == (5, 24, 40, 3) for clip in _dali_decoded_videos(out, split, "rgb.avi"))


def test_short_clips_repeat_their_last_frame_and_empty_clips_fail():
    assert pick_frame_indices(3, 5).tolist() == [0, 1, 2, 2, 2]
    assert pick_frame_indices(16, 8).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    with pytest.raises(TranscodeError, match="no decodable video frames"):
        pick_frame_indices(0, 8)


# --- text ---------------------------------------------------------------------------------------------

def test_tokenizer_learns_only_train_words(tmp_path):
    (tmp_path / "note.txt").write_text("Alpha from a file")
    manifest = _write_manifest(tmp_path / "m.jsonl", [
        {"key": "a", "split": "train", "label": 0, "text": "alpha beta beta"},
        {"key": "b", "split": "train", "label": 1, "text": "note.txt"},
        {"key": "c", "split": "val", "label": 1, "text": "beta gamma"},
    ])
    out = tmp_path / "out"
    dataset = build_shards(manifest, out=out, max_tokens=4, workers=1)
    text = dataset["modalities"]["text"]
    assert text["vocab_size"] == 2 + 5 and (out / text["tokenizer"]).exists()
    val = _wds_samples(out, "val")["c"]
    ids = np.frombuffer(val["text.ids"], dtype="<i4")
    assert ids[1] == 1 and ids[2:].tolist() == [0, 0] and ids[0] > 1  # gamma is [UNK], then [PAD]
    assert _wds_samples(out, "train")["b"]["text.txt"] == b"Alpha from a file"


# --- manifest validation ------------------------------------------------------------------------------

GOOD = {"key": "k1", "split": "train", "label": 0, "text": "hello"}


@pytest.mark.parametrize("bad_line,message", [
    ("{not json", "not valid JSON"),
    ('["a", "list"]', "expected a JSON object"),
    ({"split": "train", "label": 0}, "missing 'key'"),
    ({"key": "k2", "label": 0}, "missing 'split'"),
    ({"key": "k2", "split": "train"}, "missing 'label'"),
    ({"key": "k1", "split": "train", "label": 0}, r"duplicate key 'k1' \(first on line 1\)"),
    ({"key": "k.2", "split": "train", "label": 0}, "key 'k.2' is invalid"),
    ({"key": "k 2", "split": "train", "label": 0}, "key 'k 2' is invalid"),
    ({"key": "k2", "split": "../up", "label": 0}, "split '../up' is invalid"),
    ({"key": "k2", "split": "train", "label": -1}, "label -1 is invalid"),
    ({"key": "k2", "split": "train", "label": "3"}, "label '3' is invalid"),
    ({"key": "k2", "split": "train", "label": True}, "label True is invalid"),
    ({"key": "k2", "split": "train", "label": 0, "2d": "x"}, "modality name '2d' is invalid"),
    ({"key": "k2", "split": "train", "label": 0, "rgb-x": "x"}, "modality name 'rgb-x' is invalid"),
    ({"key": "k2", "split": "train", "label": 0, "rgb": "../clip.mp4"}, "escapes the manifest's folder"),
    ({"key": "k2", "split": "train", "label": 0, "text": ["a"]}, "is list"),
    ({"key": "k2", "split": "train", "label": 0, "text": "clip.mp4"}, "looks like video, but line 1 made it text"),
])
def test_structural_errors_name_line_and_problem(tmp_path, bad_line, message):
    manifest = _write_manifest(tmp_path / "m.jsonl", [GOOD, "", bad_line])
    with pytest.raises(ManifestError, match=rf"line 3: .*{message}"):
        read_manifest(manifest)


@pytest.mark.parametrize("kinds,message", [
    ({"text": "image"}, "--modality text=image: unknown kind 'image'; use one of video, audio, text"),
    ({"txt": "text"}, "--modality txt=text: no manifest line has a field 'txt'"),
])
def test_bad_modality_option_names_the_option(tmp_path, kinds, message):
    manifest = _write_manifest(tmp_path / "m.jsonl", [GOOD])
    with pytest.raises(ManifestError, match=message):
        read_manifest(manifest, modality_kinds=kinds)


def test_kind_inference_and_override(tmp_path):
    manifest = _write_manifest(tmp_path / "m.jsonl", [
        {"key": "a", "split": "train", "label": 0, "rgb": "v/a.MKV", "audio": "a.flac", "text": "t.txt",
         "sound": "v/a.mp4", "note": "free text"},
        {"key": "b", "split": "val", "label": 2, "rgb": None, "audio": "/abs/b.wav", "sound": None},
    ])
    parsed = read_manifest(manifest, modality_kinds={"sound": "audio"})
    assert parsed.kinds == {"rgb": "video", "audio": "audio", "text": "text", "sound": "audio", "note": "text"}
    first, second = parsed.samples
    assert first.values["rgb"] == tmp_path / "v/a.MKV" and first.values["note"] == "free text"
    assert first.values["text"] == tmp_path / "t.txt"
    assert set(second.values) == {"audio"} and second.line == 2


def test_cli_reports_manifest_errors_in_one_line_before_any_work(tmp_path):
    manifest = _write_manifest(tmp_path / "m.jsonl", [GOOD, {"key": "k1", "split": "val", "label": 1}])
    result = CliRunner().invoke(shards_group, ["build", str(manifest), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "Error: line 2: duplicate key 'k1' (first on line 1); keys must be unique."]
    assert not (tmp_path / "out").exists()


def test_cli_build_prints_a_summary(tmp_path):
    manifest = _write_manifest(tmp_path / "m.jsonl", [GOOD, {"key": "k2", "split": "val", "label": 1, "text": "x"}])
    result = CliRunner().invoke(shards_group, ["build", str(manifest), "--out", str(tmp_path / "out"),
                                               "--workers", "1", "--size", "16x16"])
    assert result.exit_code == 0, result.output
    assert "Built 2 samples (train 1, val 1) into 2 shards" in result.output and "0 rejected" in result.output


def test_cli_rejects_malformed_options(tmp_path):
    manifest = _write_manifest(tmp_path / "m.jsonl", [GOOD])
    for args, message in ((["--modality", "text"], "is not NAME=KIND"), (["--size", "32"], "is not HxW"),
                          (["--height", "31"], "height is 31; use an even size")):
        result = CliRunner().invoke(shards_group, ["build", str(manifest), "--out", str(tmp_path / "o"), *args])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output

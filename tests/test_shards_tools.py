"""shards/: verify, inspect, --part and merge."""
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from shards.build import BuildError, build_shards
from shards.cli import shards_group
from shards.merge import merge_parts
from shards.summary import export_sample, summarize_shards
from shards.verify import verify_shards


@pytest.fixture()
def shards_copy(tiny_shards, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_shards, tmp_path / "shards"))


def test_verify_passes_on_a_sound_build_and_names_each_problem(shards_copy):
    assert verify_shards(shards_copy, full=True, progress=False) == []
    tar = shards_copy / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # inside the first member's data: the tar still parses, the hash does not match
    tar.write_bytes(bytes(data))
    index = shards_copy / "val-000000.idx"
    index.write_text(index.read_text().replace(" 512 ", " 1024 ", 1))
    (shards_copy / "test-000000.tar").unlink()
    problems = verify_shards(shards_copy, progress=False)
    assert any(p.startswith(str(tar)) and "sha256" in p for p in problems)
    assert any(p.startswith(str(index)) and "does not match its tar" in p for p in problems)
    assert any(p == f"{shards_copy / 'test-000000.tar'}: missing" for p in problems)
    result = CliRunner().invoke(shards_group, ["verify", str(shards_copy)])
    assert result.exit_code == 1 and "problem(s)" in result.output


def test_verify_decodes_members_against_the_spec(shards_copy):
    dataset = json.loads((shards_copy / "dataset.json").read_text())
    dataset["modalities"]["rgb"]["frames"] = 9  # the stored clips have 8
    (shards_copy / "dataset.json").write_text(json.dumps(dataset))
    problems = verify_shards(shards_copy, progress=False)
    assert problems and all("rgb.webm: decodes to 8 frames of 32x32, expected 9" in p for p in problems)


def test_inspect_counts_splits_classes_and_coverage(shards_with_gaps):
    summary = summarize_shards(shards_with_gaps["shards"])
    train = summary["splits"]["train"]
    assert train["samples"] == 22 and sum(train["labels"].values()) == 22
    assert train["coverage"] == {"rgb": 22, "audio": 21, "text": 21}
    assert summary["durations_s"] == {"rgb": 1.0, "audio": 1.0}
    result = CliRunner().invoke(shards_group, ["inspect", str(shards_with_gaps["shards"])])
    coverage = next(line for line in result.output.splitlines() if line.strip().startswith("coverage: rgb"))
    assert result.exit_code == 0 and {"rgb 22/22", "audio 21/22", "text 21/22"} == set(
        coverage.split(": ", 1)[1].split(", "))
    assert result.output.startswith("label type: class, 6 classes; rejects: 0")


def test_inspect_key_writes_decoded_frames(tiny_shards, tmp_path):
    key = json.loads((tiny_shards / "val-000000.stats.json").read_text())["keys"][0]
    written = export_sample(tiny_shards, key, tmp_path / "sample")
    names = {path.name for path in written}
    assert {f"{key}.json", f"{key}.rgb.webm", f"{key}.audio.wav", f"{key}.text.txt"} <= names
    assert len(list((tmp_path / "sample" / f"{key}.rgb").glob("frame_*.png"))) == 8
    result = CliRunner().invoke(shards_group, ["inspect", str(tiny_shards), "--key", "nope"])
    assert result.exit_code == 1 and "no sample with key 'nope'" in result.output


def _text_manifest(path: Path, count: int) -> Path:
    splits = ["train", "train", "val"]
    path.write_text("".join(json.dumps({"key": f"k{i:02d}", "split": splits[i % 3], "label": i % 4,
                                        "text": f"word{i % 5} other"}) + "\n" for i in range(count)))
    return path


def _keys_in_order(folder: Path, split: str) -> list[str]:
    dataset = json.loads((folder / "dataset.json").read_text())
    return [key for shard in dataset["splits"][split]["shards"]
            for key in json.loads((folder / shard["tar"].replace(".tar", ".stats.json")).read_text())["keys"]]


def test_parts_merge_into_the_whole_builds_order_with_contiguous_shards(tmp_path):
    manifest = _text_manifest(tmp_path / "m.jsonl", 30)
    whole = build_shards(manifest, out=tmp_path / "whole", max_shard_samples=3, workers=1, progress=False)
    parts = []
    for index in range(3):
        parts.append(tmp_path / f"part{index}")
        result = CliRunner().invoke(shards_group, ["build", str(manifest), "--out", str(parts[-1]), "--part",
                                                   f"{index}/3", "--max-shard-samples", "3", "--workers", "1"])
        assert result.exit_code == 0, result.output
    merged = merge_parts(list(reversed(parts)), out=tmp_path / "merged")
    for split in ("train", "val"):
        assert _keys_in_order(tmp_path / "merged", split) == _keys_in_order(tmp_path / "whole", split)
        names = [shard["tar"] for shard in merged["splits"][split]["shards"]]
        assert names == [f"{split}-{n:06d}.tar" for n in range(len(names))]
    assert merged["label"] == whole["label"] and merged["modalities"] == whole["modalities"]
    assert "part" not in merged and verify_shards(tmp_path / "merged", full=True, progress=False) == []
    index = json.loads((tmp_path / "merged" / "shardindex.json").read_text())
    assert sum(s["nsamples"] for s in index["shardlist"]) == whole["splits"]["train"]["samples"]
    with pytest.raises(BuildError, match=r"parts \[0, 2\] of 3 given.*missing: \[1\]"):
        merge_parts([parts[0], parts[2]], out=tmp_path / "bad")
    with pytest.raises(BuildError, match="not a part"):
        merge_parts([tmp_path / "whole"], out=tmp_path / "bad")

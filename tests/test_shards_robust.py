"""shards/: rollover, stats files, resume after kill -9, reject limits and bad inputs."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from shards.build import BuildError, build_shards

REPO = Path(__file__).resolve().parents[1]


def _records(manifest: Path, count: int | None = None) -> list[dict]:
    records = [json.loads(line) for line in manifest.read_text().splitlines()[:count]]
    for record in records:
        record.pop("text")
        for name in ("rgb", "audio"):
            record[name] = str(manifest.parent / record[name])
    return records


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_shards_roll_over_by_bytes_and_each_has_a_stats_file(synthetic_manifest, tmp_path):
    manifest = _jsonl(tmp_path / "m.jsonl", [dict(r, split="train") for r in _records(synthetic_manifest, 10)])
    out = tmp_path / "out"
    limit = 8 * 10240  # a sample is ~37 KB (mostly its 1 s WAV): two fit
    dataset = build_shards(manifest, out=out, max_shard_bytes=limit, workers=1, progress=False)
    shards = dataset["splits"]["train"]["shards"]
    assert len(shards) > 1 and sum(s["samples"] for s in shards) == 10
    assert all(s["bytes"] <= limit for s in shards) and all(s["bytes"] % 10240 == 0 for s in shards)
    consumed = 0
    for shard in shards:
        stats = json.loads((out / shard["tar"].replace(".tar", ".stats.json")).read_text())
        assert {k: stats[k] for k in shard} == shard and len(stats["keys"]) == shard["samples"]
        with tarfile.open(out / shard["tar"]) as tar:
            assert sorted({m.name.split(".")[0] for m in tar.getmembers()}) == sorted(stats["keys"])
        consumed += shard["samples"]
        assert stats["consumed"] == consumed
    index = json.loads((out / "shardindex.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and [s["url"] for s in index["shardlist"]] == [
        s["tar"] for s in shards]
    assert all(len(s["md5sum"]) == 32 and s["nsamples"] > 0 for s in index["shardlist"])


def test_resume_after_kill_9_is_byte_identical_to_an_uninterrupted_build(synthetic_manifest, tmp_path):
    records = _records(synthetic_manifest, 16)
    records[5]["audio"] = str(tmp_path / "missing.wav")  # a reject must survive the crash as well
    manifest = _jsonl(tmp_path / "m.jsonl", records)
    options = ["--max-shard-samples", "2", "--workers", "1"]
    reference = tmp_path / "reference"
    build_shards(manifest, out=reference, max_shard_samples=2, workers=1, progress=False)

    out = tmp_path / "killed"
    command = [sys.executable, "-c", "from shards.cli import shards_group; shards_group()", "build", str(manifest),
               "--out", str(out), *options]
    build = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.stats.json"))) < 2 and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        os.killpg(build.pid, signal.SIGKILL)  # the build and its workers, mid-way
    except ProcessLookupError:
        pass  # it finished first: the assertion below reports that
    build.wait()
    finished = sorted(out.glob("*.stats.json"))
    assert finished and not (out / "dataset.json").exists(), "the kill must land before the build finished"
    kept = {path.name: path.stat().st_mtime_ns for path in finished}

    result = subprocess.run(command + ["--resume"], env=dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert _files(out) == _files(reference)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # finished shards were kept, not redone
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["rejects"] == 1 and sum(s["samples"] for s in dataset["splits"].values()) == len(records) - 1


def test_resume_ignores_shards_of_a_build_with_other_options(synthetic_manifest, tmp_path):
    manifest = _jsonl(tmp_path / "m.jsonl", _records(synthetic_manifest, 6))
    out, reference = tmp_path / "out", tmp_path / "reference"
    build_shards(manifest, out=out, max_shard_samples=2, workers=1, progress=False, seed=1)
    (out / "dataset.json").unlink()
    build_shards(manifest, out=out, max_shard_samples=2, workers=1, progress=False, seed=2, resume=True)
    build_shards(manifest, out=reference, max_shard_samples=2, workers=1, progress=False, seed=2)
    assert _files(out) == _files(reference)


def test_too_many_rejects_fail_the_build_and_write_no_dataset_json(synthetic_manifest, tmp_path):
    records = _records(synthetic_manifest, 4)
    for record in records[:2]:
        record["rgb"] = str(tmp_path / "absent.mp4")
    manifest = _jsonl(tmp_path / "m.jsonl", records)
    with pytest.raises(BuildError, match=r"2 of 4 samples \(50.0%\) were rejected, above --max-reject-fraction 0.25"):
        build_shards(manifest, out=tmp_path / "out", max_reject_fraction=0.25, workers=1, progress=False)
    assert not (tmp_path / "out" / "dataset.json").exists()
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == 2
    assert build_shards(manifest, out=tmp_path / "ok", max_reject_fraction=0.5, workers=1, progress=False)["rejects"] == 2


def test_zero_byte_and_non_media_files_are_rejected_with_the_fix(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.wav").write_text("this is not audio")
    manifest = _jsonl(tmp_path / "m.jsonl", [{"key": "a", "split": "train", "label": 0, "rgb": "empty.mp4"},
                                             {"key": "b", "split": "train", "label": 0, "audio": "notes.wav"}])
    build_shards(manifest, out=tmp_path / "out", workers=1, progress=False)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["modality"]) for r in rejects] == [(1, "rgb"), (2, "audio")]
    assert "file is empty (0 bytes)" in rejects[0]["reason"] and "drop the sample" in rejects[0]["reason"]
    assert rejects[1]["reason"]


@pytest.mark.parametrize("options,message", [
    ({"max_shard_bytes": 100}, "max_shard_bytes is 100; use at least 10240"),
    ({"max_reject_fraction": 1.5}, "max_reject_fraction is 1.5"),
    ({"part": (2, 2)}, "part is 2/2; use I/N with 0 <= I < N"),
    ({"resize": "stretch"}, "resize is 'stretch'; use one of crop, pad"),
    ({"audio_format": "mp3"}, "audio_format is 'mp3'; use one of wav, flac"),
])
def test_bad_options_fail_before_any_work(tmp_path, options, message):
    manifest = _jsonl(tmp_path / "m.jsonl", [{"key": "a", "split": "train", "label": 0, "text": "x"}])
    with pytest.raises(BuildError, match=message):
        build_shards(manifest, out=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()

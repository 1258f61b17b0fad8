"""shards/: what a build may do to its --out folder (shards/out_folder.py), and manifests with a BOM."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ops.cli import main
from shards.build import build_shards
from shards.out_folder import OutFolderError


def _manifest(path: Path, count: int = 4) -> Path:
    records = [{"key": f"s{i}", "split": "train", "label": i % 2, "text": f"words number {i}"} for i in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _build(manifest: Path, out: Path, *args):
    return CliRunner().invoke(main, ["shards", "build", str(manifest), "--out", str(out), "--workers", "1", *args])


def test_a_folder_of_other_files_is_refused_and_overwrite_keeps_them(tmp_path):
    manifest = _manifest(tmp_path / "corpus" / "m.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "train-000000.tar").write_bytes(b"not ours")
    refused = _build(manifest, out)
    assert refused.exit_code != 0 and "notes.txt" in refused.output and "--overwrite" in refused.output
    assert (out / "train-000000.tar").read_bytes() == b"not ours" and not (out / "dataset.json").exists()
    built = _build(manifest, out, "--overwrite")
    assert built.exit_code == 0, built.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "dataset.json").is_file()


def test_a_manifest_or_an_input_inside_out_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    manifest = _manifest(out / "rejects.jsonl")
    before = manifest.read_bytes()
    refused = _build(manifest, out, "--overwrite")
    assert refused.exit_code != 0 and "lies inside --out" in refused.output
    assert manifest.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["rejects.jsonl"]
    inner = tmp_path / "inner.jsonl"
    inner.write_text(json.dumps({"key": "a", "split": "train", "label": 0, "text": "inside/a.txt"}) + "\n")
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "a.txt").write_text("hello")
    with pytest.raises(OutFolderError, match="line 1: text .*a.txt lies inside --out"):
        build_shards(inner, out=tmp_path / "inside", workers=1, progress=False, overwrite=True)


def test_a_build_of_the_same_inputs_is_rebuilt_and_one_of_other_inputs_refused(tmp_path):
    manifest = _manifest(tmp_path / "corpus" / "m.jsonl")
    out = tmp_path / "out"
    build_shards(manifest, out=out, workers=1, progress=False)
    build_shards(manifest, out=out, workers=1, progress=False)  # same inputs: the same build again
    with pytest.raises(OutFolderError, match="holds a build of other inputs or options"):
        build_shards(manifest, out=out, workers=1, progress=False, seed=7)
    build_shards(manifest, out=out, workers=1, progress=False, seed=7, overwrite=True)
    assert json.loads((out / "dataset.json").read_text())["seed"] == 7


def test_a_manifest_with_a_utf8_byte_order_mark_is_read(tmp_path):
    from shards.manifest import read_manifest

    jsonl = _manifest(tmp_path / "m.jsonl")
    jsonl.write_bytes(b"\xef\xbb\xbf" + jsonl.read_bytes())
    assert [s.key for s in read_manifest(jsonl).samples] == ["s0", "s1", "s2", "s3"]
    csv = tmp_path / "m.csv"
    csv.write_bytes(b"\xef\xbb\xbfkey,split,label,text\r\na,train,0,hello\r\n")
    assert read_manifest(csv).samples[0].key == "a"

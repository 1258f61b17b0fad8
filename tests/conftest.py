"""Shared fixtures: a tiny synthetic corpus and the shard directories built from it, once per session."""
import json
from pathlib import Path

import pytest

from shards.build import build_shards
from shards.synth import write_synthetic_corpus

TINY_CORPUS_SAMPLES = 32  # 22 train / 5 val / 5 test
TINY_SHARD_SAMPLES = 8  # several shards per split, so rollover and multi-shard readers are exercised


@pytest.fixture(scope="session")
def synthetic_manifest(tmp_path_factory) -> Path:
    """manifest.jsonl of a 32-sample synthetic corpus (rgb, audio, text; 6 classes)."""
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), n=TINY_CORPUS_SAMPLES, seed=0, workers=2)


@pytest.fixture(scope="session")
def tiny_shards(synthetic_manifest, tmp_path_factory) -> Path:
    """A shard directory (default options, vp9) built from `synthetic_manifest`."""
    out = tmp_path_factory.mktemp("shards")
    build_shards(synthetic_manifest, out=out, max_shard_samples=TINY_SHARD_SAMPLES, workers=2)
    return out


@pytest.fixture(scope="session")
def shards_with_gaps(synthetic_manifest, tmp_path_factory) -> dict:
    """Shards in which one train sample has `"audio": null` and another has no "text" field at all."""
    records = [json.loads(line) for line in synthetic_manifest.read_text().splitlines()]
    train = [record for record in records if record["split"] == "train"]
    train[0]["audio"] = None
    del train[1]["text"]
    manifest = synthetic_manifest.with_name("manifest-gaps.jsonl")
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records))
    out = tmp_path_factory.mktemp("shards-gaps")
    build_shards(manifest, out=out, max_shard_samples=TINY_SHARD_SAMPLES, workers=2)
    return {"shards": out, "no_audio": train[0]["key"], "no_text": train[1]["key"]}


@pytest.fixture(scope="session")
def tiny_shards_with_gap(shards_with_gaps) -> tuple[Path, str]:
    """(shard directory, key of the train sample that lacks audio but has rgb)."""
    return shards_with_gaps["shards"], shards_with_gaps["no_audio"]

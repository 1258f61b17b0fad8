"""Tiny shard directories for the pipeline tests, written with shards.writer.ShardWriter: every member
kind of the contract (VP9 video copied from the tiny corpus, uint16 depth, float32 feature sequences,
FLAC audio, token ids) and every label type."""
from __future__ import annotations

import io
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import webdataset as wds

from shards.writer import ShardWriter

DEPTH = {"kind": "depth", "ext": "depth.npy", "dtype": "uint16", "frames": 8, "height": 32, "width": 32,
         "max_value": 65535}
FEATURES = {"kind": "features", "ext": "feat.npy", "dtype": "float32", "dim": 6, "max_frames": 5}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def flac_from_wav(wav: bytes) -> bytes:
    """Through a file: a FLAC written to a pipe lacks its sample count, which DALI's decoder needs."""
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder, "a.flac")
        command = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", "pipe:", str(target)]
        subprocess.run(command, input=wav, capture_output=True, check=True)
        return target.read_bytes()


def label_of(i: int, label_type: str):
    if label_type == "class":
        return i % 3
    if label_type == "regression":
        return [i / 10, -i / 5]
    return sorted({i % 4, (i * 3) % 4})


LABELS = {"class": {"type": "class", "num_classes": 3, "names": None}, "regression": {"type": "regression", "dim": 2},
          "multilabel": {"type": "multilabel", "num_classes": 4, "names": None}}


def write_rich_shards(tiny_shards: Path, out: Path, *, label_type: str = "class", samples: int = 10,
                      per_shard: int = 4, audio_format: str = "flac") -> Path:
    """`samples` train samples (from tiny_shards' train split) with rgb, depth, features, audio, text.
    Sample 1 lacks depth, sample 2 lacks features; feature lengths vary, one is longer than max_frames."""
    source = json.loads((tiny_shards / "dataset.json").read_text())
    tars = [str(tiny_shards / s["tar"]) for s in source["splits"]["train"]["shards"]]
    originals = list(wds.WebDataset(tars, shardshuffle=False))[:samples]
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    with ShardWriter(out, prefix="train", max_samples=per_shard) as writer:
        for i, original in enumerate(originals):
            key = original["__key__"]
            members = {"json": json.dumps({"key": key, "split": "train", "label": label_of(i, label_type)}).encode(),
                       "rgb.webm": original["rgb.webm"]}
            if i != 1:
                members["depth.npy"] = npy_bytes(rng.integers(0, 65536, size=(8, 32, 32), dtype=np.uint16))
            if i != 2:
                frames = 7 if i == 3 else 1 + i % 5
                members["feat.npy"] = npy_bytes(rng.standard_normal((frames, 6)).astype(np.float32))
            wav = original["audio.wav"]
            members["audio." + audio_format] = flac_from_wav(wav) if audio_format == "flac" else wav
            members["text.ids"] = original["text.ids"]
            writer.write(key, members)
    records = writer.records
    modalities = {"rgb": source["modalities"]["rgb"], "depth": DEPTH, "feat": FEATURES,
                  "audio": dict(source["modalities"]["audio"], ext="audio." + audio_format, format=audio_format),
                  "text": source["modalities"]["text"]}
    description = {"format": "cotrain-shards", "version": 1, "seed": 0, "label": LABELS[label_type],
                   "modalities": modalities,
                   "splits": {"train": {"samples": len(originals), "shards": [r.as_dict() for r in records]}},
                   "rejects": 0}
    (out / "dataset.json").write_text(json.dumps(description))
    return out

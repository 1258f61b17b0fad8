"""Summarize a shard directory (samples per split and class, durations, bytes, coverage) and export samples."""
from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np

from shards.transcode import QUIET
from shards.verify import decode_member, read_samples

__all__ = ["export_sample", "format_summary", "summarize_shards"]


def summarize_shards(folder: Path | str) -> dict:
    """Per split: samples, shards, bytes, label counts (or regression range) and modality coverage."""
    folder = Path(folder)
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    splits = {}
    for split, content in dataset["splits"].items():
        labels, present = [], Counter()
        for shard in content["shards"]:
            with open(folder / shard["tar"], "rb") as file:
                for members in read_samples(file).values():
                    meta = json.loads(members["json"])
                    labels.append(meta["label"])
                    present.update(meta["present"])
        splits[split] = {"samples": content["samples"], "shards": len(content["shards"]),
                         "bytes": sum(shard["bytes"] for shard in content["shards"]),
                         "labels": _label_summary(labels, dataset["label"]),
                         "coverage": {name: present[name] for name in dataset["modalities"]}}
    return {"splits": splits, "durations_s": _durations(dataset["modalities"]), "rejects": dataset["rejects"],
            "label_type": dataset["label"]["type"], "num_classes": dataset["label"].get("num_classes")}


def _label_summary(labels: list, spec: dict) -> dict:
    if spec["type"] == "regression":
        values = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
        if not len(values):
            return {}
        return {"min": values.min(0).round(4).tolist(), "mean": values.mean(0).round(4).tolist(),
                "max": values.max(0).round(4).tolist()}
    ids = [i for label in labels for i in (label if spec["type"] == "multilabel" else [label])]
    names = spec.get("names")
    counts = Counter(ids)
    return {(names[i] if names else str(i)): counts[i] for i in sorted(counts)}


def _durations(modalities: dict) -> dict:
    """Stored clip length of each timed modality (fixed by the build options)."""
    durations = {}
    for name, spec in modalities.items():
        if spec["kind"] in ("video", "depth") and spec.get("fps"):
            durations[name] = round(spec["frames"] * spec.get("stride", 1) / spec["fps"], 3)
        elif spec["kind"] == "audio":
            durations[name] = round(spec["samples"] / spec["sample_rate"], 3)
    return durations


def format_summary(summary: dict) -> str:
    classes = f", {summary['num_classes']} classes" if summary.get("num_classes") else ""
    lines = [f"label type: {summary['label_type']}{classes}; rejects: {summary['rejects']}; stored durations (s): "
             + ", ".join(f"{k} {v}" for k, v in summary["durations_s"].items())]
    for split, content in summary["splits"].items():
        lines.append(f"{split}: {content['samples']} samples in {content['shards']} shards "
                     f"({content['bytes'] / 1e6:.2f} MB)")
        lines.append("  labels: " + ", ".join(f"{k}={v}" for k, v in content["labels"].items()))
        lines.append("  coverage: " + ", ".join(
            f"{name} {count}/{content['samples']}" for name, count in content["coverage"].items()))
    return "\n".join(lines)


def export_sample(folder: Path | str, key: str, out: Path | str) -> list[Path]:
    """Write sample `key`'s members and decoded media (PNG frames, WAV, .npy/.csv, text) under `out`."""
    folder, out = Path(folder), Path(out)
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    members = _find_sample(folder, dataset, key)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for extension, data in members.items():
        path = out / f"{key}.{extension}"
        path.write_bytes(data)
        written.append(path)
    meta = json.loads(members["json"])
    for name in meta["present"]:
        written += _export_decoded(name, dataset["modalities"][name], members, out / f"{key}.{name}")
    return written


def _find_sample(folder: Path, dataset: dict, key: str) -> dict[str, bytes]:
    for content in dataset["splits"].values():
        for shard in content["shards"]:
            stats = folder / shard["tar"].replace(".tar", ".stats.json")
            if stats.exists() and key not in json.loads(stats.read_text())["keys"]:
                continue  # the stats file lists the shard's keys: skip reading shards without it
            with open(folder / shard["tar"], "rb") as file:
                samples = read_samples(file)
            if key in samples:
                return samples[key]
    raise KeyError(f"no sample with key {key!r} in {folder}; list keys with `cotrain shards inspect`")


def _export_decoded(name: str, spec: dict, members: dict[str, bytes], stem: Path) -> list[Path]:
    from PIL import Image
    data = members[spec["ext"]]
    if spec["kind"] in ("video", "depth"):
        frames = decode_member(data, spec)
        stem.mkdir(exist_ok=True)
        paths = [stem / f"frame_{index:04d}.png" for index in range(len(frames))]
        for frame, path in zip(frames, paths):
            Image.fromarray(frame).save(path)  # uint16 depth is written as a 16-bit PNG
        return paths
    if spec["kind"] == "audio" and spec.get("format") == "flac":
        path = stem.with_name(stem.name + ".decoded.wav")  # stem is KEY.NAME: keep NAME
        subprocess.run(["ffmpeg", *QUIET, "-i", "pipe:", str(path)], input=data, check=True, capture_output=True)
        return [path]
    if spec["kind"] == "features":
        path = stem.with_name(stem.name + ".csv")
        np.savetxt(path, decode_member(data, spec), delimiter=",", fmt="%.6g")
        return [path]
    return []

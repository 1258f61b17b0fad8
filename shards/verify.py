"""Check a built shard directory against its dataset.json: hashes, indexes, counts and decodable members."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import wave
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shards.transcode import QUIET, summarize_stderr
from shards.writer import INDEX_VERSION

__all__ = ["decode_member", "index_from_tar", "read_samples", "verify_shards"]


def verify_shards(folder: Path | str, *, full: bool = False, progress: bool = True) -> list[str]:
    """Every problem found, one line each (empty when the directory is sound).

    Re-hashes every shard, compares every .idx with one rebuilt from its tar, checks sample counts, and
    decodes the first sample of each shard (every sample with `full`).
    """
    folder = Path(folder)
    try:
        dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return [f"{folder / 'dataset.json'}: cannot read it ({error}); rebuild or finish the build with --resume"]
    shards = [(split, shard) for split, content in dataset["splits"].items() for shard in content["shards"]]
    problems = []
    for split, content in dataset["splits"].items():
        stored = sum(shard["samples"] for shard in content["shards"])
        if stored != content["samples"]:
            problems.append(f"split {split}: dataset.json says {content['samples']} samples, its shards hold {stored}")
    for split, shard in tqdm(shards, desc="verifying", unit="shard", disable=not progress):
        problems += _verify_shard(folder, dataset, shard, full=full)
    return problems


def _verify_shard(folder: Path, dataset: dict, shard: dict, *, full: bool) -> list[str]:
    tar = folder / shard["tar"]
    if not tar.is_file():
        return [f"{tar}: missing"]
    data = tar.read_bytes()
    problems = []
    if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
        problems.append(f"{tar}: sha256 or size differs from dataset.json (the file changed or is truncated)")
    try:
        rebuilt = index_from_tar(io.BytesIO(data))
    except tarfile.TarError as error:
        return problems + [f"{tar}: not a readable tar ({error})"]
    index = folder / shard["index"]
    if not index.is_file() or index.read_text(encoding="utf-8") != rebuilt:
        problems.append(f"{index}: does not match its tar; regenerate it (it must equal DALI's wds2idx output)")
    samples = read_samples(io.BytesIO(data))
    if len(samples) != shard["samples"]:
        problems.append(f"{tar}: holds {len(samples)} samples, dataset.json says {shard['samples']}")
    for key, members in (samples.items() if full else list(samples.items())[:1]):
        problems += [f"{tar}: sample {key}: {problem}" for problem in _check_sample(members, dataset)]
    return problems


def index_from_tar(file) -> str:
    """The DALI index (wds2idx format) of a tar: `v1.2 N`, then one line per sample."""
    lines, current, components = [], None, []
    with tarfile.open(fileobj=file, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, extension = base.partition(".")
            if key != current and components:
                lines.append(" ".join(components))
                components = []
            current = key
            components.append(f"{extension} {member.offset_data} {member.size} {member.name}")
    if components:
        lines.append(" ".join(components))
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def read_samples(file) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, in stored order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=file, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                key, _, extension = member.name.rsplit("/", 1)[-1].partition(".")
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def _check_sample(members: dict[str, bytes], dataset: dict) -> list[str]:
    try:
        meta = json.loads(members["json"])
    except (KeyError, ValueError):
        return ["no readable .json member"]
    problems = []
    for name in meta.get("present", []):
        spec = dataset["modalities"].get(name)
        if spec is None:
            problems.append(f"present modality {name!r} is not in dataset.json")
            continue
        data = members.get(spec["ext"])
        if data is None:
            problems.append(f"member {spec['ext']} is missing")
            continue
        try:
            decode_member(data, spec)
        except ValueError as error:
            problems.append(f"{spec['ext']}: {error}")
    return problems


def decode_member(data: bytes, spec: dict):
    """Decode one member as its modality spec says; raise ValueError when it does not match the spec."""
    kind = spec["kind"]
    if kind == "video":
        raw = _ffmpeg_decode(data, ["-f", "rawvideo", "-pix_fmt", "rgb24"])
        frame = spec["height"] * spec["width"] * 3
        if len(raw) != spec["frames"] * frame:
            raise ValueError(f"decodes to {len(raw) / frame:g} frames of {spec['height']}x{spec['width']}, "
                             f"expected {spec['frames']}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(spec["frames"], spec["height"], spec["width"], 3)
    if kind == "audio":
        pcm = _wav_samples(data) if spec.get("format", "wav") == "wav" else np.frombuffer(
            _ffmpeg_decode(data, ["-f", "s16le"]), dtype="<i2")
        if pcm.size != spec["samples"]:
            raise ValueError(f"holds {pcm.size} samples, expected {spec['samples']}")
        return pcm
    if kind in ("depth", "features"):
        return _check_npy(data, spec)
    if kind == "text":
        ids = np.frombuffer(data, dtype="<i4")
        if ids.size != spec["max_tokens"] or (ids < 0).any() or (ids >= spec["vocab_size"]).any():
            raise ValueError(f"expected {spec['max_tokens']} token ids below {spec['vocab_size']}")
        return ids
    raise ValueError(f"unknown modality kind {kind!r}")


def _check_npy(data: bytes, spec: dict) -> np.ndarray:
    if data[6:8] != b"\x01\x00":
        raise ValueError("not npy format version 1.0")
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.dtype(spec["dtype"]):
        raise ValueError(f"dtype {array.dtype}, expected {spec['dtype']}")
    if spec["kind"] == "depth":
        expected = (spec["frames"], spec["height"], spec["width"])
        if array.shape != expected:
            raise ValueError(f"shape {array.shape}, expected {expected}")
    elif array.ndim != 2 or array.shape[1] != spec["dim"] or not 1 <= array.shape[0] <= spec["max_frames"]:
        raise ValueError(f"shape {array.shape}, expected (1..{spec['max_frames']}, {spec['dim']})")
    return array


def _wav_samples(data: bytes) -> np.ndarray:
    try:
        with wave.open(io.BytesIO(data)) as wav:
            if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
                raise ValueError("not mono 16-bit PCM")
            return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    except (wave.Error, EOFError) as error:
        raise ValueError(f"not a readable WAV file ({error})") from None


def _ffmpeg_decode(data: bytes, output: list[str]) -> bytes:
    completed = subprocess.run(["ffmpeg", *QUIET, "-i", "pipe:", *output, "pipe:"], input=data,
                               capture_output=True, check=False)
    if completed.returncode != 0:
        raise ValueError(f"does not decode: {summarize_stderr(completed.stderr)}")
    return completed.stdout

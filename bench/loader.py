"""Loader throughput on the same shards, in one run; prints one JSON object.

    .venv/bin/python bench/loader.py [--shards DIR] [--n 500] [--processes 2] [--batch-size 16]

Without --shards it synthesises an n-sample corpus (video + audio) and builds VP9 shards first.
Three rates over every sample of every split (rgb + audio, one evaluation pass each):
- dali_samples_per_s: the DALI CPU path (pipeline.dali_loader, --processes DALI threads);
- fallback_samples_per_s: the DALI-free loader (--processes DataLoader workers);
- raw_decode_samples_per_s: the floor, ffmpeg decoding the same clips and WAVs to raw samples with
  --processes ffmpeg processes at a time, no features, no batching.
dali_ratio = dali / raw decode. On a shared machine the numbers are noisy: quote ratios from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import LoaderConfig, load_dataset_info, make_loader  # noqa: E402
from pipeline.source import SampleReader  # noqa: E402

FFMPEG = ("ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-i", "pipe:")


def build_corpus(n: int, folder: Path) -> Path:
    from shards.build import build_shards
    from shards.synth import write_synthetic_corpus

    manifest = write_synthetic_corpus(folder / "corpus", n=n, seed=0, workers=os.cpu_count() or 2)
    out = folder / "shards"
    build_shards(manifest, out=out, modality_kinds=None, max_shard_samples=100, workers=os.cpu_count() or 2)
    return out


def loader_rate(info, backend: str, processes: int, batch_size: int) -> float:
    cfg = LoaderConfig(batch_size=batch_size, threads=processes, workers=processes)
    started, samples = time.perf_counter(), 0
    for split in info.splits:
        loader = make_loader(info, split, cfg, modalities=["rgb", "audio"], training=False, backend=backend)
        for batch in loader:
            samples += len(batch)
    return samples / (time.perf_counter() - started)


def _raw_decode(members: dict, video_ext: str, audio_ext: str) -> None:
    for ext, output in ((video_ext, ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]),
                        (audio_ext, ["-f", "f32le", "pipe:"])):
        if ext in members:
            subprocess.run([*FFMPEG, *output], input=members[ext], capture_output=True, check=True)


def raw_decode_rate(info, processes: int) -> float:
    members = []
    for split in info.splits:  # read first: only decoding is timed
        reader = SampleReader(info.shards(split))
        members += [reader.read(i).members for i in range(len(reader))]
    video_ext, audio_ext = info.modalities["rgb"]["ext"], info.modalities["audio"]["ext"]
    started = time.perf_counter()
    with ThreadPoolExecutor(processes) as pool:
        list(pool.map(lambda m: _raw_decode(m, video_ext, audio_ext), members))
    return len(members) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="an existing shard directory with rgb and audio (default: build one)")
    parser.add_argument("--n", type=int, default=500, help="samples to synthesise when --shards is not given")
    parser.add_argument("--processes", type=int, default=2, help="DALI threads = workers = ffmpeg processes")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cotrain-bench-loader-") as folder:
        shards = Path(args.shards) if args.shards else build_corpus(args.n, Path(folder))
        info = load_dataset_info(shards)
        result = {"samples": sum(info.samples(split) for split in info.splits), "processes": args.processes}
        result["raw_decode_samples_per_s"] = raw_decode_rate(info, args.processes)
        result["dali_samples_per_s"] = loader_rate(info, "dali", args.processes, args.batch_size)
        result["fallback_samples_per_s"] = loader_rate(info, "wds", args.processes, args.batch_size)
        result["dali_ratio"] = result["dali_samples_per_s"] / result["raw_decode_samples_per_s"]
        result["note"] = ("one run on a shared machine; absolute rates are noisy, compare the ratio. The raw floor and "
                          "the DALI-free loader start one ffmpeg process per member, which dominates at small clip sizes")
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()

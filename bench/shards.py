"""Shard builder throughput against a raw ffmpeg transcode of the same inputs; prints one JSON object.

    .venv/bin/python bench/shards.py [--samples 500] [--workers 2] [--workdir DIR] [--keep]

Writes a synthetic video + audio corpus (the built-in one without its text), then times, each with the
same number of worker processes:
- the builder: `build_shards` with default options (vp9 32x32, 8 frames at 8 fps, 1 s WAV), including
  manifest checks, the decode check, tar writing, hashing, indexing and stats files;
- raw ffmpeg: one ffmpeg launch per sample that does the same decode, fps/scale/crop, VP9 encode and
  audio resample, writing plain files (no frame selection in numpy, no decode check, no tar);
- the builder again with 1 worker, for `scaling_2_workers` (2 workers / 1 worker; needs --workers 2).
A 20-sample warm-up build and a read of the whole corpus come first, untimed.
Goals: ratio >= 0.8, scaling_2_workers >= 1.7. Numbers from a loaded or shared machine are noisy: the
output carries the 1-minute load average before and after.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This file is bench/shards.py: drop bench/ from the path so `shards` is the package, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from shards.build import build_shards
from shards.synth import write_synthetic_corpus
from shards.transcode import QUIET, VIDEO_CODECS

FPS, FRAMES, SIZE, SAMPLE_RATE = 8, 8, 32, 16000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500, help="Corpus size (the issue's benchmark uses >= 500).")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the corpus here (reused if present).")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cotrain-bench-shards-"))
    load_before = os.getloadavg()[0]
    manifest = _video_audio_manifest(workdir, args.samples)
    _warm_up(manifest, workdir, workers=args.workers)
    builder = _time_builder(manifest, workdir / "shards", workers=args.workers)
    raw = _time_ffmpeg(manifest, workdir / "raw", workers=args.workers)
    result = {"samples": args.samples, "workers": args.workers,
              "builder_samples_per_s": round(args.samples / builder, 2),
              "ffmpeg_samples_per_s": round(args.samples / raw, 2),
              "ratio": round(raw / builder, 3)}
    if args.workers == 2:
        single = _time_builder(manifest, workdir / "shards-1", workers=1)
        result["builder_1_worker_samples_per_s"] = round(args.samples / single, 2)
        result["scaling_2_workers"] = round(single / builder, 3)
    result.update(ffmpeg_launches_per_sample={"builder": 0, "raw": 1}, cpu_count=os.cpu_count(),
                  load_average_1min={"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)})
    print(json.dumps(result))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


def _video_audio_manifest(workdir: Path, samples: int) -> Path:
    """The built-in corpus without text: every sample has an H.264 clip and a WAV file."""
    source = workdir / "corpus" / "manifest.jsonl"
    if not source.exists() or len(source.read_text().splitlines()) != samples:
        write_synthetic_corpus(source.parent, n=samples, seed=0, workers=max(1, os.cpu_count() or 1))
    records = [json.loads(line) for line in source.read_text().splitlines()]
    manifest = source.with_name("video-audio.jsonl")
    manifest.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "text"}) + "\n" for r in records))
    return manifest


def _warm_up(manifest: Path, workdir: Path, *, workers: int) -> None:
    """Read the corpus once and start each tool once, so the first timed run does not pay for a cold cache."""
    head = manifest.with_name("warm-up.jsonl")
    head.write_text("".join(manifest.read_text().splitlines(keepends=True)[:20]))
    _time_builder(head, workdir / "warm-up", workers=workers)
    for path in manifest.parent.rglob("*"):
        if path.is_file():
            path.read_bytes()


def _time_builder(manifest: Path, out: Path, *, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    description = build_shards(manifest, out=out, fps=FPS, frames=FRAMES, height=SIZE, width=SIZE,
                               sample_rate=SAMPLE_RATE, workers=workers, progress=False)
    elapsed = time.perf_counter() - started
    assert description["rejects"] == 0, "the benchmark corpus must convert without rejects"
    return elapsed


def _time_ffmpeg(manifest: Path, out: Path, *, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    tasks = [(str(manifest.parent / r["rgb"]), str(manifest.parent / r["audio"]), str(out / r["key"]))
             for r in records]
    started = time.perf_counter()
    with multiprocessing.get_context("forkserver").Pool(workers) as pool:
        for _ in pool.imap(_raw_transcode, tasks):
            pass
    return time.perf_counter() - started


def _raw_transcode(task: tuple[str, str, str]) -> None:
    """What plain ffmpeg does for one sample: video and audio in one launch, to files."""
    video, audio, target = task
    size = f"{SIZE}:{SIZE}"
    command = ["ffmpeg", *QUIET, "-i", video, "-i", audio,
               "-map", "0:v:0", "-vf", f"fps={FPS},scale={size}:force_original_aspect_ratio=increase:flags=area,"
                                       f"crop={size}",
               "-frames:v", str(FRAMES), *VIDEO_CODECS["vp9"]["options"], "-threads", "1", target + ".webm",
               "-map", "1:a:0", "-ac", "1", "-ar", str(SAMPLE_RATE), "-t", "1", target + ".wav"]
    subprocess.run(command, check=True, capture_output=True)


if __name__ == "__main__":
    main()

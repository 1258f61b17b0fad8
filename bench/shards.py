"""Shard builder throughput against an in-process PyAV transcode of the same sources; prints one JSON object.

    .venv/bin/python bench/shards.py [--sources 300] [--sizes 112,224] [--rounds 1] [--cache /tmp/cotrain-bench]
    .venv/bin/python bench/shards.py --quick        # a few tiny sources, for the test that keeps this running

Corpus: `--sources` camera-like clips (bench/sources.py: 320x240, 3 s, 30 fps H.264 + AAC, cached in --cache).
For each size (SIZExSIZE, 16 frames at 8 fps, VP9; 1 s of 16 kHz mono WAV) and for 1 and 2 processes:
- builder: `build_shards` with those options and that many workers, everything included (manifest checks,
  decode, frame selection, encode, the decode check of every member, tar writing, hashes, indexes, stats);
- floor: a plain PyAV transcode of the same sources in a pool of that many processes: open the clip once, decode
  its video through the same fps/scale/crop filters and its audio track resampled to 16 kHz mono, keep 16
  frames, encode them to VP9 with the builder's encoder options (one thread) and the audio to WAV, in memory
  (the output kept as bytes, no check, no tar).
Both include starting their pool. Every rate is also given per CPU second of the process tree (bench/cpu.py):
on a shared machine the wall-clock ratios also measure the neighbours, the CPU ones only the code. Runs are
interleaved (floor, builder, floor, builder) and each ratio is the
median over --rounds of the builder's rate over the floor's in the same round. Goals: builder / floor >= 0.8,
2 processes / 1 process >= 1.7.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
import wave
from fractions import Fraction
from pathlib import Path

# This file is bench/shards.py: drop bench/ from the path so `shards` is the package, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av  # noqa: E402
import numpy as np  # noqa: E402

from bench.cpu import RATIOS_NOTE, CpuMeter, machine_report  # noqa: E402
from bench.sources import add_corpus_options  # noqa: E402
from shards.build import build_shards  # noqa: E402
from shards.transcode import PYAV_VIDEO, pick_frame_indices  # noqa: E402

GOALS = {"builder_vs_floor": 0.8, "scaling_1_to_2": 1.7}
FPS, SAMPLE_RATE = 8, 16000
FULL = {"sources": 300, "width": 320, "height": 240, "seconds": 3.0, "sizes": "112,224", "frames": 16, "rounds": 1}
QUICK = {"sources": 4, "width": 64, "height": 48, "seconds": 0.5, "sizes": "32", "frames": 4, "rounds": 1}


def builder_seconds(manifest: Path, out: Path, *, size: int, frames: int, workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process tree) of one build."""
    shutil.rmtree(out, ignore_errors=True)
    with CpuMeter() as cpu:
        started = time.perf_counter()
        description = build_shards(manifest, out=out, fps=FPS, frames=frames, height=size, width=size,
                                   sample_rate=SAMPLE_RATE, audio_seconds=1.0, max_shard_samples=100,
                                   workers=workers, progress=False)
        elapsed = time.perf_counter() - started
    if description["rejects"]:
        raise SystemExit(f"the benchmark sources must convert without rejects; see {out}/rejects.jsonl")
    return elapsed, cpu.seconds


def floor_seconds(manifest: Path, *, size: int, frames: int, workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process tree) of the plain PyAV transcode."""
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    tasks = [(str(manifest.parent / r["rgb"]), size, frames) for r in records]
    with CpuMeter() as cpu:
        started = time.perf_counter()
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            kept = list(pool.imap(pyav_transcode, tasks))
        elapsed = time.perf_counter() - started
    assert len(kept) == len(tasks) and all(video and audio for video, audio in kept)
    return elapsed, cpu.seconds


def pyav_transcode(task: tuple[str, int, int]) -> tuple[bytes, bytes]:
    """One source to (VP9 webm bytes, WAV bytes), all in this process: what plain PyAV does for a sample."""
    path, size, frames = task
    with av.open(path) as container:
        video = container.streams.video[0]
        video.thread_count = 1
        graph = av.filter.Graph()
        chain = [graph.add_buffer(template=video), graph.add("fps", str(FPS)),
                 graph.add("scale", f"{size}:{size}:force_original_aspect_ratio=increase:flags=area"),
                 graph.add("crop", f"{size}:{size}"), graph.add("format", "rgb24"), graph.add("buffersink")]
        for source, target in zip(chain, chain[1:]):
            source.link_to(target)
        graph.configure()
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        decoded, pcm = [], []
        for frame in container.decode(video=0, audio=0):
            if isinstance(frame, av.VideoFrame):
                graph.push(frame)
                decoded += _pull_all(graph)
            else:
                pcm += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        graph.push(None)
        decoded += _pull_all(graph)
        pcm += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    chosen = np.stack(decoded)[pick_frame_indices(len(decoded), frames)]
    second = np.zeros(SAMPLE_RATE, dtype=np.int16)  # 1 s, zero-padded as the builder's members are
    kept = np.concatenate(pcm)[:SAMPLE_RATE]
    second[:kept.size] = kept
    return _vp9(chosen), _wav(second)


def _pull_all(graph) -> list[np.ndarray]:
    frames = []
    while True:
        try:
            frames.append(graph.pull().to_ndarray())
        except (av.error.BlockingIOError, av.error.EOFError):
            return frames


def _vp9(frames: np.ndarray) -> bytes:
    codec, pixel_format, options, _ = PYAV_VIDEO["vp9"]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm") as container:
        stream = container.add_stream(codec, rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pixel_format
        stream.thread_count = 1
        stream.options = {"g": str(len(frames)), **options}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _wav(pcm: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(pcm.astype("<i2").tobytes())
    return buffer.getvalue()


def measure_size(manifest: Path, work: Path, *, size: int, frames: int, rounds: int) -> dict:
    """Interleaved floor / builder runs at 2 then 1 processes; ratios per wall second (the goals) and per CPU
    second of the process tree (what a shared machine leaves comparable)."""
    count = len(manifest.read_text().splitlines())
    wall = {p: {"floor": [], "builder": []} for p in (1, 2)}
    per_cpu = {p: {"floor": [], "builder": []} for p in (1, 2)}
    for _ in range(rounds):
        for workers in (2, 1):
            for name in ("floor", "builder"):
                seconds, cpu = floor_seconds(manifest, size=size, frames=frames, workers=workers) \
                    if name == "floor" else builder_seconds(manifest, work / f"shards-{size}-{workers}", size=size,
                                                            frames=frames, workers=workers)
                wall[workers][name].append(count / seconds)
                per_cpu[workers][name].append(count / cpu)
                print(f"{size}: {workers} processes: {name} {seconds:.1f} s, {cpu:.1f} CPU s", file=sys.stderr,
                      flush=True)
    ratio = lambda rates, p: round(statistics.median(  # noqa: E731
        b / f for b, f in zip(rates[p]["builder"], rates[p]["floor"])), 3)
    rounded = lambda rates: {str(p): {k: [round(r, 2) for r in v] for k, v in by.items()}  # noqa: E731
                             for p, by in rates.items()}
    return {"samples": count, "rounds": rounds, "samples_per_s": rounded(wall), "samples_per_cpu_s": rounded(per_cpu),
            "builder_vs_floor": {str(p): ratio(wall, p) for p in (1, 2)},
            "builder_vs_floor_per_cpu_s": {str(p): ratio(per_cpu, p) for p in (1, 2)},
            "scaling_1_to_2": {k: round(statistics.median(wall[2][k]) / statistics.median(wall[1][k]), 3)
                               for k in ("floor", "builder")}}


def run(*, sources: int, width: int, height: int, seconds: float, sizes: str, frames: int, rounds: int,
        cache: Path) -> dict:
    from bench.sources import write_sources

    load_before, started = os.getloadavg(), time.perf_counter()
    manifest = write_sources(sources, cache / "sources", width=width, height=height, seconds=seconds)
    for path in manifest.parent.rglob("*.mp4"):  # the page cache holds the sources before the first timed run
        path.read_bytes()
    by_size = {}
    for size in (int(s) for s in sizes.split(",")):
        by_size[f"{size}x{size}x{frames}"] = measure_size(manifest, cache / "builds", size=size, frames=frames,
                                                          rounds=rounds)
    shutil.rmtree(cache / "builds", ignore_errors=True)
    met = {size: {"builder_vs_floor": all(v >= GOALS["builder_vs_floor"] for v in r["builder_vs_floor"].values()),
                  "scaling_1_to_2": {k: v >= GOALS["scaling_1_to_2"] for k, v in r["scaling_1_to_2"].items()}}
           for size, r in by_size.items()}
    return {"sources": {"count": sources, "size": f"{width}x{height}", "seconds": seconds, "codec": "h264 + aac"},
            "shards": "vp9 + wav (16 kHz, 1 s), 8 fps", "sizes": by_size, "goals": GOALS, "goals_met": met,
            "machine": machine_report(load_before, started), "note": RATIOS_NOTE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_options(parser, FULL)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cotrain-bench"),
                        help="where sources are kept between runs (shards are built under it and removed)")
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    settings.update({k: v for k, v in (("sources", args.sources), ("sizes", args.sizes), ("rounds", args.rounds))
                     if v is not None})
    print(json.dumps(run(**settings, cache=args.cache), indent=1))


if __name__ == "__main__":
    main()

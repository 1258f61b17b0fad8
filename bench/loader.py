"""Loader throughput against an in-process libav floor, at real clip sizes, in one run; prints one JSON object.

    .venv/bin/python bench/loader.py [--sources 300] [--sizes 112,224] [--rounds 2] [--cache /tmp/cotrain-bench]
    .venv/bin/python bench/loader.py --quick        # a few tiny sources, for the test that keeps this running

Corpus: `--sources` camera-like clips (bench/sources.py: 320x240, 3 s, 30 fps H.264 + AAC, cached in --cache),
built into VP9 + WAV shards per size (SIZExSIZE, 16 frames at 8 fps, 1 s of 16 kHz audio; cached too). For 1 and
2 processes, and each size, three rates over the rgb + audio members of every sample, each in steady state (a
whole untimed epoch first: worker start-up, pipeline build and the page cache are not timed):
- floor: PyAV decoding the same members to numpy arrays (video to RGB frames, audio to 16-bit samples) in a pool
  of that many processes, one codec thread each, one task per batch of samples read from the same shards;
- dali: the DALI CPU loader (pipeline.dali_loader) with that many DALI threads;
- wds: the DALI-free loader (pipeline.wds_loader) with that many worker processes.
The loaders do more than the floor (log-mel features, normalisation, batching, passing batches between
processes). Every rate is also given per CPU second of the process tree (bench/cpu.py) with the cores each run
got: on a shared machine the wall-clock ratios also measure the neighbours, the CPU ones only the code. Runs are
interleaved (floor, dali, wds, floor, dali, wds, ...) over --rounds rounds and each ratio is
the median over rounds of a loader's rate over the floor's in the same round, so drift on a shared machine
touches both sides. Goals: dali / floor >= 0.9, wds / floor >= 0.8, each 2 processes / 1 process >= 1.7.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av  # noqa: E402
import numpy as np  # noqa: E402

from bench.cpu import RATIOS_NOTE, CpuMeter, machine_report  # noqa: E402
from bench.sources import add_corpus_options  # noqa: E402
from pipeline import LoaderConfig, load_dataset_info, make_loader  # noqa: E402

GOALS = {"dali_vs_floor": 0.9, "wds_vs_floor": 0.8, "scaling_1_to_2": 1.7}
FULL = {"sources": 300, "width": 320, "height": 240, "seconds": 3.0, "sizes": "112,224", "frames": 16,
        "batch_size": 16, "rounds": 2}
QUICK = {"sources": 4, "width": 64, "height": 48, "seconds": 0.5, "sizes": "32", "frames": 4, "batch_size": 2,
         "rounds": 1}


def bench_shards(manifest: Path, cache: Path, *, size: int, frames: int, workers: int = 2) -> Path:
    """VP9 + WAV shards of `manifest` at size x size x frames, built once into the cache and reused."""
    from shards.build import build_shards

    count = len(manifest.read_text().splitlines())
    out = cache / "shards" / f"{manifest.parent.name}-{count}-{size}x{size}x{frames}"
    if not (out / "dataset.json").is_file():
        build_shards(manifest, out=out, fps=8, frames=frames, height=size, width=size, sample_rate=16000,
                     audio_seconds=1.0, max_shard_samples=100, workers=workers, overwrite=True)
    return out


# -- the floor: PyAV in a pool of processes -------------------------------------------------------------

_worker: dict = {}


def _floor_start(shards: str, threads: int) -> None:
    from pipeline.source import SampleReader

    info = load_dataset_info(shards)
    _worker.update(reader=SampleReader(info.shards("train")), threads=threads,
                   video=info.modalities["rgb"]["ext"], audio=info.modalities["audio"]["ext"])


def _floor_batch(indices: list[int]) -> int:
    """Read and decode these samples' members with PyAV; the arrays are made and kept until the batch is done."""
    kept = []
    for index in indices:
        members = _worker["reader"].read(index).members
        kept.append((_pyav_frames(members[_worker["video"]]), _pyav_samples(members[_worker["audio"]])))
    return len(kept)


def _pyav_frames(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_count = _worker["threads"]
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])


def _pyav_samples(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(audio=0)])


def floor_rate(shards: Path, processes: int, batch_size: int, threads: int = 1) -> tuple[float, float]:
    """(samples per second, samples per CPU second) of the floor's second pass over every train sample (the
    first starts the pool, untimed)."""
    count = load_dataset_info(shards).samples("train")
    tasks = [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]
    context = multiprocessing.get_context("forkserver")
    with context.Pool(processes, initializer=_floor_start, initargs=(str(shards), threads)) as pool:
        sum(pool.imap(_floor_batch, tasks))
        with CpuMeter() as cpu:
            started = time.perf_counter()
            samples = sum(pool.imap(_floor_batch, tasks))
            elapsed = time.perf_counter() - started
    return samples / elapsed, samples / cpu.seconds


# -- the loaders -----------------------------------------------------------------------------------------

def loader_rate(shards: Path, backend: str, processes: int, batch_size: int) -> tuple[float, float]:
    """(samples per second, samples per CPU second) of a training loader's second epoch (the first starts its
    workers or pipeline, untimed)."""
    cfg = LoaderConfig(batch_size=batch_size, threads=processes, workers=processes)
    loader = make_loader(load_dataset_info(shards), "train", cfg, modalities=["rgb", "audio"], training=True,
                         backend=backend)
    try:
        for _ in loader.epoch():
            pass
        with CpuMeter() as cpu:
            started, samples = time.perf_counter(), 0
            for batch in loader.epoch():
                samples += len(batch)
            elapsed = time.perf_counter() - started
        return samples / elapsed, samples / cpu.seconds
    finally:
        loader.close()


def measure_size(shards: Path, *, rounds: int, batch_size: int, compare_threads: bool) -> dict:
    """Rates per process count, interleaved floor / dali / wds in every round, and the ratios of one run: per
    wall second (what the goals name) and per CPU second of the process tree (what a shared machine leaves
    comparable: the share of the cores each run got varies with the neighbours)."""
    names = ("floor", "dali", "wds")
    wall = {p: {k: [] for k in names} for p in (1, 2)}
    per_cpu = {p: {k: [] for k in names} for p in (1, 2)}
    auto_threads = None
    for round_ in range(rounds):
        for processes in (1, 2):
            for name in names:
                rate, cpu_rate = floor_rate(shards, processes, batch_size) if name == "floor" else \
                    loader_rate(shards, name, processes, batch_size)
                wall[processes][name].append(rate)
                per_cpu[processes][name].append(cpu_rate)
                print(f"round {round_ + 1}/{rounds}, {processes} processes: {name} {rate:.1f} samples/s, "
                      f"{cpu_rate:.1f} samples per CPU second", file=sys.stderr, flush=True)
        if compare_threads and round_ == 0:  # the decode-thread choice: libav's automatic threads per decoder
            auto_threads = floor_rate(shards, 2, batch_size, threads=0)
    result = {"samples": load_dataset_info(shards).samples("train"), "rounds": rounds,
              "samples_per_s": _rounded(wall), "samples_per_cpu_s": _rounded(per_cpu),
              "cores_used": {str(p): {k: [round(w / c, 2) for w, c in zip(wall[p][k], per_cpu[p][k])]
                                      for k in names} for p in (1, 2)}}
    for loader in ("dali", "wds"):
        result[f"{loader}_vs_floor"] = _ratios(wall, loader)
        result[f"{loader}_vs_floor_per_cpu_s"] = _ratios(per_cpu, loader)
    result["scaling_1_to_2"] = {k: round(statistics.median(wall[2][k]) / statistics.median(wall[1][k]), 3)
                                for k in names}
    if auto_threads is not None:
        result["floor_2_processes_auto_threads_vs_1_thread"] = {
            "per_s": round(auto_threads[0] / wall[2]["floor"][0], 3),
            "per_cpu_s": round(auto_threads[1] / per_cpu[2]["floor"][0], 3)}
    return result


def _rounded(rates: dict) -> dict:
    return {str(p): {k: [round(v, 2) for v in r] for k, r in by.items()} for p, by in rates.items()}


def _ratios(rates: dict, loader: str) -> dict:
    """Per process count: the median over rounds of the loader's rate over the floor's in the same round."""
    return {str(p): round(statistics.median(m / f for m, f in zip(rates[p][loader], rates[p]["floor"])), 3)
            for p in (1, 2)}


def goals_met(sizes: dict) -> dict:
    met = {}
    for size, r in sizes.items():
        met[size] = {"dali_vs_floor": all(v >= GOALS["dali_vs_floor"] for v in r["dali_vs_floor"].values()),
                     "wds_vs_floor": all(v >= GOALS["wds_vs_floor"] for v in r["wds_vs_floor"].values()),
                     "scaling_1_to_2": {k: v >= GOALS["scaling_1_to_2"] for k, v in r["scaling_1_to_2"].items()}}
    return met


def run(*, sources: int, width: int, height: int, seconds: float, sizes: str, frames: int, batch_size: int,
        rounds: int, cache: Path, compare_threads: bool = False) -> dict:
    from bench.sources import write_sources

    load_before, started = os.getloadavg(), time.perf_counter()
    manifest = write_sources(sources, cache / "sources", width=width, height=height, seconds=seconds)
    by_size = {}
    for size in (int(s) for s in sizes.split(",")):
        shards = bench_shards(manifest, cache, size=size, frames=frames)
        by_size[f"{size}x{size}x{frames}"] = measure_size(shards, rounds=rounds, batch_size=batch_size,
                                                          compare_threads=compare_threads)
    return {"sources": {"count": sources, "size": f"{width}x{height}", "seconds": seconds,
                        "codec": "h264 + aac"},
            "shards": "vp9 + wav (16 kHz, 1 s), 8 fps", "batch_size": batch_size, "sizes": by_size,
            "goals": GOALS, "goals_met": goals_met(by_size),
            "machine": machine_report(load_before, started), "note": RATIOS_NOTE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_options(parser, FULL)
    parser.add_argument("--batch-size", type=int, help=f"samples per batch (default {FULL['batch_size']})")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cotrain-bench"),
                        help="where sources and shards are kept between runs")
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    settings.update({k: v for k, v in (("sources", args.sources), ("sizes", args.sizes), ("rounds", args.rounds),
                                       ("batch_size", args.batch_size)) if v is not None})
    print(json.dumps(run(**settings, cache=args.cache, compare_threads=not args.quick), indent=1))


if __name__ == "__main__":
    main()

"""Peak and per-epoch resident memory of each loader over training epochs; prints one JSON object.

    .venv/bin/python bench/memory.py [--sources 300] [--size 224] [--epochs 3] [--batch-size 16] [--threads 4]

Shards: the camera-like sources of bench/sources.py built at SIZExSIZEx16 (VP9 + WAV; cached in --cache, shared
with bench/loader.py). Each loader runs in a fresh child process (so one loader's allocations never count against
the other) as a training loader with --threads DALI threads / DataLoader workers, rgb + audio, for --epochs
epochs. Memory is the resident set of the child and all its descendants (DataLoader workers), summed; sampled
every 50 ms for the peak and read after the last batch of every epoch (also as PSS, which counts the library
pages the workers share once). Goal: RSS after the last epoch within
5% of RSS after the first (no leak).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL_GROWTH = 0.05
MB = 2 ** 20


def tree_rss(process, *, proportional: bool = False) -> int:
    """Resident bytes of `process` and every descendant still alive; `proportional`: PSS, which splits pages the
    processes share (torch's libraries in every DataLoader worker) between them instead of counting each copy."""
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss if proportional else p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.05):
        import psutil

        super().__init__(daemon=True)
        self.process, self.interval, self.peak, self.stopped = psutil.Process(), interval, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, tree_rss(self.process))
            time.sleep(self.interval)


def measure_one(shards: str, backend: str, *, epochs: int, batch_size: int, threads: int) -> dict:
    """In this process: one training loader for `epochs` epochs, RSS of the process tree after each."""
    import psutil

    from pipeline import LoaderConfig, load_dataset_info, make_loader

    cfg = LoaderConfig(batch_size=batch_size, threads=threads, workers=threads)
    loader = make_loader(load_dataset_info(shards), "train", cfg, modalities=["rgb", "audio"], training=True,
                         backend=backend)
    sampler = PeakSampler()
    sampler.start()
    after, after_pss, started = [], [], time.perf_counter()
    for _ in range(epochs):
        for _batch in loader.epoch():
            pass
        after.append(tree_rss(psutil.Process()))
        after_pss.append(tree_rss(psutil.Process(), proportional=True))
    sampler.stopped.set()
    sampler.join()
    loader.close()
    return {"rss_after_epoch_mb": [round(x / MB, 1) for x in after], "peak_rss_mb": round(sampler.peak / MB, 1),
            "pss_after_epoch_mb": [round(x / MB, 1) for x in after_pss],
            "growth_last_vs_first": round(after[-1] / after[0] - 1, 4),
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=4, help="DALI threads = DataLoader workers")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cotrain-bench"))
    parser.add_argument("--one", choices=["dali", "wds"], help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.shards, args.one, epochs=args.epochs, batch_size=args.batch_size,
                                     threads=args.threads)))
        return
    from bench.loader import bench_shards
    from bench.sources import write_sources

    shards = bench_shards(write_sources(args.sources, args.cache / "sources"), args.cache, size=args.size,
                          frames=args.frames)
    result = {"shards": str(shards), "size": f"{args.size}x{args.size}x{args.frames}", "epochs": args.epochs,
              "batch_size": args.batch_size, "threads": args.threads, "goal_growth": GOAL_GROWTH,
              "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    for backend in ("dali", "wds"):
        done = subprocess.run([sys.executable, __file__, "--one", backend, "--shards", str(shards),
                               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                               "--threads", str(args.threads)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{backend} memory run failed:\n{done.stderr[-3000:]}")
        result[backend] = json.loads(done.stdout.strip().splitlines()[-1])
        result[backend]["goal_met"] = result[backend]["growth_last_vs_first"] <= GOAL_GROWTH
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""The GPU check: what a fresh GPU machine runs once to show the GPU paths work; writes one JSON file.

    make gpu-check                      # set-up for this driver (make setup), then this script
    .venv/bin/python bench/gpu_check.py [--out gpu-check.json] [--work DIR] [--stage-timeout 240]
    .venv/bin/python bench/gpu_check.py --cpu     # the same stages on the CPU, small (the test suite runs it)

Stages, each in its own process under `timeout`; a failed or timed-out stage is recorded and the next one runs:
  versions   driver, CUDA, torch, DALI and DeepSpeed versions; fails when torch does not see the GPU
  corpus     a synthetic corpus, VP9 shards at 128x128 and 224x224 (NVDEC's VP9 minimum is 128x128);
             --shards DIR checks existing shards instead
  decode-S   NVDEC (DALI mixed) against DALI's CPU decoder on the shards of size S: clips/s of each, and
             parity on every clip: video within a mean of 2 8-bit levels, audio features within 1e-3
  train-zeroZ  1 rank, bf16, ZeRO stage Z (2 and 3) with validation: asserts the parameters are bf16 and that
             the loader hands out GPU batches; samples/s, data-wait ratio, peak GPU memory (torch's, and the
             driver's used memory sampled during the run)
--cpu runs every stage on the CPU at 32x32 (decode: DALI's CPU path against the DALI-free loader; train: CPU
batches, fp32 under ZeRO-2 and bf16 under ZeRO-3, as a GPU would), so the script is exercised without a GPU.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VIDEO_LEVEL = 1 / (0.225 * 255)  # one 8-bit level in the loader's normalised units
VIDEO_TOLERANCE_LEVELS = 2.0
AUDIO_TOLERANCE = 1e-3
GPU_SIZES, CPU_SIZES = (128, 224), (32,)
STAGE_TIMEOUT_S = 240


# -- stages (each runs in a child process: python bench/gpu_check.py --stage NAME ...) ---------------------------

def stage_versions(args) -> dict:
    import torch

    from ops.device import nvidia_smi_gpus

    def version(name):
        import importlib.metadata as md
        for dist in (name, f"{name}-cuda120", f"{name}-cuda130"):
            try:
                return f"{dist} {md.version(dist)}"
            except md.PackageNotFoundError:
                continue
        return None

    gpus = nvidia_smi_gpus()
    seen = torch.cuda.is_available()
    result = {"driver": gpus[0]["driver"] if gpus else None, "gpus": [g["name"] for g in gpus],
              "torch": torch.__version__, "torch_cuda": torch.version.cuda, "torch_sees_gpu": seen,
              "dali": version("nvidia-dali"), "deepspeed": version("deepspeed"),
              "device": torch.cuda.get_device_name(0) if seen else "cpu"}
    result["ok"] = args.cpu or seen
    if not result["ok"]:
        result["error"] = ("torch does not see the GPU: " + (f"driver {result['driver']}, " if gpus else "no nvidia-smi, ")
                           + f"torch {torch.__version__} (CUDA {torch.version.cuda}); run `make setup` in a fresh clone")
    return result


def stage_corpus(args) -> dict:
    from shards.build import build_shards
    from shards.synth import write_synthetic_corpus

    if args.shards:
        return {"ok": (Path(args.shards) / "dataset.json").is_file(), "given": args.shards}
    work = Path(args.work)
    started = time.perf_counter()
    manifest = write_synthetic_corpus(work / "corpus", n=args.samples, seed=0, workers=2)
    for size in _sizes(args):
        build_shards(manifest, out=work / f"shards-{size}", height=size, width=size, frames=8, codec="vp9",
                     max_shard_samples=max(8, args.samples // 2), workers=2, progress=False)
    return {"ok": True, "samples": args.samples, "sizes": list(_sizes(args)), "seconds": round(time.perf_counter() - started, 1)}


def _decode(info, split: str, backend: str, device_id) -> tuple[dict, float]:
    from pipeline import LoaderConfig, make_loader

    loader = make_loader(info, split, LoaderConfig(batch_size=8, workers=0 if backend == "wds" else 2), modalities=["rgb", "audio"],
                         training=False, device_id=device_id, backend=backend)
    started = time.perf_counter()
    clips = {}
    for batch in loader:
        for i, key in enumerate(batch.keys):
            clips[key] = {m: batch.inputs[m][i].float().cpu() for m in ("rgb", "audio")}
    return clips, time.perf_counter() - started


def stage_decode(args) -> dict:
    """Tested path (GPU: DALI mixed; --cpu: DALI's CPU decoder) against the reference (GPU: DALI's CPU decoder;
    --cpu: the DALI-free loader), every clip of the train split."""
    from pipeline import load_dataset_info

    info = load_dataset_info(_shards_of(args, args.size))
    split = "val" if args.cpu else "train"  # --cpu: the fewest clips that still check every one
    if args.cpu:
        (tested, tested_s), (reference, reference_s) = _decode(info, split, "dali", None), _decode(info, split, "wds", None)
        names = ("dali-cpu", "dali-free")
    else:
        (tested, tested_s), (reference, reference_s) = _decode(info, split, "dali", 0), _decode(info, split, "dali", None)
        names = ("nvdec", "dali-cpu")
    video = {k: float((tested[k]["rgb"] - reference[k]["rgb"]).abs().mean()) / VIDEO_LEVEL for k in tested}
    audio = {k: float((tested[k]["audio"] - reference[k]["audio"]).abs().max()) for k in tested}
    same_keys = set(tested) == set(reference)
    return {"size": args.size, "clips": len(tested), "same_keys": same_keys,
            f"{names[0]}_clips_per_s": round(len(tested) / tested_s, 2),
            f"{names[1]}_clips_per_s": round(len(reference) / reference_s, 2),
            "worst_video_mean_abs_diff_levels": round(max(video.values()), 3),
            "worst_audio_max_abs_diff": max(audio.values()),
            "ok": same_keys and max(video.values()) <= VIDEO_TOLERANCE_LEVELS and max(audio.values()) <= AUDIO_TOLERANCE}


class _DriverMemory:
    """Peak of the driver's used GPU memory (total - free), sampled every 0.2 s while the run trains."""

    def __init__(self, gpu: bool):
        self.gpu, self.peak, self._done = gpu, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import torch
        while not self._done.wait(0.2):
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)

    def __enter__(self):
        if self.gpu:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()


def stage_train(args) -> dict:
    """One rank, ZeRO stage args.zero, validation every epoch; what ran, checked against what was expected."""
    import torch

    from ops.config import resolve_config
    from ops.train import Trainer

    gpu = not args.cpu
    bf16 = gpu or args.zero == 3
    if not gpu and bf16:
        _train_in_bf16_on_the_cpu()
    cfg = resolve_config(cli={"shards": str(_shards_of(args, _sizes(args)[0])),
                              "out": str(Path(args.work) / f"run-zero{args.zero}"),
                              "epochs": args.epochs, "loader": {"batch_size": 8},
                              "optim": {"zero_stage": args.zero}, "metrics": {"port": 0}, "eval_every": 1})
    trainer = Trainer(cfg, device="auto" if gpu else "cpu")
    seen: list = []
    epoch = trainer.loader.epoch
    trainer.loader.epoch = lambda: (seen.append(b.inputs["rgb"].device) or b for b in epoch())
    started = time.perf_counter()
    with _DriverMemory(gpu) as driver:
        trainer.fit()
    seconds = time.perf_counter() - started
    dtypes = sorted({str(p.dtype) for p in trainer.engine.module.parameters()})
    expected_dtype = "torch.bfloat16" if bf16 else "torch.float32"
    expected_device = "cuda" if gpu else "cpu"
    validated = (Path(cfg.out) / "eval-val.json").is_file()
    samples = trainer.state.step * cfg.loader.batch_size
    result = {"zero_stage": args.zero, "param_dtypes": dtypes, "loader_devices": sorted({str(d) for d in seen}),
              "video_decoders": getattr(trainer.loader, "video_decoders", None), "validated": validated,
              "steps": trainer.state.step, "samples_per_s": round(samples / seconds, 2),
              "data_wait_ratio": trainer.metrics.data_wait_ratio.labels(trainer.metrics.rank)._value.get(),
              "peak_torch_memory_bytes": torch.cuda.max_memory_allocated() if gpu else None,
              "peak_driver_memory_bytes": driver.peak if gpu else None}
    result["ok"] = (dtypes == [expected_dtype] and validated and bool(seen)
                    and all(d.type == expected_device for d in seen))
    return result


def _train_in_bf16_on_the_cpu() -> None:
    """--cpu's ZeRO-3 stage trains in bf16, the precision of a GPU run, so that the gathered evaluation copy and
    the inputs' dtype are checked against bf16 weights where there is no GPU (DeepSpeed's CPU accelerator runs it)."""
    import ops.train

    derive = ops.train.deepspeed_config
    ops.train.deepspeed_config = lambda cfg, *, total_steps, bf16: derive(cfg, total_steps=total_steps, bf16=True)


STAGES = {"versions": stage_versions, "corpus": stage_corpus, "decode": stage_decode, "train": stage_train}


def _sizes(args) -> tuple[int, ...]:
    if args.shards:
        described = Path(args.shards) / "dataset.json"
        return (json.loads(described.read_text())["modalities"]["rgb"]["height"] if described.is_file() else 0,)
    return CPU_SIZES if args.cpu else GPU_SIZES


def _shards_of(args, size: int) -> Path:
    return Path(args.shards) if args.shards else Path(args.work) / f"shards-{size}"


# -- the driver ---------------------------------------------------------------------------------------------------

def _run_stage(name: str, extra: list[str], args) -> dict:
    """One stage in a child process under `timeout`; its JSON, or a record of how it failed."""
    out = Path(args.work) / f"{name}.json"
    out.unlink(missing_ok=True)
    stage = name.split("-")[0]
    command = ["timeout", "-k", "10", str(args.stage_timeout), sys.executable, str(Path(__file__).resolve()),
               "--stage", stage, "--work", args.work, "--result", str(out), *extra] + (["--cpu"] if args.cpu else []) \
        + (["--shards", args.shards] if args.shards else [])
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    seconds = round(time.perf_counter() - started, 1)
    if out.is_file():
        result = json.loads(out.read_text())
    else:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        result = {"ok": False, "error": "\n".join(tail) or f"exit status {done.returncode}"}
    result.update(seconds=seconds, exit_status=done.returncode, timed_out=done.returncode in (124, 137))
    if done.returncode != 0:
        result["ok"] = False
    return result


def check(args) -> dict:
    Path(args.work).mkdir(parents=True, exist_ok=True)
    plan = [("versions", []), ("corpus", [])]
    plan += [(f"decode-{s}", ["--size", str(s)]) for s in _sizes(args)]
    plan += [(f"train-zero{z}", ["--zero", str(z)]) for z in (2, 3)]
    if args.stages:
        unknown = set(args.stages.split(",")) - {name for name, _ in plan}
        if unknown:
            raise SystemExit(f"--stages: unknown {', '.join(sorted(unknown))}; this run has "
                             f"{', '.join(name for name, _ in plan)}")
        plan = [(name, extra) for name, extra in plan if name in args.stages.split(",")]
    stages = {}
    for name, extra in plan:
        stages[name] = _run_stage(name, extra + ["--samples", str(args.samples), "--epochs", str(args.epochs)], args)
        print(json.dumps({name: stages[name]}), flush=True)
    return {"mode": "cpu" if args.cpu else "gpu", "ok": all(s["ok"] for s in stages.values()), "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="Run every stage on the CPU, small (what CI runs).")
    parser.add_argument("--out", default="gpu-check.json", help="Where the JSON result goes.")
    parser.add_argument("--work", default=None, help="Scratch folder [default: /tmp/cotrain-gpu-check(-cpu)].")
    parser.add_argument("--stage-timeout", type=int, default=STAGE_TIMEOUT_S, help="Seconds per stage.")
    parser.add_argument("--stages", help="Comma-separated stages to run (e.g. versions,decode-128) [default: all].")
    parser.add_argument("--shards", help="Check these shards (rgb and audio) instead of building a corpus.")
    parser.add_argument("--samples", type=int, default=None, help="Corpus size [default: 64, --cpu 16].")
    parser.add_argument("--epochs", type=int, default=None, help="Training epochs [default: 2, --cpu 1].")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--zero", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work or f"/tmp/cotrain-gpu-check{'-cpu' if args.cpu else ''}"
    args.samples = args.samples or (16 if args.cpu else 64)
    args.epochs = args.epochs or (1 if args.cpu else 2)
    if args.stage:  # a child: one stage, its JSON to --result
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        Path(args.result).write_text(json.dumps(STAGES[args.stage](args), indent=2) + "\n")
        return
    result = check(args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'passed' if result['ok'] else 'FAILED'}: {args.out}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()

"""Training cost in one run: step time per mode, ZeRO state per rank, scaling from 1 to 2 ranks.

    .venv/bin/python bench/train.py [--samples 240] [--epochs 3] [--work bench-out/train]

Prints one JSON object:
- `cotrain_step_s`, `multimodal_step_s`, `unimodal_step_s` (by modality): wall time per training step of a
  real `cotrain train` run on the same shards and budget (DALI loading + DeepSpeed + model), so the
  ratios count what a user pays, data decoding included: co-training decodes each batch once for every
  branch, separate runs decode it once per run;
- `cotrain_vs_multimodal`, `cotrain_vs_separate_sum` (one co-training step over the multimodal step plus
  every unimodal step);
- `zero`: per stage 0-3 at 2 ranks, rank 0's optimizer and gradient state (Adam moments, fp32 master
  partitions, the gradients the optimizer steps on) and peak RSS, for a widened model, in fp32 (CPU
  training) and bf16 (GPU training precision); `zero2_vs_zero0_state_bytes` (bf16) and `..._fp32`;
  beside that count, `live_at_step` / `live_after_step`: every tensor storage alive then except the weights
  (DeepSpeed's bucket buffers and flat copies included, torch.empty buffers at full size), and
  `zero2_vs_zero0_live_bytes_at_step`;
- `samples_per_s_1_rank`, `samples_per_s_2_ranks`, `scaling_2_ranks`;
- `data_wait`: per loader (dali, wds), the fraction of the last epoch's wall time a co-training run of a `resnet3d`
  video branch and the default audio branch waited for batches, at 112x112x16 (the camera-like sources of
  bench/sources.py, `--wait-sources` of them, cached in `--cache`), default threads on CPU, `--wait-epochs` epochs
  (the first starts workers and pipelines; the last is reported). Goal: < 5%.
Quote ratios; absolute times drift on shared machines.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"}}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["PYTHONPATH"] = f"{ROOT}:{env.get('PYTHONPATH', '')}"
    return env


def _shards(work: Path, samples: int) -> Path:
    from shards.build import build_shards
    from shards.synth import write_synthetic_corpus

    corpus, shards = work / "corpus", work / "shards"
    if not (shards / "dataset.json").is_file():
        write_synthetic_corpus(corpus, n=samples, seed=0)
        build_shards(corpus / "manifest.jsonl", out=shards, workers=2)
    return shards


def _train(shards: Path, run: Path, epochs: int, *args: str, ranks: int = 1) -> str:
    from ops.engine import free_port

    cmd = [str(BIN / "cotrain"), "train", "--shards", str(shards), "--out", str(run), "--epochs", str(epochs),
           "--metrics-port", "0", "--set", "eval_every=0", *args]
    if ranks > 1:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if done.returncode:
        raise SystemExit(f"training failed: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def _last_epoch_rate(log: str) -> float:
    """samples/s of the last epoch (the first pays for start-up)."""
    return float(re.findall(r"epoch \d+/\d+ .* ([\d.]+) samples/s", log)[-1])


def step_seconds(shards: Path, work: Path, epochs: int, batch_size: int) -> dict:
    from pipeline.dataset import load_dataset_info

    modalities = list(load_dataset_info(shards).modalities)
    plan = {"cotrain": ["--mode", "cotrain"], "multimodal": ["--mode", "multimodal"]}
    plan.update({f"unimodal-{m}": ["--mode", "unimodal", "--modalities", m] for m in modalities})
    seconds = {}
    for name, args in plan.items():
        log = _train(shards, work / name, epochs, "--batch-size", str(batch_size), *args)
        seconds[name] = batch_size / _last_epoch_rate(log)
    unimodal = {m: seconds[f"unimodal-{m}"] for m in modalities}
    return {"cotrain_step_s": seconds["cotrain"], "multimodal_step_s": seconds["multimodal"],
            "unimodal_step_s": unimodal,
            "cotrain_vs_multimodal": seconds["cotrain"] / seconds["multimodal"],
            "cotrain_vs_separate_sum": seconds["cotrain"] / (seconds["multimodal"] + sum(unimodal.values()))}


def scaling(shards: Path, work: Path, epochs: int, batch_size: int) -> dict:
    one = _last_epoch_rate(_train(shards, work / "scale-1", epochs, "--batch-size", str(batch_size)))
    two = _last_epoch_rate(_train(shards, work / "scale-2", epochs, "--batch-size", str(batch_size), ranks=2))
    return {"samples_per_s_1_rank": one, "samples_per_s_2_ranks": two, "scaling_2_ranks": two / one}


# --- ZeRO probe: runs under the deepspeed launcher, one process per rank -----------------------------------

def _inner_optimizer(optimizer):
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _live_storage_bytes(module, inner) -> dict:
    """Every tensor storage alive now, found from the garbage collector's objects plus the gradients (which
    live in C++ until read), the storages behind the model's weights left out: what DeepSpeed and the
    optimizer really hold beside the weights, bucket buffers and flat copies included, not only the state
    the optimizer names. `virtual` counts torch.empty buffers at full size, pages never touched included."""
    import gc

    import torch

    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    tensors = [t for t in gc.get_objects() if torch.is_tensor(t)]
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    tensors += [p.grad for g in inner.param_groups for p in g["params"] if p.grad is not None]
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() and storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
    return {"live_bytes": sum(storages.values()), "live_storages": len(storages),
            "largest_bytes": sorted(storages.values(), reverse=True)[:4]}


def zero_probe(stage: int, bf16: bool, out: Path) -> None:
    """A few steps of a widened co-training model; rank 0 writes the optimizer and gradient state it held."""
    import torch

    from model.cotrain import ModalitySpec, build_model
    from model.losses import TransferConfig, cotrain_losses, total_loss
    from ops.config import RunConfig, deepspeed_config
    from ops.engine import build_engine, init_distributed, rank_info

    init_distributed()
    rank, _, world = rank_info()
    specs = [ModalitySpec("rgb", "video", {"in_channels": 3, "widths": (64, 128, 256)}),
             ModalitySpec("audio", "audio", {"in_channels": 40, "widths": (256, 512, 512)})]
    model = build_model(specs, 6, mode="cotrain")
    params = sum(p.numel() for p in model.parameters())
    cfg = RunConfig(shards="-", out="-")
    cfg.optim.zero_stage = stage
    cfg.loader.batch_size = 2
    engine, _ = build_engine(model, deepspeed_config(cfg, total_steps=10, bf16=bf16))
    inner = _inner_optimizer(engine.optimizer)
    seen = {"grad_bytes": 0}
    original = inner.step

    def counting_step(*args, **kwargs):  # the gradients the optimizer actually steps on, at step time
        seen["grad_bytes"] = sum(p.grad.numel() * p.grad.element_size() for g in inner.param_groups
                                 for p in g["params"] if p.grad is not None)
        seen["at_step"] = _live_storage_bytes(engine.module, inner)
        return original(*args, **kwargs)

    inner.step = counting_step
    dtype = torch.bfloat16 if bf16 else torch.float32
    inputs = {"rgb": torch.randn(2, 3, 8, 32, 32, dtype=dtype), "audio": torch.randn(2, 40, 101, dtype=dtype)}
    present = {m: torch.ones(2, dtype=torch.bool) for m in inputs}
    labels = torch.tensor([0, 1])
    for _ in range(3):
        logits = {k: v.float() for k, v in engine(inputs, present).items()}
        engine.backward(total_loss(cotrain_losses(logits, labels, present, TransferConfig(start_fraction=0))))
        engine.step()
    model_ptrs = {p.data_ptr() for p in engine.module.parameters()}
    moments = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    masters = sum(p.numel() * p.element_size() for g in inner.param_groups for p in g["params"]
                  if p.data_ptr() not in model_ptrs)
    if rank == 0:
        out.write_text(json.dumps({
            "stage": stage, "bf16": bf16, "world_size": world, "params": params, "moment_bytes": moments,
            "master_bytes": masters, "grad_bytes": seen["grad_bytes"],
            "state_bytes": moments + masters + seen["grad_bytes"],
            "live_at_step": seen["at_step"], "live_after_step": _live_storage_bytes(engine.module, inner),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def zero_states(work: Path) -> dict:
    from ops.engine import free_port

    results = {}
    for bf16 in (False, True):
        for stage in range(4):
            out = work / f"zero{stage}-{'bf16' if bf16 else 'fp32'}.json"
            cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), __file__,
                   "--zero-probe", str(stage), "--probe-out", str(out)] + (["--bf16"] if bf16 else [])
            done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
            if done.returncode:
                raise SystemExit(f"ZeRO-{stage} probe failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            results[f"{stage}-{'bf16' if bf16 else 'fp32'}"] = json.loads(out.read_text())
    ratio = lambda key: results[f"2-{key}"]["state_bytes"] / results[f"0-{key}"]["state_bytes"]  # noqa: E731
    return {"zero": results, "zero2_vs_zero0_state_bytes": ratio("bf16"),
            "zero2_vs_zero0_state_bytes_fp32": ratio("fp32"),
            "zero2_vs_zero0_live_bytes_at_step": {k: results[f"2-{k}"]["live_at_step"]["live_bytes"]
                                                  / results[f"0-{k}"]["live_at_step"]["live_bytes"]
                                                  for k in ("fp32", "bf16")}}


def data_wait(work: Path, cache: Path, sources: int, epochs: int, batch_size: int) -> dict:
    """Co-train a resnet3d at 112x112x16 with each loader; the data wait of the last epoch, from the run's log."""
    from bench.loader import bench_shards
    from bench.sources import write_sources

    shards = bench_shards(write_sources(sources, cache / "sources"), cache, size=112, frames=16)
    config = work / "wait-config.json"
    config.write_text(json.dumps({"encoders": {"video": {"name": "resnet3d", "shared_stages": 2}}}))
    waits = {}
    for backend in ("dali", "wds"):
        log = _train(shards, work / f"wait-{backend}", epochs, "--config", str(config), "--mode", "cotrain",
                     "--batch-size", str(batch_size), "--set", f"loader.backend={backend}")
        waits[backend] = float(re.findall(r"epoch \d+/\d+ .* data wait ([\d.]+)%", log)[-1]) / 100
        waits[f"{backend}_samples_per_s"] = _last_epoch_rate(log)
    return {"data_wait": waits, "data_wait_shards": str(shards), "data_wait_goal": 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work", default="bench-out/train")
    parser.add_argument("--skip", default="", help="Comma-separated parts to skip: steps, zero, scaling, wait.")
    parser.add_argument("--wait-sources", type=int, default=64, help="camera-like sources for the data-wait part")
    parser.add_argument("--wait-epochs", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cotrain-bench"), help="bench sources and shards")
    parser.add_argument("--zero-probe", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.zero_probe is not None:
        zero_probe(args.zero_probe, args.bf16, Path(args.probe_out))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    shards = _shards(work, args.samples) if {"steps", "scaling"} - skip else None
    result = {"samples": args.samples, "epochs": args.epochs, "batch_size": args.batch_size}
    if "steps" not in skip:
        result.update(step_seconds(shards, work, args.epochs, args.batch_size))
    if "zero" not in skip:
        result.update(zero_states(work))
    if "scaling" not in skip:
        result.update(scaling(shards, work, args.epochs, args.batch_size))
    if "wait" not in skip:
        result.update(data_wait(work, args.cache, args.wait_sources, args.wait_epochs, args.batch_size))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Step time and peak memory of co-training against the multimodal baseline for every torchvision video backbone,
on the CPU; prints one JSON object.

    .venv/bin/python bench/backbones.py [--steps 2] [--batch-size 1] [--backbones r3d_18,s3d] [--quick]

Each (backbone, mode) runs in a fresh process (its peak resident memory is that process's, torch's runtime
included): rgb clips of 16 x 112 x 112 through the backbone, split where a gesture model would share it (SPLITS),
plus audio log-mel through the default 1-D CNN, so the multimodal baseline is a real two-modality teacher. One
untimed warm-up step, then the median of `--steps` steps of forward + backward + AdamW (pure PyTorch, one thread,
random weights: the cost does not depend on their values). `cotrain_vs_multimodal` is the ratio of the steps' CPU
time (the process's own, so other work on a shared machine does not skew it: wall-clock ratios of the same
configuration moved between 0.55 and 4.7 under a load of 7 on 2 cores; `wall_cotrain_vs_multimodal` is kept beside
it), goal <= 1.3: the students' own stages after the split are what co-training adds. `--quick` runs mc3_18 at 8 x 32 x 32
for one step in this process (the test suite keeps it running; its memory figures are not separate).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import queue as queue_module
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPLITS = {"r3d_18": "layer2", "r2plus1d_18": "layer2", "mc3_18": "layer2", "s3d": "features.6",
          "mvit_v2_s": "blocks.2", "swin3d_t": "features.1", "frames_resnet18": "layer2",
          "frames_efficientnet_b0": "features.4", "frames_mobilenet_v3_small": "features.6"}
"""Where each backbone is shared: after about a third of its depth, as the gesture preset shares r3d_18."""
GOAL = 1.3
AUDIO_SHAPE = (40, 101)  # log-mel bands x frames of one second


def _specs(backbone: str, clip: tuple[int, int, int]):
    from model.cotrain import ModalitySpec

    options = {"in_channels": 3, **({"input_size": list(clip)} if backbone == "mvit_v2_s" else {})}
    return [ModalitySpec("rgb", "video", options, encoder_name=backbone, share_until=SPLITS[backbone]),
            ModalitySpec("audio", "audio", {"in_channels": AUDIO_SHAPE[0]})]


def measure(backbone: str, mode: str, clip: tuple[int, int, int], steps: int, batch_size: int) -> dict:
    """One (backbone, mode): median step seconds and this process's peak resident memory."""
    import torch

    from model.cotrain import FusionConfig, build_model
    from model.losses import TransferConfig, cotrain_losses, total_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    # the fusion's position table must cover the most tokens a backbone leaves (mc3_18: 16 x 7 x 7 at 112 x 112)
    model = build_model(_specs(backbone, clip), 6, mode=mode, fusion=FusionConfig(max_tokens=1024))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = {"rgb": torch.randn(batch_size, 3, *clip), "audio": torch.randn(batch_size, *AUDIO_SHAPE)}
    present = {m: torch.ones(batch_size, dtype=torch.bool) for m in inputs}
    labels = torch.randint(0, 6, (batch_size,))
    wall, cpu = [], []
    for i in range(steps + 1):
        started, started_cpu = time.perf_counter(), time.process_time()
        loss = total_loss(cotrain_losses(model(inputs, present), labels, present, TransferConfig()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i > 0:  # the first step warms up allocators and kernels
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"step_cpu_s": sorted(cpu)[len(cpu) // 2], "step_s": sorted(wall)[len(wall) // 2],
            "peak_rss_mb": round(peak_mb, 1), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def _child(queue, *args) -> None:
    try:
        queue.put(measure(*args))
    except Exception as err:  # noqa: BLE001 -- reported in the JSON, the other backbones still run
        queue.put({"error": f"{type(err).__name__}: {err}"})


def measure_in_child(*args) -> dict:
    """measure() in a fresh process, so each peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, *args))
    process.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive():  # died without a word (killed, out of memory)
                result = {"error": f"the measuring process exited with code {process.exitcode}"}
                break
    process.join()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--backbones", default=",".join(SPLITS), help="comma-separated, from: " + ", ".join(SPLITS))
    parser.add_argument("--quick", action="store_true", help="mc3_18 at 8 x 32 x 32, one step")
    args = parser.parse_args(argv)
    backbones = ["mc3_18"] if args.quick else [b.strip() for b in args.backbones.split(",") if b.strip()]
    unknown = [b for b in backbones if b not in SPLITS]
    if unknown:
        parser.error(f"unknown backbones {unknown}; choose from {', '.join(SPLITS)}")
    clip, steps, batch = ((8, 32, 32), 1, 2) if args.quick else ((16, 112, 112), args.steps, args.batch_size)
    result = {"clip": list(clip), "batch_size": batch, "steps": steps, "threads": 1, "goal": GOAL, "backbones": {}}
    run = measure if args.quick else measure_in_child  # quick: in this process (its memory is then shared)
    for backbone in backbones:
        cotrain, multimodal = (run(backbone, mode, clip, steps, batch) for mode in ("cotrain", "multimodal"))
        entry = {"share_until": SPLITS[backbone], "cotrain": cotrain, "multimodal": multimodal}
        if "error" not in cotrain and "error" not in multimodal:
            entry["cotrain_vs_multimodal"] = round(cotrain["step_cpu_s"] / multimodal["step_cpu_s"], 3)
            entry["wall_cotrain_vs_multimodal"] = round(cotrain["step_s"] / multimodal["step_s"], 3)
            entry["memory_cotrain_vs_multimodal"] = round(cotrain["peak_rss_mb"] / multimodal["peak_rss_mb"], 3)
        result["backbones"][backbone] = entry
        print(f"{backbone}: {entry.get('cotrain_vs_multimodal', entry)}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

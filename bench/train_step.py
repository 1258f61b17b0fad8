"""Step time of each training mode on the demo's shapes, in one run; prints one JSON object.

    .venv/bin/python bench/train_step.py [--steps 30] [--batch-size 16]

Times forward + backward + AdamW step of the pure PyTorch model (no loader, no DeepSpeed), so the
ratios isolate what co-training costs over the multimodal model alone and over training every
branch separately. Quote the ratios; absolute times drift on shared machines.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from model.cotrain import ModalitySpec, build_model
from model.losses import TransferConfig, cotrain_losses, total_loss

SHAPES = {"rgb": (3, 8, 32, 32), "audio": (40, 101), "text": (16,)}
SPECS = [ModalitySpec("rgb", "video", {"in_channels": 3}), ModalitySpec("audio", "audio", {"in_channels": 40}),
         ModalitySpec("text", "text", {"vocab_size": 100})]


def _batch(b: int):
    inputs = {"rgb": torch.randn(b, *SHAPES["rgb"]), "audio": torch.randn(b, *SHAPES["audio"]),
              "text": torch.randint(1, 100, (b, *SHAPES["text"]))}
    present = {m: torch.ones(b, dtype=torch.bool) for m in inputs}
    return inputs, present, torch.randint(0, 6, (b,))


def step_seconds(specs: list[ModalitySpec], mode: str, *, steps: int, batch_size: int) -> float:
    """Median wall time of one optimisation step."""
    torch.manual_seed(0)
    model = build_model(specs, 6, mode=mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs, present, labels = _batch(batch_size)
    inputs = {s.name: inputs[s.name] for s in specs}
    present = {s.name: present[s.name] for s in specs}
    times = []
    for i in range(steps + 3):
        started = time.perf_counter()
        loss = total_loss(cotrain_losses(model(inputs, present), labels, present, TransferConfig()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    run = lambda specs, mode: step_seconds(specs, mode, steps=args.steps, batch_size=args.batch_size)  # noqa: E731
    cotrain, multimodal = run(SPECS, "cotrain"), run(SPECS, "multimodal")
    unimodal = {s.name: run([s], "unimodal") for s in SPECS}
    print(json.dumps({
        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "cotrain_step_s": cotrain, "multimodal_step_s": multimodal, "unimodal_step_s": unimodal,
        "cotrain_vs_multimodal": cotrain / multimodal,
        "cotrain_vs_separate_sum": cotrain / (multimodal + sum(unimodal.values())),
    }, indent=2))


if __name__ == "__main__":
    main()

"""What the training loop costs over a bare torch loop: per-step time on the same model and the same batches.

    .venv/bin/python bench/loop_overhead.py [--shards DIR] [--steps 20] [--batch-size 16] [--repeats 7] [--quick]

Both loops run the same pre-loaded batches (read once from the shards, so no loading is timed) through the same
model and loss (model.objective.step_loss):
  loop   ops.train.Trainer's epoch: DeepSpeed engine, the ranks' agreement on the step, device read-back once per
         logging interval, metrics, checkpoint checks
  bare   forward, backward, gradient clipping, AdamW step, in plain torch
Each repeat times the two back to back; `ratio` is the median over repeats of loop / bare per-step time (and
`ratio_of_fastest` compares the fastest repeat of each). Goal: `overhead` = ratio - 1 <= 0.05 on CPU.
Prints one JSON object. Without --shards a small synthetic corpus is built in a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GOAL = 0.05


class PreloadedLoader:
    """The loader interface the training loop uses, over batches held in memory."""

    def __init__(self, batches: list):
        self.batches, self.skipped = batches, {}

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def epoch(self):
        return iter(self.batches)


def _shards(args, scratch: Path) -> Path:
    if args.shards:
        return Path(args.shards)
    from shards.build import build_shards
    from shards.synth import write_synthetic_corpus

    manifest = write_synthetic_corpus(scratch / "corpus", n=max(32, 2 * args.steps * args.batch_size // 3), workers=2)
    build_shards(manifest, out=scratch / "shards", workers=2, progress=False)
    return scratch / "shards"


def _trainer(shards: Path, out: Path, batch_size: int):
    from ops.config import resolve_config
    from ops.train import Trainer

    cfg = resolve_config(cli={"shards": str(shards), "out": str(out), "epochs": 1, "eval_every": 0,
                              "loader": {"batch_size": batch_size}, "metrics": {"port": 0}})
    return Trainer(cfg, device="cpu")


def _preload(trainer, steps: int) -> list:
    batches = []
    while len(batches) < steps:
        batches += list(trainer.loader.epoch())
    trainer.loader.close()
    return [trainer._cast(b) for b in batches[:steps]]


def loop_step_seconds(trainer, batches: list) -> float:
    from ops.train import LoopState

    trainer.loader, trainer.state = PreloadedLoader(batches), LoopState()
    started = time.perf_counter()
    trainer._epoch()
    return (time.perf_counter() - started) / len(batches)


def bare_step_seconds(trainer, model, optimizer, batches: list) -> float:
    from model.objective import step_loss

    cfg = trainer.cfg
    started = time.perf_counter()
    for step, batch in enumerate(batches):
        loss, _terms = step_loss(model, batch, transfer=cfg.transfer, task=cfg.task,
                                 progress=step / max(trainer.total_steps, 1),
                                 stream_label_smoothing=cfg.fusion.stream_label_smoothing)
        optimizer.zero_grad()
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
    return (time.perf_counter() - started) / len(batches)


def measure(args) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        trainer = _trainer(_shards(args, scratch), scratch / "run", args.batch_size)
        batches = _preload(trainer, args.steps)
        model = trainer._build_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=trainer.cfg.optim.lr,
                                      weight_decay=trainer.cfg.optim.weight_decay)
        loop_step_seconds(trainer, batches[:2]), bare_step_seconds(trainer, model, optimizer, batches[:2])  # warm-up
        loop, bare = [], []
        for _ in range(args.repeats):
            loop.append(loop_step_seconds(trainer, batches))
            bare.append(bare_step_seconds(trainer, model, optimizer, batches))
        trainer.metrics.close()
    # each repeat times the two loops back to back: the median of those paired ratios is the least disturbed by
    # the load of a shared machine, which moves both halves of a pair together
    ratio = statistics.median(a / b for a, b in zip(loop, bare))
    return {"steps": args.steps, "batch_size": args.batch_size, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "loop_step_s": statistics.median(loop),
            "bare_step_s": statistics.median(bare), "loop_step_s_all": loop, "bare_step_s_all": bare,
            "ratio": ratio, "ratio_of_fastest": min(loop) / min(bare), "overhead": ratio - 1, "goal_overhead": GOAL,
            "within_goal": ratio - 1 <= GOAL}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="Shards to take the batches from [default: a small synthetic corpus].")
    parser.add_argument("--steps", type=int, default=20, help="Batches per repeat.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 steps of 4 samples, 1 repeat (the test suite).")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.repeats = 2, 4, 1
    print(json.dumps(measure(args), indent=2))


if __name__ == "__main__":
    main()

"""The training loop: DALI batches -> co-trained model under DeepSpeed -> metrics -> checkpoint."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from model.cotrain import ModalitySpec, build_model
from model.losses import cotrain_losses, total_loss
from pipeline.dali_loader import model_inputs
from pipeline.loader import BaseLoader, make_loader
from pipeline.dataset import load_dataset_info

from .config import RunConfig, deepspeed_config, save_config
from .engine import build_engine, init_distributed, rank_info
from .evaluate import BEST_DIR, MODEL_FILE, print_warning, score_branches
from .metrics import TrainingMetrics

__all__ = ["train"]


def _specs(cfg: RunConfig, modalities: dict[str, dict]) -> list[ModalitySpec]:
    shapes = model_inputs(modalities, cfg.loader)
    return [ModalitySpec(name, m["kind"], shapes[name], cfg.shared_stages) for name, m in modalities.items()]


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def _zero3_gather(engine, cfg: RunConfig):
    """Full parameters on every rank, also under ZeRO-3 where they are partitioned."""
    if cfg.optim.zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def _fp32_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def _params_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(state.items()):
        digest.update(name.encode())
        digest.update(p.contiguous().numpy().tobytes())
    return digest.hexdigest()


class Trainer:
    """Owns the loop of one run; `fit()` trains, saves and validates."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        init_distributed()
        self.rank, self.local_rank, self.world = rank_info()
        self.gpu = torch.cuda.is_available()
        torch.manual_seed(cfg.seed)
        self.info = load_dataset_info(cfg.shards)
        self.modalities = self.info.select(cfg.modalities)
        self.loader = make_loader(self.info, "train", cfg.loader, modalities=list(self.modalities), training=True,
                                  seed=cfg.seed, rank=self.rank, world_size=self.world,
                                  device_id=self.local_rank if self.gpu else None)
        self.specs = _specs(cfg, self.modalities)
        model = build_model(self.specs, self.info.num_classes, mode=cfg.mode, fusion=cfg.fusion, init_seed=cfg.seed)
        self.total_steps = cfg.epochs * self.loader.steps_per_epoch
        ds_config = deepspeed_config(cfg, total_steps=self.total_steps, bf16=self.gpu)
        self.engine, self.scheduler = build_engine(model, ds_config)
        self.metrics = TrainingMetrics(rank=self.rank)
        self.step = 0
        self.val_loader = self._make_val_loader()
        self.best: dict[str, dict] = {}
        self.history: list[dict] = []

    def _cast(self, batch):
        batch = batch.to(self.engine.device)
        if self.gpu:  # bf16 weights need bf16 float inputs; ids and masks stay as they are
            batch.inputs = {m: x.bfloat16() if x.is_floating_point() else x for m, x in batch.inputs.items()}
        return batch

    def _train_step(self, batch) -> tuple[dict[str, float], float]:
        logits = self.engine(batch.inputs, batch.present)
        logits = {b: v.float() for b, v in logits.items()}
        scale = self.cfg.transfer.scale_at(self.step / max(self.total_steps, 1))
        terms = cotrain_losses(logits, batch.labels, batch.present, self.cfg.transfer, transfer_scale=scale,
                               stream_label_smoothing=self.cfg.fusion.stream_label_smoothing)
        loss = total_loss(terms)
        self.engine.backward(loss)
        self.engine.step()
        self.step += 1
        return {k: float(v.detach()) for k, v in terms.items()}, float(loss.detach())

    def _epoch(self, epoch: int) -> dict[str, float]:
        self.engine.train()
        sums, count, samples, started = {}, 0, 0, time.perf_counter()
        batches = self.loader.epoch()
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            t1 = time.perf_counter()
            terms, total = self._train_step(self._cast(batch))
            t2 = time.perf_counter()
            self.metrics.record_step(terms=terms, total=total, batch_size=len(batch), step_seconds=t2 - t1,
                                     wait_seconds=t1 - t0, lr=self.scheduler.get_last_lr()[0])
            for k, v in dict(terms, total=total).items():
                sums[k] = sums.get(k, 0.0) + v
            count, samples = count + 1, samples + len(batch)
        means = {k: v / count for k, v in sums.items()}
        rate = samples * self.world / (time.perf_counter() - started)
        _log(self.rank, f"epoch {epoch + 1}/{self.cfg.epochs}  loss {means['total']:.4f}  "
                        + "  ".join(f"{k.removesuffix('_loss')} {v:.3f}" for k, v in means.items() if k != "total")
                        + f"  {rate:.0f} samples/s")
        return means

    def _save(self) -> None:
        """Full weights in RUN/model.pt (rank 0) and a digest of every rank's parameters."""
        with _zero3_gather(self.engine, self.cfg):
            state = _fp32_state(self.engine.module)
            digest = _params_digest(state)
            if self.rank == 0:
                payload = {"state_dict": state,
                           "specs": [vars(s) for s in self.specs], "num_classes": self.info.num_classes,
                           "mode": self.cfg.mode, "fusion": vars(self.cfg.fusion), "config": self.cfg.to_dict(),
                           "modalities": self.modalities}
                torch.save(payload, self.out / MODEL_FILE)
        (self.out / f"params-rank{self.rank}.sha256").write_text(digest + "\n")

    def _make_val_loader(self) -> BaseLoader | None:
        """Rank 0 validates; under ZeRO-3 no rank holds the whole model, so validation waits for eval."""
        if self.rank != 0 or self.info.samples("val") == 0 or self.cfg.eval_every == 0:
            return None
        if self.cfg.optim.zero_stage == 3:
            print("note: per-epoch validation is off under ZeRO-3; run `cotrain eval --which last`", file=sys.stderr)
            return None
        return make_loader(self.info, "val", self.cfg.loader, modalities=list(self.modalities), training=False)

    def _validate(self, epoch: int, train_means: dict[str, float]) -> None:
        """Score every branch on val; keep each branch's best weights by its own val accuracy."""
        last = epoch + 1 == self.cfg.epochs
        if self.val_loader is None or ((epoch + 1) % self.cfg.eval_every and not last):
            return
        scores = score_branches(self.engine.module, self.val_loader, prepare=self._cast)
        improved = [b for b, s in scores.items() if s["accuracy"] > self.best.get(b, {"accuracy": -1.0})["accuracy"]]
        state = _fp32_state(self.engine.module) if improved else None  # one copy, however many branches improved
        for branch in improved:
            self.best[branch] = dict(scores[branch], epoch=epoch + 1)
            (self.out / BEST_DIR).mkdir(exist_ok=True)
            torch.save(state, self.out / BEST_DIR / f"{branch}.pt")
        self.history.append({"epoch": epoch + 1, "train": train_means,
                             "val": {b: s["accuracy"] for b, s in scores.items()}})
        _log(0, "  val " + "  ".join(f"{b} {s['accuracy']:.3f}" for b, s in scores.items()))

    def _report_validation(self) -> None:
        if self.rank != 0 or not self.best:
            return
        (self.out / "history.json").write_text(json.dumps(self.history, indent=2) + "\n")
        result = {"split": "val", "mode": self.cfg.mode, "which": "best", "branches": self.best}
        (self.out / "eval-val.json").write_text(json.dumps(result, indent=2) + "\n")
        _log(0, "best val  " + "  ".join(f"{b} {s['accuracy']:.3f} (epoch {s['epoch']})" for b, s in self.best.items()))
        print_warning(result)

    def fit(self) -> None:
        if self.rank == 0:
            save_config(self.cfg, self.out / "config.json")
        url = self.metrics.serve(host=self.cfg.metrics.host, port=self.cfg.metrics.port + self.local_rank
                                 if self.cfg.metrics.port else 0)
        _log(self.rank, f"training {self.cfg.mode} on {', '.join(self.modalities)}: {self.world} rank(s), "
                        f"{self.loader.steps_per_epoch} steps/epoch, metrics at {url or 'off'}")
        try:
            for epoch in range(self.cfg.epochs):
                self._validate(epoch, self._epoch(epoch))
            self._save()
            self._report_validation()
        finally:
            self.metrics.close()


def train(cfg: RunConfig) -> Path:
    """Train one run and return its directory."""
    Trainer(cfg).fit()
    return Path(cfg.out)

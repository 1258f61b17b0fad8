"""The training loop: DALI batches -> co-trained model under DeepSpeed -> metrics -> checkpoint."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from model.cotrain import TEACHER, ModalitySpec, build_model
from model.objective import step_loss
from model.presets import modality_specs
from pipeline.dali_loader import model_inputs
from pipeline.loader import BaseLoader, make_loader
from pipeline.dataset import load_dataset_info

from .assemble import assemble_on_validation, save_part
from .checkpoint import CHECKPOINT_DIR, latest_tag, load_checkpoint, save_checkpoint
from .config import RunConfig, config_hash, deepspeed_config, hashed_config, save_config
from .device import all_reduce_flags, broadcast_object, check_torch_sees_gpu, compute_dtype, force_cpu, \
    loader_device_id
from .engine import build_engine, init_distributed, rank_info
from .evaluate import BEST_DIR, MODEL_FILE, print_warning, score_branches, task_of
from .finetune import param_groups
from .progress import progress_bar, progress_wanted
from .run_folder import record_shards
from .metrics import TrainingMetrics, read_grad_norm, write_scrape_target
from .readback import StepReadback
from .scores import is_better, metric_error, primary_metric

__all__ = ["train", "READ_EVERY_STEPS"]

READ_EVERY_STEPS = 10
"""Loss terms, metrics and the gradient norm are read back from the device once per this many steps."""


def _specs(cfg: RunConfig, modalities: dict[str, dict]) -> list[ModalitySpec]:
    shapes = model_inputs(modalities, cfg.loader)
    return modality_specs(modalities, shapes, shared_stages=cfg.shared_stages, encoders=cfg.encoders,
                          video_frames=cfg.loader.video_frames)


def _version() -> str:
    try:
        return importlib.metadata.version("cotrain")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _log(rank: int, message: str) -> None:
    if rank == 0:
        tqdm.write(message, file=sys.stdout)  # above a step bar, not through it
        sys.stdout.flush()


def _show_loss(bar, records) -> None:
    """The last loss read back, on the step bar: only values the loop has already read, so the bar adds no
    device-to-host copy of its own."""
    if records:
        bar.set_postfix(loss=f"{records[-1].total:.4f}", refresh=False)


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
    """Owns the loop of one run; `fit()` trains, checkpoints, validates and saves."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, allow_reshard: bool = False, device: str = "auto",
                 progress: bool = False):
        self.cfg, self.out = cfg, Path(cfg.out)
        if device == "cpu":
            force_cpu()
        check_torch_sees_gpu(device)
        self.out.mkdir(parents=True, exist_ok=True)
        init_distributed(cfg.cpu_threads)
        self.rank, self.local_rank, self.world = rank_info()
        self.progress = progress_wanted(self.rank, quiet=not progress)  # a step bar per epoch, or none
        self.gpu = device != "cpu" and torch.cuda.is_available()
        self.device_id = loader_device_id(self.local_rank) if self.gpu else None  # where the loaders decode
        torch.manual_seed(cfg.seed)
        self.info = load_dataset_info(cfg.shards)
        self.modalities = self.info.select(cfg.modalities)
        self.loader = make_loader(self.info, "train", cfg.loader, modalities=list(self.modalities), training=True,
                                  seed=cfg.seed, rank=self.rank, world_size=self.world,
                                  device_id=self.device_id, backend=cfg.loader.backend)
        self.specs = _specs(cfg, self.modalities)
        # the one source of the task type: the loss (cfg.task), validation and the report all read it from here
        self.task, self.task_size = task_of(self.info)
        cfg.task.type = self.task
        model = self._build_model()
        steps = self.loader.steps_per_epoch
        self.total_steps = cfg.epochs * steps  # micro-steps: the transfer schedule's clock
        optimizer_steps = cfg.epochs * math.ceil(steps / cfg.optim.grad_accum)
        ds_config = deepspeed_config(cfg, total_steps=optimizer_steps, bf16=self.gpu)
        self.engine, self.scheduler = build_engine(model, ds_config, param_groups(model, self.specs, cfg.optim))
        self.dtype = compute_dtype(ds_config)  # inputs and rank 0's evaluation copy follow the engine's weights
        self.readback = StepReadback(READ_EVERY_STEPS)
        self.metrics = TrainingMetrics(rank=self.rank, local_rank=self.local_rank, gpu=self.gpu)
        self.metrics.describe_run(version=_version(), zero_stage=cfg.optim.zero_stage, world_size=self.world,
                                  mode=cfg.mode, checkpoint_every=cfg.checkpoint.save_every)
        self.state = LoopState()
        self.val_loader, self.eval_model = self._make_validation()
        self._signalled = False  # set by the handler, on this rank only
        self._stop = False       # agreed by every rank in _agree, so all of them checkpoint together
        self._chosen_weight: float | None = None  # the teacher's Transformer weight rank 0's validation chose
        if resume:
            self._restore(allow_reshard)

    def _build_model(self, load_weights: bool = True):
        """The model this run trains (also rank 0's plain copy for validation under ZeRO-3, which needs no
        pretrained weights: the trained ones are copied in)."""
        cfg = self.cfg
        return build_model(self.specs, self.info.num_classes, mode=cfg.mode, fusion=cfg.fusion, init_seed=cfg.seed,
                           students=cfg.students or None, task=cfg.task.type,
                           feature_transfer=cfg.transfer.feature > 0, load_weights=load_weights)

    # --- checkpoints -------------------------------------------------------------------------------------
    def _restore(self, allow_reshard: bool) -> None:
        loaded = load_checkpoint(self.engine, self.out, rank=self.rank, world_size=self.world,
                                 config_hash=config_hash(self.cfg), allow_reshard=allow_reshard,
                                 config=hashed_config(self.cfg))
        if loaded is None:
            _log(self.rank, f"no checkpoint in {self.out / CHECKPOINT_DIR}: starting from scratch")
            return
        saved, exact = loaded
        self.state = LoopState(**saved["trainer"])
        if exact and saved.get("loader") is not None and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(saved["loader"])
        elif exact:
            _log(self.rank, "warning: this loader cannot restore its position; the epoch goes on from a fresh order")
        _log(self.rank, f"resumed {self.out} at step {self.state.step} (epoch {self.state.epoch + 1}, "
                        f"batch {self.state.batch_in_epoch}/{self.loader.steps_per_epoch})")

    def _checkpoint(self) -> None:
        started = time.perf_counter()
        self._record(self.readback.flush())  # the checkpointed epoch sums cover every step taken
        loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        tag = save_checkpoint(self.engine, self.out, step=self.state.step, rank=self.rank, world_size=self.world,
                              config_hash=config_hash(self.cfg), keep=self.cfg.checkpoint.keep,
                              config=hashed_config(self.cfg),
                              rank_state={"trainer": dataclasses.asdict(self.state), "loader": loader_state})
        self.metrics.record_checkpoint(time.perf_counter() - started)
        _log(self.rank, f"checkpoint {tag} saved in {time.perf_counter() - started:.1f}s")

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002 -- signal handler signature
        self._signalled = True

    def _inject_faults(self) -> None:
        """Test hooks (env COTRAIN_FAULT_KILL_AT_STEP / COTRAIN_FAULT_SIGTERM_AT_STEP): kill -9 every rank, or
        SIGTERM rank 0 only, right after that micro-step, so crash and pre-emption tests are deterministic."""
        if os.environ.get("COTRAIN_FAULT_KILL_AT_STEP") == str(self.state.step):
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("COTRAIN_FAULT_SIGTERM_AT_STEP") == str(self.state.step) and self.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    # --- one micro-step ----------------------------------------------------------------------------------
    def _cast(self, batch):
        """The batch on the engine's device (from pinned memory), float inputs in the engine's dtype (bf16 weights
        need bf16 inputs); ids and masks stay as they are."""
        batch = batch.to(self.engine.device)
        if self.dtype != torch.float32:
            batch.inputs = {m: x.to(self.dtype) if x.is_floating_point() else x for m, x in batch.inputs.items()}
        return batch

    def _agree(self, bad) -> tuple[bool, bool]:
        """(any rank's loss is not finite, any rank was asked to stop): every rank must take the same
        branch, or a collective in backward would wait forever. `bad` may be a device tensor: this is the
        loop's one read back per step, which the decision to step needs."""
        bad, stop = all_reduce_flags([bad, self._signalled])
        return bad, stop

    def _micro_step(self, batch, last_in_epoch: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """Forward, then backward and (at a group boundary) an optimizer step; None when skipped. The loss
        terms come back as device tensors (read later, in one go, by self.readback)."""
        loss, terms = step_loss(self.engine, batch, transfer=self.cfg.transfer, task=self.cfg.task,
                                progress=self.state.step / max(self.total_steps, 1),
                                stream_label_smoothing=self.cfg.fusion.stream_label_smoothing,
                                muted=frozenset(self.state.muted))
        bad, self._stop = self._agree(~torch.isfinite(loss.detach()))
        if bad:
            self._skip_bad_step()
            return None
        self.state.bad_in_row = 0
        self.engine.backward(loss * self._group_rescale(last_in_epoch))
        self.engine.step()
        return terms, loss

    def _group_rescale(self, last_in_epoch: bool) -> float:
        """Declare the accumulation boundary ourselves, so a partial group at the end of an epoch is
        stepped, and rescale its losses: DeepSpeed divides by grad_accum, a group of k needs 1/k."""
        accum = self.cfg.optim.grad_accum
        if accum == 1:
            return 1.0
        if self.state.in_group == 0:
            self.state.group_size = min(accum, self.loader.steps_per_epoch - self.state.batch_in_epoch)
        self.state.in_group += 1
        boundary = self.state.in_group >= self.state.group_size or last_in_epoch
        self.engine.set_gradient_accumulation_boundary(boundary)
        size = self.state.group_size
        if boundary:
            self.state.in_group = 0
        return accum / size

    def _skip_bad_step(self) -> None:
        self.state.bad_in_row += 1
        self.state.bad_total += 1
        self.metrics.record_skip("nonfinite_loss")
        _log(self.rank, f"warning: step {self.state.step + 1}: loss is NaN or infinite on some rank; step skipped "
                        f"({self.state.bad_in_row} in a row, {self.state.bad_total} in all)")
        if self.state.bad_in_row >= self.cfg.checkpoint.max_bad_steps:
            latest = latest_tag(self.out)
            raise FloatingPointError(
                f"{self.state.bad_in_row} steps in a row had a NaN or infinite loss; stopping. "
                + (f"The last good checkpoint is {self.out / CHECKPOINT_DIR / latest}; " if latest else "")
                + "lower --lr, check the inputs for NaNs, or raise --grad-clip's strictness, then resume.")

    # --- epochs ------------------------------------------------------------------------------------------
    def _epoch(self) -> dict[str, float] | None:
        """The rest of the current epoch; the mean of each loss term, or None when stopped by SIGTERM."""
        self.engine.train()
        samples, started, waited = 0, time.perf_counter(), 0.0
        steps = self.loader.steps_per_epoch
        batches = itertools.islice(self.loader.epoch(), steps - self.state.batch_in_epoch)
        with progress_bar(enabled=self.progress, total=steps, initial=self.state.batch_in_epoch, unit="step",
                          desc=f"epoch {self.state.epoch + 1}/{self.cfg.epochs}", leave=False) as bar:
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                t1 = time.perf_counter()
                waited += t1 - t0
                result = self._micro_step(self._cast(batch), self.state.batch_in_epoch + 1 == steps)
                t2 = time.perf_counter()
                self.state.step += 1
                self.state.batch_in_epoch += 1
                if result is not None:
                    terms, total = result
                    records = self.readback.add(terms, total, batch_size=len(batch), step_seconds=t2 - t1,
                                                wait_seconds=t1 - t0, lr=self.scheduler.get_last_lr()[0],
                                                loader_skipped=dict(getattr(self.loader, "skipped", None) or {}))
                    self._record(records)
                    _show_loss(bar, records)
                    samples += len(batch)
                bar.update()
                if self._after_step():
                    return None
        self._record(self.readback.flush())
        means = {k: v / self.state.epoch_count for k, v in self.state.epoch_sums.items()}
        elapsed = max(time.perf_counter() - started, 1e-9)
        rate = samples * self.world / elapsed
        _log(self.rank, f"epoch {self.state.epoch + 1}/{self.cfg.epochs}  loss {means.get('total', float('nan')):.4f}  "
                        + "  ".join(f"{k.removesuffix('_loss')} {v:.3f}" for k, v in means.items() if k != "total")
                        + f"  {rate:.1f} samples/s  data wait {waited / elapsed:.1%}")
        return means

    def _record(self, records) -> None:
        """Metrics and the epoch's sums from steps read back together; the gradient norm is read once, for the
        last of them. The sums live in the checkpointed state, so a resumed epoch reports the whole epoch."""
        sums = self.state.epoch_sums
        for i, record in enumerate(records):
            host = record.host
            self.metrics.record_step(terms=record.terms, total=record.total, batch_size=host["batch_size"],
                                     step_seconds=host["step_seconds"], wait_seconds=host["wait_seconds"],
                                     lr=host["lr"], loader_skipped=host["loader_skipped"],
                                     grad_norm=read_grad_norm(self.engine) if i == len(records) - 1 else None)
            for k, v in dict(record.terms, total=record.total).items():
                sums[k] = sums.get(k, 0.0) + v
        self.state.epoch_count += len(records)

    def _after_step(self) -> bool:
        """Periodic checkpoint, SIGTERM, fault hooks; True when the run must stop now."""
        at_boundary = self.state.in_group == 0
        every = self.cfg.checkpoint.save_every
        if at_boundary and (self._stop or (every and self.engine.global_steps % every == 0
                                                     and self.engine.global_steps != self.state.saved_at)):
            self.state.saved_at = self.engine.global_steps
            self._checkpoint()
        self._inject_faults()
        return at_boundary and self._stop

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

    # --- validation --------------------------------------------------------------------------------------
    def _make_validation(self):
        """(val loader, eval copy) on rank 0. Under ZeRO-3 no rank holds the whole model, so every rank
        gathers the weights into rank 0's plain copy, which validates alone."""
        if self.rank != 0 or self.info.samples("val") == 0 or self.cfg.eval_every == 0:
            return None, None
        loader = make_loader(self.info, "val", self.cfg.loader, modalities=list(self.modalities), training=False,
                             device_id=self.device_id, backend=self.cfg.loader.backend)
        copy = None
        if self.cfg.optim.zero_stage == 3:  # in the engine's dtype, which _cast gives the inputs
            copy = self._build_model(load_weights=False).to(device=self.engine.device, dtype=self.dtype)
        return loader, copy

    def _validation_model(self):
        """(model to score, its fp32 state or None). Under ZeRO-3 the state gathered into rank 0's copy comes
        back too, so a branch that improves saves it as it is instead of copying the weights a second time."""
        if self.cfg.optim.zero_stage != 3:
            return self.engine.module, None
        with _zero3_gather(self.engine, self.cfg):  # a collective: every rank is here, only rank 0 keeps a copy
            state = _fp32_state(self.engine.module) if self.eval_model is not None else None
        if self.eval_model is not None:
            self.eval_model.load_state_dict(state)
        return self.eval_model, state

    def _validate(self, epoch: int, train_means: dict[str, float]) -> dict[str, float] | None:
        """Score every branch on val; keep each branch's best weights by its own val accuracy. Returns
        {branch: primary metric} on rank 0, None elsewhere or when this epoch does not validate."""
        last = epoch + 1 == self.cfg.epochs
        if self.cfg.eval_every == 0 or ((epoch + 1) % self.cfg.eval_every and not last):
            return None
        model, gathered = self._validation_model()
        if self.val_loader is None:
            return None
        task = self.task
        kept = model.teacher_parts if self.cfg.fusion.assemble else []
        scores = score_branches(model, self.val_loader, prepare=self._cast, task=task, size=self.task_size,
                                branches=model.branches + kept, candidates=True)
        scores = {b: {k: v for k, v in s.items() if k != "confusion"} for b, s in scores.items()}
        parts = {p: scores.pop(p) for p in kept}
        weight = self._choose_transformer_weight(model, scores, gathered)
        self.metrics.record_eval("val", scores, epoch=epoch + 1)
        improved = [b for b, s in scores.items() if is_better(task, s, self.state.best.get(b))]
        parts_improved = [p for p, s in parts.items() if is_better(task, s, self.state.part_best.get(p))]
        # one copy, however many branches improved; none at all under ZeRO-3, where the gathered state is it
        state = (gathered if gathered is not None else _fp32_state(model)) if improved or parts_improved else None
        folder = self.out / BEST_DIR
        for branch in improved:
            self.state.best[branch] = dict(scores[branch], epoch=epoch + 1)
            folder.mkdir(exist_ok=True)
            torch.save(state, folder / f"{branch}.pt")
        for part in parts_improved:
            self.state.part_best[part] = dict(parts[part], epoch=epoch + 1)
            save_part(model, folder, part, state)
        metric = primary_metric(task)
        self.state.history.append({"epoch": epoch + 1, "train": train_means, "metric": metric,
                                   "val": {b: s[metric] for b, s in scores.items()}})
        if parts:
            self.state.history[-1]["teacher_parts"] = {p: s[metric] for p, s in parts.items()}
        if weight is not None:
            self.state.history[-1]["transformer_weight"] = weight
        _log(0, f"  val {metric} " + "  ".join(f"{b} {s[metric]:.3f}" for b, s in scores.items()))
        return self.state.history[-1]["val"]

    def _choose_transformer_weight(self, model, scores: dict[str, dict], gathered: dict | None) -> float | None:
        """fusion.transformer_weights: the weight chosen on this validation (choose_transformer_weight) becomes
        the teacher's, in `model` (whose state the best weights save) and in `gathered` (its ZeRO-3 copy). The
        other ranks take it in _share_transformer_weight."""
        best = choose_transformer_weight(scores, self.task)
        if best is not None:
            model.set_transformer_weight(best)
            if gathered is not None:
                gathered["teacher.transformer_weight"].fill_(best)
            self._chosen_weight = best
        return best

    def _share_transformer_weight(self) -> None:
        """Every rank's teacher uses the weight rank 0's validation chose (a collective when it validated)."""
        chosen = broadcast_object(self._chosen_weight)
        if chosen is not None:
            self.engine.module.set_transformer_weight(chosen)

    def _guard(self, val: dict[str, float] | None) -> None:
        """transfer.guard: after a validation, mute the students the teacher does not clearly beat (rank 0
        decides, every rank follows, so the objective is the same everywhere)."""
        transfer = self.cfg.transfer
        if transfer.guard == "none" or self.cfg.mode != "cotrain":
            return
        decided = [broadcast_object(None if val is None else muted_students(val, self.task, transfer.guard_margin))]
        if decided[0] is None or decided[0] == self.state.muted:
            return
        self.state.muted = decided[0]
        if self.rank == 0:
            self.state.history[-1]["transfer_muted"] = decided[0]
            _log(0, "  transfer guard: " + (f"no transfer to {', '.join(decided[0])} (the teacher does not lead "
                                            f"by {transfer.guard_margin:.0%} on val)" if decided[0]
                                            else "transfer to every student"))

    def _assemble_teacher(self) -> None:
        """fusion.assemble (rank 0, after training): score the teacher assembled from its parts' best weights on
        validation under every Transformer weight; where it beats the best single-epoch teacher, it becomes the
        teacher that is evaluated (best/assembly.json, ops/assemble.py)."""
        parts = self.engine.module.teacher_parts
        single = self.state.best.get(TEACHER)
        if (self.rank != 0 or not self.cfg.fusion.assemble or not parts or single is None
                or set(parts) - set(self.state.part_best)):
            return
        model = self._build_model(load_weights=False).to(device=self.engine.device, dtype=self.dtype)
        record = assemble_on_validation(model, self.val_loader, self.out / BEST_DIR, single=single,
                                        part_epochs={p: self.state.part_best[p]["epoch"] for p in parts},
                                        weights=self.cfg.fusion.transformer_weights, task=self.task,
                                        size=self.task_size, prepare=self._cast)
        metric, score, weight = primary_metric(self.task), record["val"], record["transformer_weight"]
        _log(0, f"assembled teacher: val {metric} {score[metric]:.3f} (w {weight:g}; parts' epochs "
                + ", ".join(f"{p.removeprefix(TEACHER + '/')} {e}" for p, e in record["parts"].items())
                + f") against {single[metric]:.3f} at one epoch: " + ("used" if record["used"] else "not used"))
        if record["used"]:
            self.state.best[TEACHER] = dict(score, epoch=single["epoch"], assembled=record["parts"],
                                            transformer_weight=weight)

    def _report_validation(self) -> None:
        if self.rank != 0 or not self.state.best:
            return
        (self.out / "history.json").write_text(json.dumps(self.state.history, indent=2) + "\n")
        metric = primary_metric(self.task)
        result = {"split": "val", "mode": self.cfg.mode, "which": "best", "task": self.task,
                  "branches": self.state.best}
        (self.out / "eval-val.json").write_text(json.dumps(result, indent=2) + "\n")
        _log(0, f"best val {metric} " + "  ".join(f"{b} {s[metric]:.3f} (epoch {s['epoch']})"
                                                  for b, s in self.state.best.items()))
        print_warning(result)

    def fit(self) -> bool:
        """Train to the end (True), or until SIGTERM, after a checkpoint (False)."""
        if self.rank == 0:
            save_config(self.cfg, self.out / "config.json")
            record_shards(self.out, self.cfg.shards)
        url = self.metrics.serve(host=self.cfg.metrics.host, port=self.cfg.metrics.port + self.local_rank
                                 if self.cfg.metrics.port else 0)
        target = url and write_scrape_target(self.out, rank=self.rank, host=self.cfg.metrics.host,
                                             port=self.cfg.metrics.port + self.local_rank,
                                             folder=self.cfg.metrics.targets_dir or None)
        _log(self.rank, f"training {self.cfg.mode} on {', '.join(self.modalities)}: {self.world} rank(s), "
                        f"{self.loader.steps_per_epoch} steps/epoch, "
                        + ("" if self.gpu else f"{torch.get_num_threads()} CPU thread(s) per rank, ")
                        + f"metrics at {url or 'off'}")
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            while self.state.epoch < self.cfg.epochs:
                means = self._epoch()
                if means is None:
                    _log(self.rank, f"SIGTERM: checkpoint saved; continue with `cotrain train --resume {self.out}`")
                    return False
                val = self._validate(self.state.epoch, means)
                self._share_transformer_weight()
                self._guard(val)
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                self.state.epoch_sums, self.state.epoch_count = {}, 0
            self._save()
            self._assemble_teacher()
            self._report_validation()
            return True
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.metrics.close()
            if target:  # a finished rank leaves Prometheus' targets, so it is not reported down
                target.unlink(missing_ok=True)


@dataclass
class LoopState:
    """The loop's counters, saved in every checkpoint (identical on every rank)."""

    step: int = 0
    """Micro-steps taken (skipped ones included): the transfer schedule's clock."""
    epoch: int = 0
    batch_in_epoch: int = 0
    in_group: int = 0
    group_size: int = 1
    bad_in_row: int = 0
    bad_total: int = 0
    saved_at: int = -1
    best: dict = field(default_factory=dict)
    part_best: dict = field(default_factory=dict)
    """The teacher parts' best validation scores and epochs (fusion.assemble)."""
    history: list = field(default_factory=list)
    muted: list = field(default_factory=list)
    """Students the validation guard keeps from transfer, sorted (transfer.guard)."""
    epoch_sums: dict = field(default_factory=dict)
    """Sums of each loss term over the current epoch's finished steps (its history entry is their mean)."""
    epoch_count: int = 0
    """Steps those sums cover."""


def choose_transformer_weight(scores: dict[str, dict], task: str) -> float | None:
    """The Transformer weight whose teacher ("multimodal@<w>" in `scores`) scores best, the first of equals
    (None when there are no candidates). The candidates leave `scores`; the teacher's entry becomes the chosen
    one's score."""
    candidates = {float(b.split("@", 1)[1]): scores.pop(b) for b in list(scores) if b.startswith(f"{TEACHER}@")}
    best = None
    for weight, score in candidates.items():  # in the config's order, so ties go to the first
        if best is None or is_better(task, score, candidates[best]):
            best = weight
    if best is not None:
        scores[TEACHER] = candidates[best]
    return best


def muted_students(val: dict[str, float], task: str, margin: float) -> list[str]:
    """The students whose val error the teacher's is not at least `margin` (relative) below, sorted."""
    if TEACHER not in val:
        return []
    teacher = metric_error(task, val[TEACHER])
    return sorted(b for b, v in val.items() if b != TEACHER and teacher > (1 - margin) * metric_error(task, v))


def train(cfg: RunConfig, *, resume: bool = False, allow_reshard: bool = False, device: str = "auto",
          progress: bool = False) -> Path:
    """Train one run and return its directory (`device`: ops.device.DEVICES). progress=True draws a step bar per
    epoch where ops.progress allows one (rank 0, stderr a terminal); off for the demo, grids and tests."""
    Trainer(cfg, resume=resume, allow_reshard=allow_reshard, device=device, progress=progress).fit()
    return Path(cfg.out)

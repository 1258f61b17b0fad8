"""What every loader shares: the epoch plan, the resumable state and `make_loader`.

    state = (epoch, step): the next batch to hand out. epoch() yields batches step..steps_per_epoch-1
    of that epoch and moves on; the batch at (epoch, step) depends only on (seed, world size, rank,
    epoch, step), so restoring the pair gives exactly the batches an uninterrupted run would have had.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .batch import Batch
from .config import LOADER_BACKENDS, LoaderConfig, check_augment
from .dataset import DatasetInfo
from .order import epoch_order, eval_part, train_part, train_steps
from .samples import RateLimitedLog
from .source import SampleReader

__all__ = ["BaseLoader", "make_loader", "STATE_VERSION", "BACKENDS"]

STATE_VERSION = 1
BACKENDS = LOADER_BACKENDS


@dataclass(frozen=True)
class EpochPlan:
    """Picklable: what a worker needs to know which samples a (epoch, step) batch holds."""

    counts: tuple[int, ...]
    seed: int
    shuffle: bool
    by_shard: bool
    training: bool
    rank: int
    world_size: int
    batch_size: int

    def part(self, epoch: int) -> np.ndarray:
        """This rank's global sample indices of `epoch`, in order."""
        order = epoch_order(list(self.counts), seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                            by_shard=self.by_shard)
        if self.training:
            return train_part(order, rank=self.rank, world_size=self.world_size, batch_size=self.batch_size)
        return eval_part(order, rank=self.rank, world_size=self.world_size)

    def positions(self, part_length: int, step: int) -> range:
        return range(step * self.batch_size, min((step + 1) * self.batch_size, part_length))


class BaseLoader:
    """Training: `epoch()` yields the remaining batches of the current epoch, the same number on every
    rank. Evaluation: iterating yields one pass over this rank's part, each sample once (a last partial batch)."""

    backend = "base"

    def __init__(self, info: DatasetInfo, split: str, cfg: LoaderConfig, *, modalities: list[str] | None = None,
                 training: bool, seed: int = 0, rank: int = 0, world_size: int = 1, device_id: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}; ranks are 0..world_size-1")
        self.info, self.split, self.cfg, self.training = info, split, cfg, training
        self.seed, self.rank, self.world_size, self.device_id = int(seed), rank, world_size, device_id
        self.modalities = info.select(modalities)
        check_augment(cfg, self.modalities)
        self.shards = info.shards(split)
        self.reader = SampleReader(self.shards, s3_with_dali=self.backend == "dali")
        self.by_shard = not self.reader.random_access
        self.plan = EpochPlan(tuple(s.samples for s in self.shards), self.seed,
                              training and cfg.shuffle_buffer > 0, self.by_shard, training, rank, world_size,
                              cfg.batch_size)
        self.skipped: Counter = Counter()
        """Corrupt samples skipped so far on this rank, by reason (truncated_shard, bad_member, ...)."""
        self.log_skip = RateLimitedLog()
        self._epoch, self._step = 0, 0
        self._stream, self._stream_next = None, None

    # -- plan ----------------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Batches per training epoch, the same on every rank: the epoch's order is cut into world_size
        runs of steps * batch_size samples; the tail (< batch_size * world_size) sits this epoch out."""
        total = self.info.samples(self.split)
        if not self.training:
            return -(-len(self.part(0)) // self.cfg.batch_size)
        steps = train_steps(total, self.cfg.batch_size, self.world_size)
        if steps < 1:
            raise ValueError(f"split {self.split!r} has {total} samples, fewer than one batch on every rank "
                             f"({self.cfg.batch_size} x {self.world_size} ranks); lower --batch-size")
        return steps

    def part(self, epoch: int) -> np.ndarray:
        return self.plan.part(epoch)

    # -- state ---------------------------------------------------------------------------------------
    def _normalise(self) -> None:
        if self.training and self._step >= self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0

    def state_dict(self) -> dict:
        """Picklable: where the next batch comes from, and what must match for it to mean the same."""
        self._normalise()
        return {"version": STATE_VERSION, "epoch": self._epoch, "step": self._step, "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "split": self.split,
                "samples": self.info.samples(self.split), "batch_size": self.cfg.batch_size,
                "order": "by_shard" if self.by_shard else "global", "shuffle": self.cfg.shuffle_buffer > 0,
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`; call before the next `epoch()`. Refuses a state whose order would differ."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}; "
                             "it was saved by another cotrain version, restart the epoch without it")
        mine = self.state_dict()
        for field in ("seed", "world_size", "split", "samples", "batch_size", "order", "shuffle"):
            if state[field] != mine[field]:
                raise ValueError(f"loader state has {field}={state[field]!r} but this run has {mine[field]!r}; "
                                 f"the sample order would differ: resume with the same {field} "
                                 "(world size, seed, batch size and shards must match)")
        self._epoch, self._step = int(state["epoch"]), int(state["step"])
        self.skipped = Counter(state.get("skipped", {}))
        self._on_restore()

    def _on_restore(self) -> None:
        """Drop the read-ahead stream: its batches belong to the old position."""
        self.close()

    def close(self) -> None:
        """Stop the training stream (its workers or pipeline); a later epoch() opens a new one."""
        self._stream, self._stream_next = None, None

    # -- iteration -----------------------------------------------------------------------------------
    @property
    def position(self) -> tuple[int, int]:
        self._normalise()
        return self._epoch, self._step

    def epoch(self) -> Iterator[Batch]:
        """The remaining batches of the current training epoch."""
        self._normalise()
        epoch, steps = self._epoch, self.steps_per_epoch
        if self._stream is None or self._stream_next != (epoch, self._step):
            self.close()
            self._stream = self._open_stream(epoch, self._step)
        stream = self._stream
        while self._epoch == epoch and self._step < steps:
            tag, batch, skipped = next(stream)
            if tag != (self._epoch, self._step):
                raise RuntimeError(f"loader stream out of step: got batch {tag}, expected {self.position}")
            self.skipped.update(skipped)
            self._step += 1
            self._stream_next = (self._epoch, self._step) if self._step < steps else (self._epoch + 1, 0)
            yield batch
        self._normalise()

    def _open_stream(self, epoch: int, step: int) -> Iterator[tuple[tuple[int, int], Batch, Counter]]:
        """Batches from (epoch, step) on, across epochs, each tagged with its (epoch, step)."""
        raise NotImplementedError

    def _tags(self, epoch: int, step: int) -> Iterator[tuple[int, int]]:
        while True:
            for s in range(step, self.steps_per_epoch):
                yield epoch, s
            epoch, step = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError


def dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def make_loader(info: DatasetInfo, split: str, cfg: LoaderConfig, *, modalities: list[str] | None = None,
                training: bool, seed: int = 0, rank: int = 0, world_size: int = 1, device_id: int | None = None,
                backend: str = "auto") -> BaseLoader:
    """A loader of `split`: DALI when importable (backend="auto") or asked for, else webdataset + torch workers."""
    if backend not in BACKENDS:
        raise ValueError(f"loader backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "dali" if dali_importable() else "wds"
    if backend == "dali":
        if not dali_importable():
            raise ImportError("backend 'dali' needs nvidia-dali (`make setup` installs the build for this machine: "
                              "nvidia-dali-cuda120 or nvidia-dali-cuda130); "
                              "or use backend 'wds'")
        from .dali_loader import DaliLoader as chosen
    else:
        from .wds_loader import WdsLoader as chosen
    return chosen(info, split, cfg, modalities=modalities, training=training, seed=seed, rank=rank,
                  world_size=world_size, device_id=device_id)

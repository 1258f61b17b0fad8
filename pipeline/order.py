"""Which samples each rank reads, in which order, in every epoch: a pure function of
(seed, epoch, rank, world size), so both loaders agree and a saved (epoch, step) resumes exactly.

    epoch order:  a permutation of the split's global sample indices, seeded by (seed, epoch)
                  (global when every shard can be read by offset; shard blocks otherwise: shard order
                  shuffled, then samples within each shard, so a streamed shard is read once)
    rank part:    training: the r-th of `world` contiguous runs of steps * batch samples; the tail
                  (fewer than batch * world samples) is left out of this epoch only
                  evaluation: the r-th of `world` near-equal contiguous runs, every sample once
"""
from __future__ import annotations

import numpy as np

__all__ = ["epoch_order", "train_part", "eval_part", "train_steps", "sample_rng"]


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) & 0xFFFFFFFF for w in words])


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch (augmentation, temporal offset): independent of the
    rank, the batch and the backend, so restored and parallel runs draw the same values."""
    return _rng(seed, epoch, index, 0x5A17)


def epoch_order(counts: list[int], *, seed: int, epoch: int, shuffle: bool, by_shard: bool) -> np.ndarray:
    """Global sample indices of one epoch, in reading order."""
    total = int(sum(counts))
    if not shuffle:
        return np.arange(total, dtype=np.int64)
    rng = _rng(seed, epoch, 0x0DE7)
    if not by_shard:
        return rng.permutation(total).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    blocks = [starts[s] + rng.permutation(counts[s]) for s in rng.permutation(len(counts))]
    return np.concatenate(blocks).astype(np.int64) if blocks else np.zeros(0, np.int64)


def train_steps(total: int, batch_size: int, world_size: int) -> int:
    """Batches per training epoch, the same on every rank."""
    return total // (batch_size * world_size)


def train_part(order: np.ndarray, *, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    span = train_steps(len(order), batch_size, world_size) * batch_size
    return order[rank * span:(rank + 1) * span]


def eval_part(order: np.ndarray, *, rank: int, world_size: int) -> np.ndarray:
    return np.array_split(order, world_size)[rank]

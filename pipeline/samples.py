"""What both loaders share between reading and decoding: per-sample random choices, the corrupt-sample
policy, labels and lengths. Everything here depends only on (seed, epoch, sample index), never on the
backend, the batch or the worker that handles the sample."""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .config import LoaderConfig
from .order import sample_rng
from .source import CorruptSample, SampleReader, check_sample

__all__ = ["SampleChoices", "choose", "model_frames", "read_or_replace", "encode_labels", "RateLimitedLog"]

log = logging.getLogger("cotrain.pipeline")


@dataclass(frozen=True)
class SampleChoices:
    """Per modality: first frame of the temporal window and whether to flip horizontally."""

    start: dict[str, int]
    flip: dict[str, bool]


def model_frames(spec: dict, cfg: LoaderConfig) -> int:
    """Frames the model sees of a video/depth modality."""
    stored = int(spec["frames"])
    return stored if cfg.video_frames == 0 else min(cfg.video_frames, stored)


def choose(cfg: LoaderConfig, modalities: dict[str, dict], *, seed: int, epoch: int, index: int,
           training: bool) -> SampleChoices:
    """Random window in training, the centred one in evaluation; flips only where configured."""
    rng = sample_rng(seed, epoch, index)
    start, flip = {}, {}
    for name, spec in modalities.items():
        if spec["kind"] not in ("video", "depth"):
            continue
        spare = int(spec["frames"]) - model_frames(spec, cfg)
        offset, coin = int(rng.integers(0, spare + 1)), float(rng.random())  # always drawn: stable streams
        start[name] = offset if training else spare // 2
        flip[name] = training and coin < float(cfg.augment.get(name, {}).get("hflip", 0.0))
    return SampleChoices(start, flip)


class RateLimitedLog:
    """At most one line per reason every `interval` seconds; the counts are never limited."""

    def __init__(self, interval: float = 10.0):
        self.interval, self._last = interval, {}

    def __call__(self, reason: str, message: str, total: int) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) >= self.interval:
            self._last[reason] = now
            log.warning("skipped a corrupt sample (%s, %d so far): %s", reason, total, message)


def read_or_replace(reader: SampleReader, part: np.ndarray, position: int, modalities: dict[str, dict], *,
                    policy: str, skipped: Counter, logger: RateLimitedLog | None = None, decode=None):
    """(sample, decode(sample)) at `part[position]`; under `skip` a sample that fails to read, to pass the
    checks or to decode is replaced by the next good sample of the part (wrapping), so batches keep their
    size and every rank its batch count."""
    for attempt in range(len(part)):
        index = int(part[(position + attempt) % len(part)])
        try:
            sample = reader.read(index)
            check_sample(sample, modalities)
            return sample, (decode(sample) if decode is not None else None)
        except CorruptSample as error:
            if policy == "fail":
                raise CorruptSample(error.reason, f"{error.detail}; pass --on-corrupt skip to skip such "
                                                  "samples (they are counted) or rebuild the shard") from None
            skipped[error.reason] += 1
            if logger is not None:
                logger(error.reason, error.detail, skipped[error.reason])
    raise RuntimeError(f"every sample of this rank's part ({len(part)}) is corrupt; check the shards with "
                       "`cotrain shards verify`")


def encode_labels(metas: list[dict], label: dict) -> torch.Tensor:
    """class -> int64 (B,); regression -> float32 (B, D); multilabel -> float32 multi-hot (B, K)."""
    values = [m["label"] for m in metas]
    kind = label.get("type", "class")
    if kind == "class":
        return torch.tensor([int(v) for v in values], dtype=torch.int64)
    if kind == "regression":
        dim = int(label.get("dim", 1))
        return torch.tensor([[float(x) for x in np.atleast_1d(v)] for v in values],
                            dtype=torch.float32).reshape(len(values), dim)
    if kind == "multilabel":
        hot = torch.zeros(len(values), int(label["num_classes"]), dtype=torch.float32)
        for row, ids in enumerate(values):
            hot[row, [int(i) for i in ids]] = 1.0
        return hot
    raise ValueError(f"dataset.json label type {kind!r} is unknown; expected class, regression or multilabel")


def feature_length(data: bytes | None, spec: dict) -> int:
    """Valid frames of a features member (trimmed to max_frames); 0 when absent."""
    if data is None:
        return 0
    import io

    with io.BytesIO(data) as file:
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(file)
    return min(int(shape[0]), int(spec["max_frames"]))

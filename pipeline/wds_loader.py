"""The DALI-free loader: samples read with webdataset's URL openers (or by offset), decoded in-process by
PyAV (libav, one codec thread), the standard library and torch in DataLoader worker processes, one whole
batch per worker task; no process is started per clip.

    (epoch, step) --sampler--> worker: plan -> read (corrupt: replace) -> decode -> collate -> Batch
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from .batch import Batch
from .config import LoaderConfig
from .decode import DecodeError, audio_analysis, audio_features, decode_audio, decode_video, normalize_depth, \
    normalize_video
from .loader import BaseLoader, EpochPlan
from .samples import RateLimitedLog, SampleChoices, choose, encode_labels, feature_length, model_frames, \
    read_or_replace
from .source import CorruptSample, RawSample, SampleReader, read_npy

__all__ = ["WdsLoader", "decode_sample", "empty_input"]


def empty_input(spec: dict, cfg: LoaderConfig) -> torch.Tensor:
    """The zeros a missing modality gets: the shape its present samples have."""
    kind = spec["kind"]
    if kind in ("video", "depth"):
        channels = 3 if kind == "video" else 1
        return torch.zeros(channels, model_frames(spec, cfg), spec["height"], spec["width"])
    if kind == "audio":
        samples = int(spec["samples"])
        if cfg.audio_features == "waveform":
            return torch.zeros(samples)
        _, hop, _ = audio_analysis(int(spec["sample_rate"]), cfg)
        bands = cfg.n_mels if cfg.audio_features == "logmel" else cfg.n_mfcc
        return torch.zeros(bands, samples // hop + 1)
    if kind == "text":
        return torch.zeros(int(spec["max_tokens"]), dtype=torch.int32)
    if kind == "features":
        return torch.zeros(int(spec["max_frames"]), int(spec["dim"]))
    raise ValueError(f"modality kind {kind!r} is unknown; expected video, depth, audio, text or features")


def _decode_member(data: bytes, name: str, spec: dict, choices: SampleChoices, cfg: LoaderConfig) -> torch.Tensor:
    kind = spec["kind"]
    if kind == "video":
        frames = decode_video(data, height=spec["height"], width=spec["width"])
        if len(frames) < int(spec["frames"]):
            raise DecodeError(f"video decodes to {len(frames)} frames, dataset.json says {spec['frames']}")
        return normalize_video(frames, start=choices.start[name], count=model_frames(spec, cfg),
                               flip=choices.flip[name])
    if kind == "depth":
        depth = read_npy(data)
        return normalize_depth(depth, max_value=spec.get("max_value", np.iinfo(depth.dtype).max),
                               start=choices.start[name], count=model_frames(spec, cfg), flip=choices.flip[name])
    if kind == "audio":
        return audio_features(decode_audio(data, sample_rate=int(spec["sample_rate"])), int(spec["sample_rate"]), cfg)
    if kind == "text":
        return torch.from_numpy(np.frombuffer(data, "<i4").astype(np.int32))
    features = read_npy(data)[: int(spec["max_frames"])]
    out = torch.zeros(int(spec["max_frames"]), int(spec["dim"]))
    out[: len(features)] = torch.from_numpy(features.astype(np.float32))
    return out


def decode_sample(sample: RawSample, choices: SampleChoices, modalities: dict[str, dict],
                  cfg: LoaderConfig) -> tuple[dict, dict, dict]:
    """(inputs, present, lengths) of one sample; a member that does not decode raises CorruptSample."""
    inputs, present, lengths = {}, {}, {}
    for name, spec in modalities.items():
        data = sample.members.get(spec["ext"])
        present[name] = data is not None
        try:
            inputs[name] = empty_input(spec, cfg) if data is None else _decode_member(data, name, spec, choices, cfg)
        except DecodeError as error:
            raise CorruptSample("bad_member", f"{sample.key}.{spec['ext']}: {error}") from None
        if spec["kind"] == "text":
            lengths[name] = int((inputs[name] != 0).sum())
        elif spec["kind"] == "features":
            lengths[name] = feature_length(data, spec)
    return inputs, present, lengths


class _BatchTasks(torch.utils.data.Dataset):
    """dataset[(epoch, step)] -> ((epoch, step), Batch, skipped counts): one task per batch."""

    def __init__(self, plan: EpochPlan, reader: SampleReader, modalities: dict[str, dict], cfg: LoaderConfig,
                 label: dict):
        self.plan, self.reader, self.modalities, self.cfg, self.label = plan, reader, modalities, cfg, label
        self._parts: dict[int, np.ndarray] = {}
        self._log = RateLimitedLog()

    def _part(self, epoch: int) -> np.ndarray:
        if epoch not in self._parts:
            self._parts = {epoch: self.plan.part(epoch)}  # one epoch at a time is all a task needs
        return self._parts[epoch]

    def __len__(self) -> int:  # the sampler, not the length, decides what is read
        return 0

    def __getitem__(self, tag: tuple[int, int]):
        epoch, step = tag
        part, skipped = self._part(epoch), Counter()
        rows, samples = [], []
        for position in self.plan.positions(len(part), step):
            sample, row = self._read_and_decode(part, position, epoch, skipped)
            samples.append(sample)
            rows.append(row)
        return tag, self._collate(samples, rows), skipped

    def _read_and_decode(self, part: np.ndarray, position: int, epoch: int, skipped: Counter):
        def decode(sample: RawSample):
            choices = choose(self.cfg, self.modalities, seed=self.plan.seed, epoch=epoch, index=sample.index,
                             training=self.plan.training)
            return decode_sample(sample, choices, self.modalities, self.cfg)

        return read_or_replace(self.reader, part, position, self.modalities, policy=self.cfg.on_corrupt,
                               skipped=skipped, logger=self._log, decode=decode)

    def _collate(self, samples: list[RawSample], rows: list[tuple]) -> Batch:
        names = list(self.modalities)
        # default_collate stacks straight into shared memory in a worker: the batch is not copied again to
        # reach the training process (38 MB of fresh pages per 16 clips at 112x112x16)
        inputs = {m: torch.utils.data.default_collate([r[0][m] for r in rows]) for m in names}
        present = {m: torch.tensor([r[1][m] for r in rows], dtype=torch.bool) for m in names}
        lengths = {m: torch.tensor([r[2][m] for r in rows], dtype=torch.int64) for m in names if m in rows[0][2]}
        labels = encode_labels([s.meta for s in samples], self.label)
        return Batch(inputs, present, labels, [s.key for s in samples], lengths)


def batch_tasks(loader: BaseLoader) -> _BatchTasks:
    """dataset[(epoch, step)] of any loader's plan: also DaliLoader's way out of a batch DALI cannot decode."""
    return _BatchTasks(loader.plan, loader.reader, loader.modalities, loader.cfg, loader.info.label)


class WdsLoader(BaseLoader):
    """webdataset + torch DataLoader workers; the same batches as DaliLoader, without DALI."""

    backend = "wds"

    def _tasks(self, plan: EpochPlan) -> _BatchTasks:
        return batch_tasks(self)

    def _data_loader(self, tasks: _BatchTasks, tags):
        workers = self.cfg.workers
        return torch.utils.data.DataLoader(tasks, batch_size=None, sampler=tags, num_workers=workers,
                                           collate_fn=_as_is,
                                           prefetch_factor=2 if workers else None,
                                           # batches bound for a GPU are pinned in the loader's thread
                                           pin_memory=self.device_id is not None,
                                           multiprocessing_context=_worker_context() if workers else None,
                                           persistent_workers=False)

    def _open_stream(self, epoch: int, step: int):
        # an endless sampler: the workers run on across epoch boundaries, in order
        return iter(self._data_loader(self._tasks(self.plan), _Endless(self._tags(epoch, step))))

    def __iter__(self):
        tasks = self._tasks(self.plan)
        steps = -(-len(self.part(0)) // self.cfg.batch_size)
        for _tag, batch, skipped in self._data_loader(tasks, [(0, s) for s in range(steps)]):
            self.skipped.update(skipped)
            yield batch


def _worker_context():
    """forkserver, not fork: DALI's (and torch's) threads in this process make forked children crash or
    hang; the server preloads torch and this module, so each worker still starts in well under a second."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "pipeline.wds_loader"])
    return context


def _as_is(task):
    return task


class _Endless(torch.utils.data.Sampler):
    def __init__(self, tags):
        self.tags = tags

    def __iter__(self):
        return self.tags

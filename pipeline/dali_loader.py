"""NVIDIA DALI reads the shards (with their index files) and decodes every modality.

Video is decoded on the GPU (`device="mixed"`) when a device id is given and on DALI's CPU
operators otherwise; audio becomes per-sample-normalised log-mel features with DALI's
spectrogram operators. A sample lacking a modality gets zeros and `present = False`, through
DALI conditionals, so a batch never shrinks and every rank runs the same graph.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from .batch import Batch
from .dataset import DatasetInfo

__all__ = ["LoaderConfig", "DaliLoader", "model_inputs"]

META_EXT = "json"
VIDEO_MEAN, VIDEO_STD = 0.45 * 255, 0.225 * 255


@dataclass
class LoaderConfig:
    """How batches are made from the shards."""

    batch_size: int = 16
    """Samples per batch on each rank."""
    n_mels: int = 40
    """Mel bands of the audio features."""
    window_ms: float = 25.0
    """Audio analysis window."""
    hop_ms: float = 10.0
    """Audio hop between windows."""
    shuffle_buffer: int = 256
    """DALI's shuffle buffer (initial_fill) in training; 0 disables shuffling."""
    threads: int = 2
    """DALI CPU worker threads per rank."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"loader.batch_size must be >= 1, got {self.batch_size}")


def model_inputs(modalities: dict[str, dict], cfg: LoaderConfig) -> dict[str, dict]:
    """What each modality looks like to the model: the encoder arguments its shape implies."""
    shapes = {}
    for name, m in modalities.items():
        if m["kind"] in ("video", "depth"):
            shapes[name] = {"in_channels": 3}
        elif m["kind"] == "audio":
            shapes[name] = {"in_channels": cfg.n_mels}
        elif m["kind"] == "text":
            shapes[name] = {"vocab_size": int(m["vocab_size"])}
    return shapes


def _decode_video(data, spec: dict, gpu: bool):
    from nvidia.dali import fn, types

    if data.shape()[0] > 0:
        frames = fn.decoders.video(data, device="mixed" if gpu else "cpu")
    else:
        shape = [spec["frames"], spec["height"], spec["width"], 3]
        frames = fn.constant(idata=0, shape=shape, dtype=types.UINT8, layout="FHWC", device="gpu" if gpu else "cpu")
    # (T, H, W, C) uint8 -> (C, T, H, W) float, normalised
    return fn.crop_mirror_normalize(frames, dtype=types.FLOAT, output_layout="CFHW",
                                    mean=[VIDEO_MEAN] * 3, std=[VIDEO_STD] * 3)


def _decode_audio(data, spec: dict, cfg: LoaderConfig, gpu: bool):
    from nvidia.dali import fn, types

    rate = int(spec["sample_rate"])
    if data.shape()[0] > 0:
        wave, _ = fn.decoders.audio(data, downmix=True, sample_rate=rate, dtype=types.FLOAT)
    else:
        wave = fn.constant(fdata=0.0, shape=[int(spec["samples"])], dtype=types.FLOAT)
    if gpu:
        wave = wave.gpu()
    window = int(rate * cfg.window_ms / 1000)
    spec_ = fn.spectrogram(wave, nfft=int(2 ** np.ceil(np.log2(window))), window_length=window,
                           window_step=int(rate * cfg.hop_ms / 1000))
    mel = fn.mel_filter_bank(spec_, sample_rate=rate, nfilter=cfg.n_mels)
    log_mel = fn.to_decibels(mel, cutoff_db=-80.0)
    return fn.normalize(log_mel, epsilon=1e-3)  # (F, T), zero mean and unit variance per sample


def _text_ids(data, spec: dict):
    from nvidia.dali import fn, types

    if data.shape()[0] > 0:
        ids = data
    else:
        ids = fn.constant(idata=0, shape=[int(spec["max_tokens"])], dtype=types.INT32)
    return ids


def _reader_exts(modalities: dict[str, dict]) -> tuple[list[str], list]:
    from nvidia.dali import types

    exts, dtypes = [META_EXT], [types.UINT8]
    for m in modalities.values():
        exts.append(m["ext"])
        dtypes.append(types.INT32 if m["kind"] == "text" else types.UINT8)
    return exts, dtypes


def build_pipeline(info: DatasetInfo, split: str, modalities: dict[str, dict], cfg: LoaderConfig, *,
                   shard_id: int, num_shards: int, training: bool, seed: int, device_id: int | None):
    """The DALI pipeline: reader -> per-modality decode -> (meta, x_m, present_m, ...)."""
    from nvidia.dali import fn, pipeline_def

    paths, index_paths = info.shard_paths(split)
    exts, dtypes = _reader_exts(modalities)
    gpu = device_id is not None

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.threads, device_id=device_id,
                  seed=seed + 7919 * shard_id, enable_conditionals=True, prefetch_queue_depth=2)
    def _pipe():
        shuffle = training and cfg.shuffle_buffer > 0
        raw = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=exts, dtypes=dtypes,
                                    missing_component_behavior="empty", random_shuffle=shuffle,
                                    initial_fill=max(cfg.shuffle_buffer, 1), shard_id=shard_id,
                                    num_shards=num_shards, pad_last_batch=not training, name="reader")
        outputs = [fn.pad(raw[0], fill_value=0)]  # variable-length JSON -> one uniform uint8 array
        for data, (name, spec) in zip(raw[1:], modalities.items()):
            present = data.shape()[0] > 0
            if spec["kind"] in ("video", "depth"):
                x = _decode_video(data, spec, gpu)
            elif spec["kind"] == "audio":
                x = _decode_audio(data, spec, cfg, gpu)
            else:
                x = _text_ids(data, spec)
            outputs += [x, present]
        return tuple(outputs)

    return _pipe()


class DaliLoader:
    """Iterates Batches from one split. Training: endless, shuffled, `steps_per_epoch` per epoch on
    every rank alike. Evaluation: exactly one pass over this rank's part, each sample once."""

    def __init__(self, info: DatasetInfo, split: str, cfg: LoaderConfig, *, modalities: list[str] | None = None,
                 training: bool, seed: int = 0, rank: int = 0, world_size: int = 1, device_id: int | None = None):
        self.info, self.split, self.cfg, self.training = info, split, cfg, training
        self.modalities = info.select(modalities)
        self.world_size = world_size
        self.pipe = build_pipeline(info, split, self.modalities, cfg, shard_id=rank, num_shards=world_size,
                                   training=training, seed=seed, device_id=device_id)
        self.pipe.build()
        self._iterator = self._make_iterator()

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, the same on every rank: the remainder of the split is left for the
        next epoch (training), so no rank ever waits on a collective another rank never joins."""
        steps = self.info.samples(self.split) // (self.cfg.batch_size * self.world_size)
        if steps < 1:
            raise ValueError(
                f"split {self.split!r} has {self.info.samples(self.split)} samples, fewer than one batch on every "
                f"rank ({self.cfg.batch_size} x {self.world_size} ranks); lower --batch-size"
            )
        return steps

    def _output_map(self) -> list[str]:
        names = ["meta"]
        for m in self.modalities:
            names += [m, f"{m}__present"]
        return names

    def _make_iterator(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self.training:  # endless: the reader wraps around epochs by itself
            return DALIGenericIterator([self.pipe], self._output_map(), size=-1, auto_reset=False)
        return DALIGenericIterator([self.pipe], self._output_map(), reader_name="reader",
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)

    def _to_batch(self, out: dict) -> Batch:
        metas = [json.loads(bytes(row.numpy()).rstrip(b"\0")) for row in out["meta"]]
        inputs = {m: out[m] for m in self.modalities}
        present = {m: out[f"{m}__present"].reshape(-1).bool() for m in self.modalities}
        labels = torch.tensor([int(meta["label"]) for meta in metas], dtype=torch.long)
        return Batch(inputs, present, labels, [meta["key"] for meta in metas])

    def __iter__(self):
        for outputs in self._iterator:
            yield self._to_batch(outputs[0])

    def epoch(self):
        """The next `steps_per_epoch` training batches."""
        iterator = iter(self)
        for _ in range(self.steps_per_epoch):
            yield next(iterator)

"""NVIDIA DALI decodes every modality; the samples are fed by an external source that follows the
loader's own epoch plan, so the order is seeded per epoch, resumable and identical to the DALI-free loader.

    plan (epoch, step) -> read members (corrupt: replace) -> fn.external_source -> per-modality decode ->
    (x_m, present_m) -> DALIGenericIterator -> Batch (keys, labels, lengths from the feed's queue)

Video is decoded on the GPU (`device="mixed"`, any codec NVDEC reads) when a device id is given and the
clips are at least NVDEC's minimum coded size for their codec, and by DALI's CPU decoder otherwise (then
copied to the GPU), except H.264, which DALI's CPU decoder cannot read: those clips are decoded in-process by
PyAV inside the feed (a thread pool) and enter the pipeline as frames. The feed reads ahead
(`READ_AHEAD_BATCHES`) in its thread pool, so reading and decoding overlap the training step. Audio becomes
per-sample-normalised log-mel or MFCC features with DALI's spectrogram operators. A missing modality
gets zeros and `present = False` through DALI conditionals, so a batch never shrinks.

Why not `fn.readers.webdataset` (it checkpoints in DALI 2.4): its shuffle is a buffer over the stored
order with its own random stream, it reads no `https://` or `pipe:` URL, and its order cannot match the
fallback loader's; the external source costs one Python read per member (pread by offset).
"""
from __future__ import annotations

import collections
import itertools
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .batch import Batch
from .config import LoaderConfig
from .decode import (CUTOFF_DB, DEPTH_MEAN, DEPTH_STD, NORMALIZE_EPSILON, VIDEO_MEAN, VIDEO_STD, DecodeError,
                     audio_analysis, decode_video)
from .loader import BaseLoader
from .samples import choose, encode_labels, feature_length, model_frames, read_or_replace
from .source import CorruptSample

__all__ = ["LoaderConfig", "DaliLoader", "model_inputs", "video_decoder", "NVDEC_MIN_SIZE", "READ_AHEAD_BATCHES"]

CPU_DECODABLE_CODECS = ("vp8", "vp9", "mjpeg")
# NVDEC's minimum coded (width, height) per codec, from NVIDIA's Video Codec SDK decoder capabilities (the driver
# reports them through cuvidGetDecoderCaps' nMinWidth/nMinHeight); below them DALI's mixed decoder fails with
# "Video is too small in at least one dimension".
NVDEC_MIN_SIZE = {"h264": (48, 16), "hevc": (144, 144), "vp8": (48, 16), "vp9": (128, 128), "av1": (128, 128),
                  "mjpeg": (64, 64)}
READ_AHEAD_BATCHES = 2
"""Batches the feed reads and decodes ahead of DALI's request, in its thread pool."""
_warned_small: set = set()


def model_inputs(modalities: dict[str, dict], cfg: LoaderConfig) -> dict[str, dict]:
    """What each modality looks like to the model: the encoder arguments its shape implies."""
    shapes = {}
    for name, m in modalities.items():
        if m["kind"] == "video":
            shapes[name] = {"in_channels": 3}
        elif m["kind"] == "depth":
            shapes[name] = {"in_channels": 1}
        elif m["kind"] == "audio":
            shapes[name] = {"in_channels": {"logmel": cfg.n_mels, "mfcc": cfg.n_mfcc, "waveform": 1}[
                cfg.audio_features]}
        elif m["kind"] == "text":
            shapes[name] = {"vocab_size": int(m["vocab_size"])}
        elif m["kind"] == "features":
            shapes[name] = {"in_channels": int(m["dim"]), "max_frames": int(m["max_frames"])}
    return shapes


def _codec(spec: dict) -> str | None:
    return spec.get("codec") or {"webm": "vp9", "avi": "mjpeg", "mp4": "h264"}.get(spec["ext"].rsplit(".")[-1])


def nvdec_reads(spec: dict) -> bool:
    """Whether NVDEC can decode this video modality's clips (its codec, at its stored size)."""
    minimum = NVDEC_MIN_SIZE.get(_codec(spec))
    return minimum is not None and spec["width"] >= minimum[0] and spec["height"] >= minimum[1]


def video_decoder(spec: dict, gpu: bool) -> str:
    """Who decodes a video modality: "mixed" (NVDEC), "cpu" (DALI's CPU decoder) or "feed" (PyAV in the feed,
    for what DALI's CPU decoder cannot read: H.264)."""
    if gpu and nvdec_reads(spec):
        return "mixed"
    return "cpu" if _codec(spec) in CPU_DECODABLE_CODECS else "feed"


def decoded_in_feed(spec: dict, gpu: bool) -> bool:
    """Video that reaches DALI as frames, decoded by PyAV in the feed."""
    return spec["kind"] == "video" and video_decoder(spec, gpu) == "feed"


def warn_if_too_small_for_nvdec(modalities: dict[str, dict]) -> None:
    """One warning per modality and size: clips below NVDEC's minimum decode on the CPU, and how to avoid it."""
    for name, spec in modalities.items():
        if spec["kind"] != "video" or nvdec_reads(spec):
            continue
        key = (name, _codec(spec), spec["width"], spec["height"])
        if key in _warned_small:
            continue
        _warned_small.add(key)
        width, height = NVDEC_MIN_SIZE.get(_codec(spec), (None, None))
        why = (f"below NVDEC's minimum coded size for {_codec(spec)} ({width}x{height})" if width
               else f"in a codec NVDEC does not read ({_codec(spec)})")
        warnings.warn(f"{name}: {spec['width']}x{spec['height']} clips are {why}, so they are decoded on the CPU "
                      f"and copied to the GPU. To decode on the GPU, build shards with `cotrain shards build ... "
                      f"--size {max(height or 128, spec['height'])}x{max(width or 128, spec['width'])}` "
                      "(or larger).", stacklevel=3)


# -- graph ------------------------------------------------------------------------------------------

def _zeros(shape: list[int], layout: str, gpu: bool):
    from nvidia.dali import fn, types

    return fn.constant(fdata=0.0, shape=shape, dtype=types.FLOAT, layout=layout, device="gpu" if gpu else "cpu")


def _video(data, spec: dict, cfg: LoaderConfig, start, flip, *, gpu: bool, decoder: str):
    """`decoder` from video_decoder(): frames decoded on the CPU go to the GPU in a GPU pipeline."""
    from nvidia.dali import fn, types

    present = data.shape()[0] > 0
    count = model_frames(spec, cfg)
    if present:
        frames = data if decoder == "feed" else fn.decoders.video(data, device=decoder)
        if gpu and decoder != "mixed":
            frames = frames.gpu()
        frames = fn.reshape(frames, layout="FHWC")
        clip = fn.slice(frames, start, fn.constant(idata=[count], dtype=types.INT32), axes=[0])
        # (T, H, W, C) uint8 -> (C, T, H, W) float, normalised; `mirror` is the per-sample horizontal flip
        x = fn.crop_mirror_normalize(clip, dtype=types.FLOAT, output_layout="CFHW", mirror=flip,
                                     mean=[VIDEO_MEAN] * 3, std=[VIDEO_STD] * 3)
    else:
        x = _zeros([3, count, spec["height"], spec["width"]], "CFHW", gpu)
    return x, present


def _depth(data, spec: dict, cfg: LoaderConfig, start, flip, *, gpu: bool):
    from nvidia.dali import fn, types

    present = data.shape()[0] > 0
    count = model_frames(spec, cfg)
    if present:
        depth = fn.decoders.numpy(data)
        depth = fn.expand_dims(fn.reshape(depth, layout="FHW"), axes=[3], new_axis_names="C")  # flip knows FHWC
        if gpu:
            depth = depth.gpu()
        clip = fn.slice(depth, start, fn.constant(idata=[count], dtype=types.INT32), axes=[0])
        clip = fn.flip(clip, horizontal=flip)
        max_value = float(spec.get("max_value", 255 if spec.get("dtype") == "uint8" else 65535))
        scaled = (fn.cast(clip, dtype=types.FLOAT) / max_value - DEPTH_MEAN) / DEPTH_STD
        x = fn.transpose(scaled, perm=[3, 0, 1, 2], output_layout="CFHW")
    else:
        x = _zeros([1, count, spec["height"], spec["width"]], "CFHW", gpu)
    return x, present


def _audio(data, spec: dict, cfg: LoaderConfig, *, gpu: bool):
    from nvidia.dali import fn, types

    rate = int(spec["sample_rate"])
    present = data.shape()[0] > 0
    if present:
        wave, _ = fn.decoders.audio(data, downmix=True, sample_rate=rate, dtype=types.FLOAT)
    else:
        wave = fn.constant(fdata=0.0, shape=[int(spec["samples"])], dtype=types.FLOAT)
    if gpu:
        wave = wave.gpu()
    if cfg.audio_features == "waveform":
        return wave, present
    window, hop, nfft = audio_analysis(rate, cfg)
    power = fn.spectrogram(wave, nfft=nfft, window_length=window, window_step=hop)
    mel = fn.mel_filter_bank(power, sample_rate=rate, nfilter=cfg.n_mels)
    features = fn.to_decibels(mel, cutoff_db=CUTOFF_DB)
    if cfg.audio_features == "mfcc":
        features = fn.mfcc(features, n_mfcc=cfg.n_mfcc)
    return fn.normalize(features, epsilon=NORMALIZE_EPSILON), present  # (F, T), zero mean, unit variance


def _text(data, spec: dict):
    from nvidia.dali import fn, types

    present = data.shape()[0] > 0
    if present:
        ids = data
    else:
        ids = fn.constant(idata=0, shape=[int(spec["max_tokens"])], dtype=types.INT32)
    return ids, present


def _features(data, spec: dict, *, gpu: bool):
    from nvidia.dali import fn, types

    present = data.shape()[0] > 0
    if present:
        rows = fn.decoders.numpy(data)
    else:
        rows = fn.constant(fdata=0.0, shape=[1, int(spec["dim"])], dtype=types.FLOAT)
        rows = fn.slice(rows, [0], [0], axes=[0])  # (0, D): the pad below fills it with zeros
    if gpu:
        rows = rows.gpu()
    # trimmed to max_frames and zero-padded up to it, (T, D)
    return fn.slice(rows, [0], [int(spec["max_frames"])], axes=[0], out_of_bounds_policy="pad"), present


def _feed_layout(modalities: dict[str, dict]) -> list[tuple[str, str]]:
    """(modality, what) for each external-source output: the member, then frame start and flip per clip."""
    layout = []
    for name, spec in modalities.items():
        layout.append((name, "data"))
        if spec["kind"] in ("video", "depth"):
            layout += [(name, "start"), (name, "flip")]
    return layout


def build_pipeline(modalities: dict[str, dict], cfg: LoaderConfig, feed, *, seed: int, device_id: int | None):
    """The DALI pipeline: external source -> per-modality decode -> (x_m, present_m, ...)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    layout = _feed_layout(modalities)
    dtypes = [types.INT32 if what == "start" or (what == "data" and modalities[name]["kind"] == "text")
              else types.INT32 if what == "flip" else types.UINT8 for name, what in layout]

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.threads, device_id=device_id, seed=seed,
                  enable_conditionals=True, prefetch_queue_depth=2, exec_dynamic=True)
    def _pipe():
        fed = fn.external_source(source=feed, num_outputs=len(layout), dtype=dtypes, batch=True)
        by_name = {(name, what): node for (name, what), node in zip(layout, fed)}
        outputs = []
        for name, spec in modalities.items():
            data = by_name[(name, "data")]
            kind = spec["kind"]
            if kind == "video":
                x = _video(data, spec, cfg, by_name[(name, "start")], by_name[(name, "flip")], gpu=gpu,
                           decoder=video_decoder(spec, gpu))
            elif kind == "depth":
                x = _depth(data, spec, cfg, by_name[(name, "start")], by_name[(name, "flip")], gpu=gpu)
            elif kind == "audio":
                x = _audio(data, spec, cfg, gpu=gpu)
            elif kind == "text":
                x = _text(data, spec)
            else:
                x = _features(data, spec, gpu=gpu)
            outputs += list(x)
        return tuple(outputs)

    return _pipe()


# -- feed -------------------------------------------------------------------------------------------

class _Feed:
    """Called by DALI once per batch: reads the next batch's members and queues its metadata.

    Training feeds go on across epochs from (epoch, step); an evaluation feed stops after one pass
    (its last batch padded with copies of its last sample, which the loader drops again)."""

    def __init__(self, loader: "DaliLoader", tags):
        self.loader, self.tags = loader, iter(tags)
        self.queue: collections.deque = collections.deque()
        self.layout = _feed_layout(loader.modalities)
        self.gpu = loader.device_id is not None
        self._parts: dict[int, np.ndarray] = {}
        self._ahead: collections.deque = collections.deque()  # (tag, per-sample futures), oldest first
        self._pool = ThreadPoolExecutor(max(1, loader.cfg.threads))

    def _part(self, epoch: int) -> np.ndarray:
        if epoch not in self._parts:  # read-ahead may straddle two epochs
            self._parts = {e: p for e, p in self._parts.items() if e >= epoch - 1}
            self._parts[epoch] = self.loader.part(epoch)
        return self._parts[epoch]

    def _read_ahead(self) -> None:
        """Submit batches to the thread pool until READ_AHEAD_BATCHES are in flight."""
        while len(self._ahead) < READ_AHEAD_BATCHES:
            tag = next(self.tags, None)
            if tag is None:
                return
            epoch, step = tag
            part = self._part(epoch)
            positions = self.loader.plan.positions(len(part), step)
            self._ahead.append((tag, [self._pool.submit(self._one, part, p, epoch) for p in positions]))

    def pending_tags(self) -> list:
        """Tags handed to DALI but not yet yielded, then those read ahead: where a rebuilt pipeline resumes."""
        return [queued[0] for queued in self.queue] + [tag for tag, _ in self._ahead]

    def __call__(self):
        self._read_ahead()
        if not self._ahead:
            raise StopIteration
        tag, futures = self._ahead.popleft()
        self._read_ahead()
        rows = [f.result() for f in futures]
        skipped = collections.Counter()
        for _sample, _row, counts in rows:
            skipped.update(counts)
        self.queue.append((tag, [r[0] for r in rows], skipped))
        rows = [r[1] for r in rows]
        rows += [rows[-1]] * (self.loader.cfg.batch_size - len(rows))
        return tuple([row[i] for row in rows] for i in range(len(self.layout)))

    def _one(self, part: np.ndarray, position: int, epoch: int):
        loader, skipped = self.loader, collections.Counter()

        def prepare(sample):
            choices = choose(loader.cfg, loader.modalities, seed=loader.seed, epoch=epoch, index=sample.index,
                             training=loader.training)
            return [self._array(sample, name, what, choices) for name, what in self.layout]

        sample, row = read_or_replace(loader.reader, part, position, loader.modalities, policy=loader.cfg.on_corrupt,
                                      skipped=skipped, logger=loader.log_skip, decode=prepare)
        return sample, row, skipped

    def _array(self, sample, name: str, what: str, choices) -> np.ndarray:
        spec = self.loader.modalities[name]
        if what == "start":
            return np.array([choices.start[name]], dtype=np.int32)
        if what == "flip":
            return np.array(int(choices.flip[name]), dtype=np.int32)
        data = sample.members.get(spec["ext"])
        if spec["kind"] == "text":
            return np.frombuffer(data, "<i4") if data is not None else np.zeros(0, np.int32)
        if data is None:
            return np.zeros((0, spec["height"], spec["width"], 3) if decoded_in_feed(spec, self.gpu) else 0, np.uint8)
        if decoded_in_feed(spec, self.gpu):
            try:
                return decode_video(data, height=spec["height"], width=spec["width"])
            except DecodeError as error:
                raise CorruptSample("bad_member", f"{sample.key}.{spec['ext']}: {error}") from None
        return np.frombuffer(data, np.uint8)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class DaliLoader(BaseLoader):
    """DALI decodes; the feed follows the loader's plan (see pipeline/loader.py for the epoch semantics)."""

    backend = "dali"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        gpu = self.device_id is not None
        self.video_decoders = {name: video_decoder(spec, gpu) for name, spec in self.modalities.items()
                               if spec["kind"] == "video"}
        """Who decodes each video modality (video_decoder): NVDEC only where it reads the stored size."""
        if gpu:
            warn_if_too_small_for_nvdec(self.modalities)

    def _run(self, tags):
        """(tag, Batch, skipped) per batch of `tags`, through a freshly built pipeline. Under `skip`, a batch
        DALI fails to decode is rebuilt by the DALI-free decoders (which replace the bad sample) and the
        pipeline restarts at the next batch; the rebuilt batch is the same on every run, so resume stays exact."""
        tags = iter(tags)
        while True:
            feed = _Feed(self, tags)
            try:
                yield from self._drain(feed)
                return
            except RuntimeError:
                if self.cfg.on_corrupt != "skip" or not feed.queue:
                    raise
                tag, _samples, skipped = feed.queue.popleft()
                tags = itertools.chain(feed.pending_tags(), tags)
                batch, fallback_skipped = self._decode_without_dali(tag)
                yield tag, batch, skipped + fallback_skipped
            finally:
                feed.close()

    def _drain(self, feed: "_Feed"):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pipe = build_pipeline(self.modalities, self.cfg, feed, seed=self.seed + 7919 * self.rank,
                              device_id=self.device_id)
        names = [f"{m}{suffix}" for m in self.modalities for suffix in ("", "__present")]
        for outputs in DALIGenericIterator([pipe], names, size=-1, auto_reset=False):
            tag, samples, skipped = feed.queue.popleft()
            yield tag, self._to_batch(outputs[0], samples), skipped

    def _decode_without_dali(self, tag: tuple[int, int]):
        from .wds_loader import batch_tasks

        _tag, batch, skipped = batch_tasks(self)[tag]
        self.log_skip("decode_error", f"DALI could not decode batch {tag}; decoded it without DALI", 1)
        return batch, skipped

    def _to_batch(self, out: dict, samples: list) -> Batch:
        count = len(samples)
        inputs = {m: out[m][:count] for m in self.modalities}
        present = {m: out[f"{m}__present"].reshape(-1)[:count].bool() for m in self.modalities}
        lengths = {}
        for name, spec in self.modalities.items():
            if spec["kind"] == "text":
                lengths[name] = (inputs[name] != 0).sum(dim=1).to(torch.int64).cpu()
            elif spec["kind"] == "features":
                lengths[name] = torch.tensor([feature_length(s.members.get(spec["ext"]), spec) for s in samples],
                                             dtype=torch.int64)
        labels = encode_labels([s.meta for s in samples], self.info.label)
        return Batch(inputs, present, labels, [s.key for s in samples], lengths)

    def _open_stream(self, epoch: int, step: int):
        return self._run(self._tags(epoch, step))

    def __iter__(self):
        steps = -(-len(self.part(0)) // self.cfg.batch_size)
        for _tag, batch, skipped in self._run([(0, s) for s in range(steps)]):
            self.skipped.update(skipped)
            yield batch

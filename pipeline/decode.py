"""DALI-free decoding to the batch contract (the fallback loader, and H.264 on DALI's CPU path), in-process:
video and non-WAV audio by PyAV (libav, no process per clip), WAV by the standard library.

Audio features follow DALI's operators formula for formula (measured against DALI 2.4 in
tests/test_pipeline_parity.py): spectrogram with the window sin^2(pi (i + 0.5) / N), centred frames
with reflect padding, power 2; Slaney mel filters normalised by their width; decibels relative to
the sample's maximum, floored at -80 dB; DCT-II (unnormalised) for MFCC; per-sample normalisation.
"""
from __future__ import annotations

import io
import re
import wave

import av
import numpy as np
import torch
from av.video.reformatter import Interpolation, VideoReformatter

from .config import LoaderConfig

__all__ = ["decode_video", "decode_audio", "audio_features", "normalize_video", "normalize_depth",
           "VIDEO_MEAN", "VIDEO_STD", "DEPTH_MEAN", "DEPTH_STD", "CUTOFF_DB", "NORMALIZE_EPSILON"]

VIDEO_MEAN, VIDEO_STD = 0.45 * 255, 0.225 * 255
DEPTH_MEAN, DEPTH_STD = 0.5, 0.5  # depth / max_value in [0, 1] -> [-1, 1]
CUTOFF_DB = -80.0
NORMALIZE_EPSILON = 1e-3
# Bicubic chroma upsampling with accurate rounding and full chroma interpolation comes closest to DALI's
# decoder (a mean of 0.35 8-bit levels, tests/test_pipeline_resume.py).
RGB_INTERPOLATION = Interpolation.BICUBIC | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
DECODE_THREADS = 1
"""Codec threads per decoded clip: loaders decode one clip per worker process or feed thread, so threads inside
one decoder only compete with the other workers (measured in bench/loader.py --decode-threads)."""


class DecodeError(Exception):
    """A member that does not decode; the loader's corrupt-sample policy decides what happens."""


def decode_video(data: bytes, *, height: int, width: int) -> np.ndarray:
    """Every frame of an encoded clip (VP8/VP9/MJPEG/H.264 in its container) as (T, H, W, 3) uint8 RGB,
    decoded in this process by PyAV with one codec thread (a loader runs one decoder per worker or thread)."""
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise DecodeError("member has no video stream")
            stream = container.streams.video[0]
            stream.thread_count = DECODE_THREADS
            to_rgb = VideoReformatter()  # one scaler context per clip, not one per frame
            frames = [to_rgb.reformat(frame, format="rgb24", interpolation=RGB_INTERPOLATION, threads=1).to_ndarray()
                      for frame in container.decode(stream)]
    except (av.error.FFmpegError, ValueError, IndexError) as error:
        raise DecodeError(f"video does not decode: {_pyav_message(error)}") from None
    if not frames:
        raise DecodeError("video decodes to no frames")
    if frames[0].shape != (height, width, 3):
        raise DecodeError(f"video decodes to {frames[0].shape[0]}x{frames[0].shape[1]} frames, dataset.json says "
                          f"{height}x{width}; rebuild the shards or fix dataset.json")
    return np.stack(frames)


def decode_audio(data: bytes, *, sample_rate: int) -> np.ndarray:
    """Mono float32 waveform in [-1, 1): 16-bit WAV at `sample_rate` by the standard library, anything else
    (FLAC, other WAV) by PyAV in this process, resampled to 16-bit mono at `sample_rate`."""
    if data[:4] == b"RIFF":
        try:
            with wave.open(io.BytesIO(data)) as reader:
                if reader.getsampwidth() == 2 and reader.getframerate() == sample_rate:
                    pcm = np.frombuffer(reader.readframes(reader.getnframes()), "<i2")
                    return _downmix(pcm, reader.getnchannels())
        except (wave.Error, EOFError) as error:
            raise DecodeError(f"WAV does not decode: {error}") from None
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise DecodeError("member has no audio stream")
            to_mono = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            parts = [out.to_ndarray().reshape(-1) for frame in container.decode(container.streams.audio[0])
                     for out in to_mono.resample(frame)]
            parts += [out.to_ndarray().reshape(-1) for out in to_mono.resample(None)]
    except (av.error.FFmpegError, ValueError) as error:
        raise DecodeError(f"audio does not decode: {_pyav_message(error)}") from None
    return _downmix(np.concatenate(parts) if parts else np.zeros(0, "<i2"), 1)


def _pyav_message(error: Exception) -> str:
    """PyAV's message without its errno prefix, e.g. 'Invalid data found when processing input'."""
    return re.sub(r"^\[Errno -?\d+\] ", "", str(error)) or type(error).__name__


def _downmix(pcm: np.ndarray, channels: int) -> np.ndarray:
    return (pcm.reshape(-1, channels).astype(np.float32) / 32768.0).mean(axis=1)


def _window(length: int) -> torch.Tensor:
    i = torch.arange(length, dtype=torch.float64)
    return torch.sin(torch.pi * (i + 0.5) / length) ** 2


def _hz_to_mel(f: np.ndarray) -> np.ndarray:  # Slaney: linear below 1 kHz, logarithmic above
    f = np.asarray(f, dtype=np.float64)
    return np.where(f >= 1000, 15 + np.log(np.maximum(f, 1e-9) / 1000) / (np.log(6.4) / 27), f / (200 / 3))


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return np.where(m >= 15, 1000 * np.exp((m - 15) * np.log(6.4) / 27), m * 200 / 3)


def _mel_filters(sample_rate: int, nfft: int, n_mels: int) -> torch.Tensor:
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    freqs = np.arange(nfft // 2 + 1) * sample_rate / nfft
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (freqs - low) / (centre - low), (high - freqs) / (high - centre)
    return torch.from_numpy(np.maximum(0, np.minimum(rising, falling)) * 2 / (high - low))  # (F, nfft/2+1)


def _dct2(n_in: int, n_out: int) -> torch.Tensor:
    n = np.arange(n_in)
    return torch.from_numpy(np.cos(np.pi / n_in * (n[None, :] + 0.5) * np.arange(n_out)[:, None]))


def audio_analysis(sample_rate: int, cfg: LoaderConfig) -> tuple[int, int, int]:
    """(window, hop, nfft) in samples."""
    window = int(sample_rate * cfg.window_ms / 1000)
    return window, int(sample_rate * cfg.hop_ms / 1000), int(2 ** np.ceil(np.log2(window)))


def audio_features(wave_: np.ndarray, sample_rate: int, cfg: LoaderConfig) -> torch.Tensor:
    """(F, T) normalised log-mel or MFCC of one waveform, or the waveform itself, as float32."""
    x = torch.from_numpy(np.ascontiguousarray(wave_, dtype=np.float32)).double()
    if cfg.audio_features == "waveform":
        return x.float()
    window, hop, nfft = audio_analysis(sample_rate, cfg)
    power = _power_spectrogram(x, window, hop, nfft)
    mel = _mel_filters(sample_rate, nfft, cfg.n_mels) @ power
    reference = mel.max().clamp_min(1e-30)
    decibels = 10 * torch.log10(torch.maximum(mel / reference, torch.tensor(10 ** (CUTOFF_DB / 10))))
    if cfg.audio_features == "mfcc":
        decibels = _dct2(cfg.n_mels, cfg.n_mfcc) @ decibels
    centred = decibels - decibels.mean()
    return (centred / torch.sqrt((centred ** 2).mean() + NORMALIZE_EPSILON)).float()


def _power_spectrogram(x: torch.Tensor, window: int, hop: int, nfft: int) -> torch.Tensor:
    """(nfft/2+1, T): frames centred on t * hop, reflect-padded at the ends, windowed, zero-padded to nfft."""
    half = window // 2
    padded = torch.nn.functional.pad(x[None, None], (half, half + window), mode="reflect")[0, 0]
    count = len(x) // hop + 1
    frames = padded.unfold(0, window, hop)[:count] * _window(window)
    return (torch.fft.rfft(frames, n=nfft, dim=1).abs() ** 2).T


def normalize_video(frames: np.ndarray, *, start: int, count: int, flip: bool) -> torch.Tensor:
    """(T_s, H, W, 3) uint8 -> (3, count, H, W) float32 from frame `start`, optionally mirrored.

    The channels are moved to the front while the pixels are still bytes (a quarter of the memory a float
    permute would stride through), then one conversion and two in-place passes give ((x - mean) / std) with
    the same float32 operations as before, without temporaries (at 224x224x16 the float permute alone cost
    more than decoding the clip)."""
    clip = frames[start:start + count]
    if flip:
        clip = clip[:, :, ::-1]
    planar = np.ascontiguousarray(clip.transpose(3, 0, 1, 2))  # (3, count, H, W) uint8
    return torch.from_numpy(planar).float().sub_(VIDEO_MEAN).div_(VIDEO_STD)


def normalize_depth(depth: np.ndarray, *, max_value: float, start: int, count: int, flip: bool) -> torch.Tensor:
    """(T_s, H, W) uint8/uint16 -> (1, count, H, W) float32."""
    clip = torch.from_numpy(depth[start:start + count].astype(np.float32))
    if flip:
        clip = clip.flip(2)
    return ((clip / float(max_value) - DEPTH_MEAN) / DEPTH_STD)[None]

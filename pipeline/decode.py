"""DALI-free decoding to the batch contract (the fallback loader, and H.264 on DALI's CPU path).

Audio features follow DALI's operators formula for formula (measured against DALI 2.4 in
tests/test_pipeline_parity.py): spectrogram with the window sin^2(pi (i + 0.5) / N), centred frames
with reflect padding, power 2; Slaney mel filters normalised by their width; decibels relative to
the sample's maximum, floored at -80 dB; DCT-II (unnormalised) for MFCC; per-sample normalisation.
"""
from __future__ import annotations

import io
import subprocess
import wave

import numpy as np
import torch

from .config import LoaderConfig

__all__ = ["decode_video", "decode_audio", "audio_features", "normalize_video", "normalize_depth",
           "VIDEO_MEAN", "VIDEO_STD", "DEPTH_MEAN", "DEPTH_STD", "CUTOFF_DB", "NORMALIZE_EPSILON"]

VIDEO_MEAN, VIDEO_STD = 0.45 * 255, 0.225 * 255
DEPTH_MEAN, DEPTH_STD = 0.5, 0.5  # depth / max_value in [0, 1] -> [-1, 1]
CUTOFF_DB = -80.0
NORMALIZE_EPSILON = 1e-3
FFMPEG_QUIET = ("ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin")


class DecodeError(Exception):
    """A member that does not decode; the loader's corrupt-sample policy decides what happens."""


def decode_video(data: bytes, *, height: int, width: int) -> np.ndarray:
    """Every frame of an encoded clip as (T, H, W, 3) uint8 RGB, through an ffmpeg process."""
    # bicubic chroma upsampling with accurate rounding comes closest to DALI's decoder (mean 0.35 levels)
    command = [*FFMPEG_QUIET, "-i", "pipe:", "-sws_flags", "bicubic+accurate_rnd+full_chroma_int",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    result = subprocess.run(command, input=data, capture_output=True, check=False)
    frame = height * width * 3
    if result.returncode != 0 or not result.stdout or len(result.stdout) % frame:
        message = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no frames"]
        raise DecodeError(f"video does not decode to {height}x{width} frames: {message[0]}")
    return np.frombuffer(result.stdout, dtype=np.uint8).reshape(-1, height, width, 3)


def decode_audio(data: bytes, *, sample_rate: int) -> np.ndarray:
    """Mono float32 waveform in [-1, 1): WAV by the standard library, anything else (FLAC) by ffmpeg."""
    if data[:4] == b"RIFF":
        try:
            with wave.open(io.BytesIO(data)) as reader:
                if reader.getsampwidth() == 2 and reader.getframerate() == sample_rate:
                    pcm = np.frombuffer(reader.readframes(reader.getnframes()), "<i2")
                    return _downmix(pcm, reader.getnchannels())
        except (wave.Error, EOFError) as error:
            raise DecodeError(f"WAV does not decode: {error}") from None
    command = [*FFMPEG_QUIET, "-i", "pipe:", "-f", "s16le", "-ac", "1", "-ar", str(sample_rate), "pipe:"]
    result = subprocess.run(command, input=data, capture_output=True, check=False)
    if result.returncode != 0:
        raise DecodeError(f"audio does not decode: {result.stderr.decode(errors='replace').strip()[-200:]}")
    return _downmix(np.frombuffer(result.stdout, "<i2"), 1)


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
    """(T_s, H, W, 3) uint8 -> (3, count, H, W) float32 from frame `start`, optionally mirrored."""
    clip = torch.from_numpy(frames[start:start + count].copy())
    if flip:
        clip = clip.flip(2)
    return ((clip.float() - VIDEO_MEAN) / VIDEO_STD).permute(3, 0, 1, 2).contiguous()


def normalize_depth(depth: np.ndarray, *, max_value: float, start: int, count: int, flip: bool) -> torch.Tensor:
    """(T_s, H, W) uint8/uint16 -> (1, count, H, W) float32."""
    clip = torch.from_numpy(depth[start:start + count].astype(np.float32))
    if flip:
        clip = clip.flip(2)
    return ((clip / float(max_value) - DEPTH_MEAN) / DEPTH_STD)[None]

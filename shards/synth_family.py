"""A family of synthetic video + audio corpora for choosing defaults by protocol (`cotrain shards synth
--task family`): the class count, the sample count, the frame size and how strongly each modality shows
the label are parameters, so defaults are chosen on some members (development) and reported on others
(evaluation) that nobody tuned to.

Each sample has a uniformly random class c of K. Per modality, independently, the class signal is *clear*
with probability strength[modality] (drawn at 0.6-1.0 of full amplitude) and *obscured* otherwise (0-0.3:
an occluded hand, a speaker drowned by noise), so each modality alone is uncertain on different samples
and a model that fuses them can be clearly better than either: about 1 - (1 - s_v)(1 - s_a)(1 - 1/K) when
obscured signals carry nothing, more where a faint signal remains. Errors come from missing evidence, not
from a modality confidently showing another class: with two modalities that disagree confidently, no
fusion can tell which one to believe, so such a corpus cannot test whether a multimodal model beats late
fusion. How close a model gets also depends on K and on the signals below.

- rgb (`video/K.mp4`, 16 frames at 8 fps, size x size, H.264): a Gaussian blob moves in one of
  D = min(K, 8) directions, coloured with one of ceil(K / D) hues: class c = hue * D + direction. A dimmer
  distractor blob of random colour moves in a random direction over a random background tint, under
  Gaussian pixel noise. Geometry scales with the frame size, so the task does not get easier with size.
- audio (`audio/K.wav`, 1 s, 16 kHz): two consecutive tones, the first at one of P = min(K, 10) pitches
  (300 Hz x 2^(i / P)), the second at one of ceil(K / P) intervals above or below it: class c = interval *
  P + pitch; random detune and onset, in white noise whose level does not depend on the tones' amplitude.

Everything is a function of (seed, sample index); splits follow shards/synth.py (70/15/15). `shown.jsonl`
beside the manifest holds each modality's visibility per sample (0..1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.synth import moving_blob, tone, tones_in_noise, write_wav
from shards.synth_media import write_mp4

__all__ = ["FamilyMember", "HUES", "INTERVALS", "render_family_sample"]

# Well separated hues (RGB in [0, 1]); K <= 8 * len(HUES) classes.
HUES = ((1.0, 0.25, 0.25), (0.25, 1.0, 0.25), (0.3, 0.45, 1.0), (1.0, 1.0, 0.2), (1.0, 0.3, 1.0),
        (0.2, 1.0, 1.0), (1.0, 0.65, 0.15))
# Ratios of the second tone to the first; K <= 10 * len(INTERVALS) classes.
INTERVALS = (1.5, 0.75, 1.26, 0.8, 2.0)
MAX_CLASSES = min(8 * len(HUES), 10 * len(INTERVALS))
VIDEO_NOISE = 0.12


class FamilyMember(dict):
    """One corpus of the family: {"classes", "size", "strength": {"rgb", "audio"}}, checked."""

    def __init__(self, *, classes: int = 10, size: int = 48, strength: dict | None = None):
        strength = {"rgb": 0.6, "audio": 0.5, **(strength or {})}
        if not 2 <= classes <= MAX_CLASSES:
            raise ValueError(f"family classes must be in 2..{MAX_CLASSES}, got {classes}")
        if not 16 <= size <= 256:
            raise ValueError(f"family size must be in 16..256 pixels, got {size}")
        unknown = sorted(set(strength) - {"rgb", "audio"})
        if unknown:
            raise ValueError(f"family strength has modalities rgb and audio; unknown {unknown}")
        for name, value in strength.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"family strength.{name} = {value} must be in [0, 1]: it is the chance the "
                                 "modality's signal is clear")
        super().__init__(classes=classes, size=size, strength=strength)


CLEAR, OBSCURED = (0.6, 1.0), (0.0, 0.3)


def render_family_sample(rng: np.random.Generator, out: Path, key: str, member: FamilyMember) -> tuple[dict, dict]:
    """Write one sample's media; return its manifest fields and how visible each modality's signal is."""
    k = member["classes"]
    label = int(rng.integers(k))
    seen = {name: round(float(rng.uniform(*(CLEAR if rng.random() < p else OBSCURED))), 3)
            for name, p in member["strength"].items()}
    write_mp4(out / "video" / f"{key}.mp4", render_family_video(rng, label, k, member["size"], seen["rgb"]))
    write_wav(out / "audio" / f"{key}.wav", render_family_audio(rng, label, k, seen["audio"]))
    return {"label": label, "rgb": f"video/{key}.mp4", "audio": f"audio/{key}.wav"}, seen


def render_family_video(rng: np.random.Generator, shown: int, classes: int, size: int,
                        visibility: float = 1.0) -> np.ndarray:
    """(frames, size, size, 3) uint8: a blob moving in the class's direction, in the class's hue, at
    `visibility` times its full brightness."""
    directions = min(classes, 8)
    angle = 2 * np.pi * (shown % directions) / directions
    hue = np.asarray(HUES[shown // directions])
    scale = size / 48
    background = rng.uniform(0.05, 0.35, size=3)
    signal = moving_blob(rng, angle, centre_range=(16 * scale, 32 * scale), speed_range=(0.8 * scale, 1.6 * scale),
                          brightness=visibility, size=size, sigma=3 * scale)
    distractor = moving_blob(rng, rng.uniform(0, 2 * np.pi), centre_range=(8 * scale, 40 * scale),
                              speed_range=(0.5 * scale, 1.5 * scale), brightness=0.35, size=size, sigma=3 * scale)
    frames = background + signal[..., None] * hue + distractor[..., None] * rng.uniform(0.3, 1.0, size=3)
    frames = frames + rng.normal(0.0, VIDEO_NOISE, size=frames.shape)
    return (np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)


def render_family_audio(rng: np.random.Generator, shown: int, classes: int, visibility: float = 1.0) -> np.ndarray:
    """int16 samples: a tone at the class's pitch, then one at its interval (amplitude 0.2 x `visibility`), in
    white noise of RMS 0.3 to 0.45 (a clear tone stands out in its frequency band; an obscured one barely)."""
    pitches = min(classes, 10)
    f1 = 300.0 * 2 ** ((shown % pitches) / pitches) * (1 + rng.uniform(-0.015, 0.015))
    f2 = f1 * INTERVALS[shown // pitches]
    amplitude = 0.2 * visibility
    tones = np.concatenate([tone(rng, f1, amplitude), tone(rng, f2, amplitude)])
    return tones_in_noise(rng, tones, rng.uniform(0.3, 0.45))

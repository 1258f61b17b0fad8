"""A synthetic video/audio/text corpus in which every modality carries the label noisily and differently.

Why: co-training unimodal branches with a multimodal teacher is only testable on a corpus where (a) each
modality alone is clearly imperfect and (b) the modalities together are clearly better than any one. A
corpus where one modality is near-perfect makes the teacher no stronger than that student, and the
method's own break condition says transfer from such a teacher hurts. So the design is:

- Complementary label noise. Per sample and per modality, independently, with probability `p_mislead`
  (rgb 0.2, audio 0.25, text 0.2) the modality shows the signal of a uniformly random *other* class, else
  the true class. Each modality alone is therefore capped at 1 - p_mislead (80%, 75%, ~74% for text, see
  below), while the errors of different modalities rarely coincide, so a model fusing all three can beat
  every single one (a majority vote over the three shown classes is right ~88% of the time).
- rgb (`video/<key>.mp4`, 16 frames at 8 fps, 48x48, H.264): a bright Gaussian blob (sigma 3 px) moves
  across the frame in direction 2*pi*c/num_classes for shown class c, with random start position and
  speed; a dimmer distractor blob moves in a random direction; a random background tint and Gaussian pixel
  noise (std 0.15 of the range) hide it. The class lives in the motion, not in any single frame, so a
  video model must look at time.
- audio (`audio/<key>.wav`, 1.0 s, 16 kHz mono int16): two consecutive 0.4 s tones with short fades whose
  frequency pair encodes the shown class (f1 = 300 * 2**(c/num_classes) Hz, f2 = f1 * 1.5 for even c,
  f1 * 0.75 for odd c), with a random +-3% detune, random amplitude, random time offset and white noise
  at about 0 dB SNR. Neighbouring classes differ by 2**(1/num_classes) in pitch, more than the detune.
- text (inline in the manifest): 2-5 filler words from a fixed neutral vocabulary with one class keyword
  (one of 3 synonyms per class) at a random position; with probability 0.1 the keyword is dropped and
  the text carries no label at all, so text is capped near 0.9 * 0.8 + 0.1 / num_classes = 74%.
- Splits are a seeded 70/15/15 train/val/test permutation and labels are uniform random, so a few hundred
  samples give every class in every split. Everything is a function of (seed, sample index): sample i uses
  np.random.default_rng([seed, i]), so the corpus is identical for any number of workers.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import wave
from pathlib import Path

import ffmpeg
import numpy as np
from tqdm import tqdm

__all__ = [
    "P_MISLEAD",
    "assign_splits",
    "class_keywords",
    "moving_blob",
    "render_audio",
    "render_text",
    "render_video",
    "tone",
    "tones_in_noise",
    "write_synthetic_corpus",
    "write_wav",
]

P_MISLEAD = {"rgb": 0.2, "audio": 0.25, "text": 0.2}
P_TEXT_DROP = 0.1
SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.15))  # the rest is "test"

VIDEO_FRAMES, VIDEO_FPS, VIDEO_SIZE = 16, 8, 48
SAMPLE_RATE, AUDIO_SECONDS, TONE_SECONDS, FADE_SECONDS = 16000, 1.0, 0.4, 0.01

FILLER_WORDS = (
    "the a this that some then and with over near today later small large quiet soft plain simple "
    "again maybe there here while during around about often every other same thing place moment "
    "sound image signal pattern sample little certain usual common"
).split()
CLASS_KEYWORDS = (
    ("north", "up", "upward"),
    ("east", "right", "rightward"),
    ("south", "down", "downward"),
    ("west", "left", "leftward"),
    ("inward", "center", "middle"),
    ("outward", "edge", "border"),
    ("clockwise", "turning", "spin"),
    ("static", "frozen", "motionless"),
)


def write_synthetic_corpus(out: Path | str, *, n: int = 600, seed: int = 0, num_classes: int = 6,
                           workers: int = 2, progress: bool = False) -> Path:
    """Write `n` samples under `out` (video/, audio/, manifest.jsonl) and return the manifest's path; with
    progress=True, a bar of samples written on stderr."""
    if n < 1 or num_classes < 2 or workers < 1:
        raise ValueError(f"need n >= 1, num_classes >= 2 and workers >= 1; got n={n}, "
                         f"num_classes={num_classes}, workers={workers}.")
    out = Path(out)
    for folder in ("video", "audio"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    splits = assign_splits(n, seed=seed)
    tasks = [(str(out), seed, index, splits[index], num_classes) for index in range(n)]
    # forkserver, not fork: forking a caller that holds threads (torch, DALI) can deadlock the child.
    with multiprocessing.get_context("forkserver").Pool(workers) as pool:
        records = list(tqdm(pool.imap(_write_sample, tasks, chunksize=4), total=n, disable=not progress,
                            desc="synth demo", unit="sample"))
    return _write_manifest(out / "manifest.jsonl", records)


def assign_splits(n: int, *, seed: int) -> list[str]:
    """A seeded permutation cut 70/15/15 into train/val/test, so split sizes are exact."""
    order = np.random.default_rng(seed).permutation(n)
    splits = ["test"] * n
    start = 0
    for name, fraction in SPLIT_FRACTIONS:
        stop = start + round(fraction * n)
        for index in order[start:stop]:
            splits[index] = name
        start = stop
    return splits


def _write_sample(task: tuple[str, int, int, str, int]) -> dict:
    """Render and write one sample; return its manifest record (runs in a pool worker)."""
    out, seed, index, split, num_classes = task
    rng = np.random.default_rng([seed, index])
    key = f"syn_{index:06d}"
    label = int(rng.integers(num_classes))
    shown = {name: _shown_class(rng, label, p, num_classes) for name, p in P_MISLEAD.items()}
    _write_mp4(Path(out, "video", f"{key}.mp4"), render_video(rng, shown["rgb"], num_classes=num_classes))
    write_wav(Path(out, "audio", f"{key}.wav"), render_audio(rng, shown["audio"], num_classes=num_classes))
    text = render_text(rng, shown["text"], num_classes=num_classes)
    return {"key": key, "split": split, "label": label, "rgb": f"video/{key}.mp4",
            "audio": f"audio/{key}.wav", "text": text}


def _shown_class(rng: np.random.Generator, label: int, p_mislead: float, num_classes: int) -> int:
    """The true class, or with probability p_mislead a uniformly random other class."""
    if rng.random() < p_mislead:
        return int((label + rng.integers(1, num_classes)) % num_classes)
    return label


def render_video(rng: np.random.Generator, shown: int, *, num_classes: int) -> np.ndarray:
    """(frames, H, W, 3) uint8: a blob moving in the class direction, a distractor, tint and noise."""
    angle = 2 * np.pi * shown / num_classes
    background = rng.uniform(0.05, 0.4, size=3)
    signal = moving_blob(rng, angle, centre_range=(16, 32), speed_range=(0.8, 1.6), brightness=0.9)
    distractor = moving_blob(rng, rng.uniform(0, 2 * np.pi), centre_range=(8, 40),
                              speed_range=(0.5, 1.5), brightness=0.35)
    colour = rng.uniform(0.6, 1.0, size=3)
    frames = background + (signal + distractor)[..., None] * colour  # (T, H, W, 3)
    frames = frames + rng.normal(0.0, 0.15, size=frames.shape)
    return (np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)


def moving_blob(rng: np.random.Generator, angle: float, *, centre_range: tuple[float, float],
                 speed_range: tuple[float, float], brightness: float, size: int = VIDEO_SIZE,
                 sigma: float = 3.0) -> np.ndarray:
    """(frames, size, size) intensities of a Gaussian (sigma px) moving along `angle` (0 = right, pi/2 = up)."""
    centre = rng.uniform(*centre_range, size=2)  # (x, y) where the path crosses mid-clip
    speed = rng.uniform(*speed_range)
    t = np.arange(VIDEO_FRAMES) - (VIDEO_FRAMES - 1) / 2
    x = centre[0] + t * speed * np.cos(angle)
    y = centre[1] - t * speed * np.sin(angle)  # image rows grow downwards
    grid = np.arange(size)
    dy = grid[None, :, None] - y[:, None, None]
    dx = grid[None, None, :] - x[:, None, None]
    return brightness * np.exp(-(dx**2 + dy**2) / (2 * sigma**2))


def render_audio(rng: np.random.Generator, shown: int, *, num_classes: int) -> np.ndarray:
    """int16 mono samples: two class-coded tones at a random offset, in white noise at ~0 dB SNR."""
    f1 = 300.0 * 2 ** (shown / num_classes) * (1 + rng.uniform(-0.03, 0.03))
    f2 = f1 * (1.5 if shown % 2 == 0 else 0.75)
    amplitude = rng.uniform(0.1, 0.3)
    tones = np.concatenate([tone(rng, f1, amplitude), tone(rng, f2, amplitude)])
    # 0 dB SNR: the noise has the tones' own RMS (amplitude / sqrt 2).
    return tones_in_noise(rng, tones, amplitude / np.sqrt(2))


def tones_in_noise(rng: np.random.Generator, tones: np.ndarray, noise_rms: float) -> np.ndarray:
    """int16 samples of AUDIO_SECONDS: `tones` at a random offset, in white noise of RMS `noise_rms`."""
    total = int(SAMPLE_RATE * AUDIO_SECONDS)
    signal = np.zeros(total)
    offset = int(rng.integers(0, total - len(tones) + 1))
    signal[offset:offset + len(tones)] = tones
    signal += rng.normal(0.0, noise_rms, size=total)
    return (np.clip(signal, -1.0, 1.0) * 32767).astype(np.int16)


def tone(rng: np.random.Generator, frequency: float, amplitude: float) -> np.ndarray:
    """A sine with random phase and linear fades in and out, so tone edges do not click."""
    length, fade = int(SAMPLE_RATE * TONE_SECONDS), int(SAMPLE_RATE * FADE_SECONDS)
    t = np.arange(length) / SAMPLE_RATE
    envelope = np.minimum(1.0, np.minimum(np.arange(length), np.arange(length)[::-1]) / fade)
    return amplitude * envelope * np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi))


def render_text(rng: np.random.Generator, shown: int, *, num_classes: int) -> str:
    """2-5 neutral filler words with one keyword of the shown class, dropped with probability P_TEXT_DROP."""
    words = list(rng.choice(FILLER_WORDS, size=int(rng.integers(2, 6))))
    keyword = str(rng.choice(class_keywords(shown)))
    if rng.random() >= P_TEXT_DROP:
        words.insert(int(rng.integers(0, len(words) + 1)), keyword)
    return " ".join(words)


def class_keywords(label: int) -> tuple[str, ...]:
    """Three synonyms for class `label`; generic tokens beyond the written lists."""
    if label < len(CLASS_KEYWORDS):
        return CLASS_KEYWORDS[label]
    return (f"kw{label}a", f"kw{label}b", f"kw{label}c")


def _write_mp4(path: Path, frames: np.ndarray) -> None:
    """Encode (T, H, W, 3) uint8 frames to H.264 yuv420p by piping raw RGB into ffmpeg."""
    _, height, width, _ = frames.shape
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}",
                          framerate=VIDEO_FPS)
    stream = stream.output(str(path), vcodec="libx264", pix_fmt="yuv420p", preset="ultrafast",
                           fflags="+bitexact", threads=1)
    stream.global_args("-hide_banner", "-loglevel", "error").overwrite_output().run(
        input=frames.tobytes(), capture_stdout=True, capture_stderr=True)


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(samples.astype("<i2").tobytes())


def _write_manifest(path: Path, records: list[dict]) -> Path:
    """Write the manifest under a temporary name and rename it, so a crash never leaves half a manifest."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as manifest:
        for record in records:
            manifest.write(json.dumps(record) + "\n")
    os.replace(temporary, path)
    return path

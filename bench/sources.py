"""Camera-like benchmark sources, cached: H.264 + AAC clips of moving patterns with a tone in noise.

    write_sources(n, folder, width=320, height=240, seconds=3.0) -> manifest.jsonl

What gesture and emotion corpora ship (320x240 to 1280x720 H.264 at 25-30 fps with AAC audio), made in-process
with PyAV: a slowly panning colour gradient, two discs moving on their own paths and mild sensor noise, encoded
by libx264 (`veryfast`, so B-frames and CABAC as a camera or a phone would write them), with a 48 kHz stereo AAC
track of a gliding tone in white noise. Source i depends only on i, so a cache folder grows as more are asked
for and is reused by later runs; a source is written under a temporary name and renamed, so an interrupted run
leaves no half clip. Every source is in split "train" with a label of i % 4.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

__all__ = ["write_sources", "FPS", "AUDIO_RATE", "add_corpus_options"]

FPS, AUDIO_RATE = 30, 48000


def write_sources(n: int, folder: Path | str, *, width: int = 320, height: int = 240, seconds: float = 3.0,
                  workers: int = 2, progress: bool = True) -> Path:
    """`n` sources under folder/<width>x<height>-<seconds>s/ (made where missing) and a manifest of them."""
    if n < 1 or width < 16 or height < 16 or seconds <= 0:
        raise ValueError(f"need n >= 1, a size of at least 16x16 and seconds > 0; got n={n}, {width}x{height}, "
                         f"seconds={seconds}")
    root = Path(folder) / f"{width}x{height}-{seconds:g}s"
    (root / "clips").mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(n) if not (root / "clips" / f"{_key(i)}.mp4").is_file()]
    tasks = [(str(root / "clips"), i, width, height, seconds) for i in missing]
    if tasks:
        with multiprocessing.get_context("forkserver").Pool(max(1, min(workers, len(tasks)))) as pool:
            for _ in tqdm(pool.imap_unordered(_write_source, tasks), total=len(tasks), disable=not progress,
                          desc=f"bench sources {width}x{height}", unit="clip"):
                pass
    manifest = root / f"manifest-{n}.jsonl"
    records = [{"key": _key(i), "split": "train", "label": i % 4, "rgb": f"clips/{_key(i)}.mp4",
                "audio": f"clips/{_key(i)}.mp4"} for i in range(n)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def _key(index: int) -> str:
    return f"cam_{index:06d}"


def _write_source(task: tuple[str, int, int, int, float]) -> None:
    folder, index, width, height, seconds = task
    rng = np.random.default_rng([7, index])
    target = Path(folder, f"{_key(index)}.mp4")
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    frames = round(FPS * seconds)
    with av.open(str(partial), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=FPS, options={"preset": "veryfast", "crf": "23"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.thread_count = 1
        audio = container.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
        scene = _Scene(rng, width, height)
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(scene.frame(t / FPS), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode())
        _encode_audio(container, audio, _tone_in_noise(rng, seconds))
    partial.rename(target)


class _Scene:
    """A panning gradient with two moving discs and noise: motion everywhere, like a hand-held camera."""

    def __init__(self, rng: np.random.Generator, width: int, height: int):
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        self.x, self.y = x, y
        self.size = np.array([width, height], dtype=np.float32)
        angle = 2 * np.pi * (x / width + y / height)
        self.sin, self.cos = np.sin(angle), np.cos(angle)  # the pan is a phase shift: sin(a + c) from these
        self.tint = rng.uniform(40, 200, size=3).astype(np.float32)
        self.discs = [(rng.uniform(0.2, 0.8, 2) * self.size, rng.uniform(-0.3, 0.3, 2) * self.size,
                       rng.uniform(0.08, 0.18) * height, rng.uniform(0, 255, 3)) for _ in range(2)]
        self.noise = rng.normal(0, 4, size=(5, height, width, 3)).astype(np.float32)  # cycled: cheap to draw
        self.count = 0

    def frame(self, time: float) -> np.ndarray:
        shift = 2 * np.pi * (40 * time / self.size[0] - 25 * time / self.size[1])
        wave = self.sin * np.cos(shift) + self.cos * np.sin(shift)
        image = self.tint * (0.6 + 0.4 * wave)[..., None] + self.noise[self.count % len(self.noise)]
        self.count += 1
        for start, velocity, radius, colour in self.discs:
            cx, cy = (start + velocity * time) % self.size
            inside = (self.x - cx) ** 2 + (self.y - cy) ** 2 < radius ** 2
            image[inside] = colour
        return np.clip(image, 0, 255).astype(np.uint8)


def _tone_in_noise(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """(2, samples) float32: a tone gliding between two random pitches, in white noise at about 6 dB SNR."""
    t = np.arange(round(AUDIO_RATE * seconds)) / AUDIO_RATE
    low, high = rng.uniform(200, 800), rng.uniform(800, 2000)
    phase = 2 * np.pi * np.cumsum(np.linspace(low, high, t.size)) / AUDIO_RATE
    mono = 0.3 * np.sin(phase) + rng.normal(0, 0.15, t.size)
    return np.stack([mono, np.roll(mono, 7)]).astype(np.float32)


def _encode_audio(container, stream, pcm: np.ndarray) -> None:
    size = stream.codec_context.frame_size or 1024
    for start in range(0, pcm.shape[1], size):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, start:start + size]), format="fltp",
                                           layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, start, Fraction(1, AUDIO_RATE)
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def add_corpus_options(parser, full: dict) -> None:
    """The options the loader and builder benchmarks share: --quick, and how many sources, which sizes and how
    many interleaved rounds (defaults from `full`)."""
    parser.add_argument("--quick", action="store_true", help="a few tiny sources and one size (seconds)")
    parser.add_argument("--sources", type=int, help=f"camera-like sources (default {full['sources']})")
    parser.add_argument("--sizes", help=f"comma-separated square sizes (default {full['sizes']})")
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds (default {full['rounds']})")

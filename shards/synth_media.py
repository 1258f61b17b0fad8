"""Drawing and sound primitives of the synthetic task corpora (shards/synth_tasks.py): a cartoon face whose
expression moves over time, a speech-like voice, and a depth camera's view of a hand.

All sizes follow shards/synth.py (VIDEO_FRAMES frames of VIDEO_SIZE pixels, SAMPLE_RATE audio); every
function draws its randomness from the `rng` it is given, so a sample is a function of (seed, index).
"""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from shards.synth import SAMPLE_RATE, VIDEO_FPS, VIDEO_FRAMES, VIDEO_SIZE, moving_blob

__all__ = ["FaceExpression", "render_depth_hand", "render_face", "render_speech", "write_mp4"]

GRID = np.arange(VIDEO_SIZE, dtype=np.float64)
# First two formants (Hz) of five vowels /a e i o u/: each syllable picks one, so the spectrum is speech-like.
VOWEL_FORMANTS = ((730, 1090), (530, 1840), (270, 2290), (570, 840), (300, 870))


class FaceExpression(tuple):
    """(mouth curvature -1 frown .. +1 smile, mouth opening 0..1, brow height -1 lowered .. +1 raised,
    eye opening 0..1); a plain tuple so that per-class tables stay one line each."""

    __slots__ = ()

    def __new__(cls, curve: float, mouth_open: float, brow: float, eyes: float):
        return super().__new__(cls, (curve, mouth_open, brow, eyes))


NEUTRAL_FACE = FaceExpression(0.0, 0.1, 0.0, 0.5)


def render_face(rng: np.random.Generator, target: FaceExpression, *, noise: float, mouth_bend: float = 2.5,
                latest_onset: float = 0.5) -> np.ndarray:
    """(frames, H, W, 3) uint8: a face that starts neutral and moves to `target` from a random onset,
    at a random position and tint, in Gaussian pixel noise of std `noise`. `mouth_bend`: pixels the mouth's
    corners rise above (curvature +1) or drop below (-1) its centre; `latest_onset`: the latest onset as a
    fraction of the clip. The defaults are emotion's."""
    onset = rng.uniform(0, VIDEO_FRAMES * latest_onset)
    ramp = np.clip((np.arange(VIDEO_FRAMES) - onset) / rng.uniform(2, 5), 0.0, 1.0)  # 0 neutral .. 1 target
    centre = rng.uniform(20, 28, size=2)
    drift = rng.normal(0, 0.15, size=2)
    background, skin = rng.uniform(0.0, 0.35, size=3), rng.uniform(0.55, 0.9, size=3)
    frames = []
    for t, amount in enumerate(ramp):
        expression = np.asarray(NEUTRAL_FACE) + amount * (np.asarray(target) - np.asarray(NEUTRAL_FACE))
        face, features = _face_layers(centre + drift * t, expression, mouth_bend)
        frame = background + face[..., None] * (skin - background) - features[..., None] * skin * 0.9
        frames.append(frame)
    frames = np.stack(frames) + rng.normal(0.0, noise, size=(VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3))
    return (np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)


def _face_layers(centre: np.ndarray, expression: np.ndarray, mouth_bend: float) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) face mask and (H, W) dark features (eyes, brows, mouth), both in [0, 1]."""
    curve, mouth_open, brow, eyes = expression
    cx, cy = centre
    x, y = GRID[None, :], GRID[:, None]
    face = 1.0 / (1.0 + np.exp(((x - cx) / 14) ** 2 + ((y - cy) / 17) ** 2 - 1.0) * 8)
    features = np.zeros((VIDEO_SIZE, VIDEO_SIZE))
    for side in (-1, 1):
        eye = ((x - (cx + 6 * side)) / 2.5) ** 2 + ((y - (cy - 4)) / (0.4 + 2.6 * eyes)) ** 2
        features = np.maximum(features, np.exp(-eye * 2))
        brow_y = cy - 9 - 2.5 * brow
        on_brow = np.abs(x - (cx + 6 * side)) < 3.5
        features = np.maximum(features, on_brow * np.exp(-((y - brow_y) ** 2) / 0.8))
    u = np.clip((x - cx) / 6, -1.5, 1.5)
    mouth_y = cy + 8 - mouth_bend * curve * (u ** 2 - 0.5)  # corners above the centre when smiling
    thickness = 0.6 + 2.0 * mouth_open
    on_mouth = np.abs(x - cx) < 6
    features = np.maximum(features, on_mouth * np.exp(-((y - mouth_y) ** 2) / (2 * thickness ** 2)))
    return face, features


def render_speech(rng: np.random.Generator, *, pitch: float, slope: float, rate: float, energy: float,
                  jitter: float, snr_db: float) -> np.ndarray:
    """float64 mono samples of one second of 'speech': a harmonic glottal source with pitch contour
    pitch * (1 + slope * (t - 0.5)) and random jitter, cut into syllables at `rate` per second, each through
    a random vowel's formants, scaled to RMS `energy`, in white noise at `snr_db`."""
    total = SAMPLE_RATE
    t = np.arange(total) / SAMPLE_RATE
    wobble = np.interp(t, np.linspace(0, 1, 12), rng.normal(0, jitter, size=12))
    f0 = np.clip(pitch * (1 + slope * (t - 0.5) + wobble), 60, 500)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    source = sum(np.sin(h * phase) / h for h in range(1, 25))
    voice = _syllables(rng, source, rate)
    voice *= energy / max(np.sqrt(np.mean(voice ** 2)), 1e-9)
    noise_rms = energy / 10 ** (snr_db / 20)
    return voice + rng.normal(0.0, noise_rms, size=total)


def _syllables(rng: np.random.Generator, source: np.ndarray, rate: float) -> np.ndarray:
    """Cut `source` into voiced syllables (Hann envelopes, gaps between) and shape each by a vowel."""
    total = len(source)
    count = max(1, int(round(rate * rng.uniform(0.8, 1.2))))
    length = int(total / count * rng.uniform(0.55, 0.8))
    voice = np.zeros(total)
    for index in range(count):
        start = int(index * total / count + rng.integers(0, total // count - length + 1))
        segment = source[start:start + length] * np.hanning(length)
        formants = VOWEL_FORMANTS[int(rng.integers(len(VOWEL_FORMANTS)))]
        voice[start:start + length] = _formant_filter(segment, formants)
    return voice


def _formant_filter(segment: np.ndarray, formants: tuple[int, int]) -> np.ndarray:
    """Multiply the segment's spectrum by resonance bumps at the formants (bandwidth ~ 100-150 Hz)."""
    spectrum = np.fft.rfft(segment)
    freqs = np.fft.rfftfreq(len(segment), 1 / SAMPLE_RATE)
    gain = sum(np.exp(-((freqs - f) / (80 + 0.05 * f)) ** 2) for f in formants) + 0.02
    return np.fft.irfft(spectrum * gain, n=len(segment))


def render_depth_hand(rng: np.random.Generator, *, angle: float | None, approach: float,
                      noise: float) -> np.ndarray:
    """(frames, H, W, 3) uint8 grey depth (bright = near): a far background slope, a hand blob moving along
    `angle` (None: it stays put) whose nearness ramps by `approach` over the clip, sensor speckle and holes."""
    speed = (0.0, 0.0) if angle is None else (1.0, 1.6)
    hand = moving_blob(rng, angle or 0.0, centre_range=(18, 30), speed_range=speed, brightness=1.0)
    # A clear near hand on a far wall: with nearness 0.55-0.7 over a wall of 0.1-0.25 a depth-only 3D CNN
    # stayed at chance for 6 epochs; a depth sensor sees a hand at arm's length far apart from the wall.
    nearness = rng.uniform(0.7, 0.8) + approach * np.linspace(-0.2, 0.2, VIDEO_FRAMES)
    wall = rng.uniform(0.05, 0.15) + rng.uniform(-0.05, 0.05) * GRID[None, :, None] / VIDEO_SIZE
    frames = np.maximum(wall, hand * nearness[:, None, None])
    frames = frames + rng.normal(0.0, noise, size=frames.shape)
    frames[rng.random(frames.shape) < 0.03] = 0.0  # sensor holes read as 0, like a Kinect's missing depth
    grey = (np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def write_mp4(path: Path, frames: np.ndarray) -> None:
    """Encode (T, H, W, 3) uint8 frames to H.264 yuv420p in-process with PyAV (single-threaded, so the bytes
    are deterministic). shards/synth.py's _write_mp4 launches ffmpeg per file, which costs 0.1-2 s on a
    loaded machine, 15x this; the demo corpus keeps it so its bytes stay as they were."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS, options={"preset": "ultrafast", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)

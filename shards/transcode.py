"""Convert one sample's media to shard members with ffmpeg, and prove every encoded video decodes."""
from __future__ import annotations

import io
import json
import re
import subprocess
import tempfile
import wave
from pathlib import Path

import ffmpeg
import numpy as np
from tokenizers import Tokenizer

__all__ = [
    "VIDEO_CODECS",
    "TranscodeError",
    "encode_text",
    "pick_frame_indices",
    "read_text",
    "summarize_stderr",
    "transcode_audio",
    "transcode_video",
    "video_extension",
]

# Output options per codec. Every codec is 8-bit 4:2:0, which both DALI decoders (CPU: VP9, MJPEG;
# GPU/NVDEC: all three) accept. `threads=1` and `+bitexact` make the bytes reproducible: multithreaded
# libvpx and the Matroska muxer's random segment UID would otherwise change the shard hashes.
VIDEO_CODECS = {
    "vp9": {"extension": "webm", "options": {"format": "webm", "vcodec": "libvpx-vp9", "pix_fmt": "yuv420p",
                                             "deadline": "realtime", "cpu-used": 8, "crf": 32, "b:v": 0}},
    "mjpeg": {"extension": "avi", "options": {"format": "avi", "vcodec": "mjpeg", "pix_fmt": "yuvj420p",
                                              "q:v": 3}},
    "h264": {"extension": "mp4", "options": {"format": "mp4", "vcodec": "libx264", "pix_fmt": "yuv420p",
                                             "movflags": "+faststart"}},
}
QUIET = ("-hide_banner", "-loglevel", "error")
GENERIC_FFMPEG_LINES = ("Conversion failed!", "Exiting normally", "To ignore this")


class TranscodeError(Exception):
    """A sample's media could not be converted; `reason` is a one-line summary for rejects.jsonl."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def video_extension(codec: str) -> str:
    """The container extension of `codec`'s members: webm, avi or mp4."""
    if codec not in VIDEO_CODECS:
        raise ValueError(f"unknown video codec {codec!r}; use one of {', '.join(VIDEO_CODECS)}.")
    return VIDEO_CODECS[codec]["extension"]


def transcode_video(src: Path | str, *, fps: float, frames: int, height: int, width: int,
                    codec: str = "vp9") -> bytes:
    """Exactly `frames` frames of `src` at `fps`, scaled and centre-cropped to height x width, encoded."""
    video_extension(codec)  # fail on a bad codec before spending a decode on it
    decoded = _decode_rgb(src, fps=fps, height=height, width=width)  # (N, H, W, 3) uint8
    chosen = decoded[pick_frame_indices(len(decoded), frames)]
    encoded = _encode_rgb(chosen, fps=fps, codec=codec)
    _check_decodes(encoded, frames=frames, height=height, width=width, codec=codec)
    return encoded


def pick_frame_indices(available: int, frames: int) -> np.ndarray:
    """Indices of `frames` frames spread uniformly (segment centres); the last repeats if too few."""
    if available == 0:
        raise TranscodeError("no decodable video frames")
    if available < frames:
        return np.minimum(np.arange(frames), available - 1)
    return ((np.arange(frames) + 0.5) * available / frames).astype(int)


def _decode_rgb(src: Path | str, *, fps: float, height: int, width: int) -> np.ndarray:
    """Decode to rgb24 at `fps`, scaling the shorter side to fit and cropping the centre."""
    stream = ffmpeg.input(str(src)).video.filter("fps", fps=fps)
    stream = stream.filter("scale", width, height, force_original_aspect_ratio="increase", flags="area")
    stream = stream.filter("crop", width, height)
    raw = _run(stream.output("pipe:", format="rawvideo", pix_fmt="rgb24"))
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, height, width, 3)


def _encode_rgb(frames: np.ndarray, *, fps: float, codec: str) -> bytes:
    """Encode (T, H, W, 3) uint8 frames; raw frames go in through a pipe.

    The output goes to a temporary file, not a pipe: MP4 with +faststart cannot be written to a pipe,
    a piped AVI lacks its index (DALI 2.4's CPU decoder segfaults on it) and a piped WebM lacks cues
    and duration.
    """
    count, height, width, _ = frames.shape
    options = dict(VIDEO_CODECS[codec]["options"], g=count, r=fps, threads=1, fflags="+bitexact")
    source = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
    with tempfile.TemporaryDirectory(prefix="cotrain-transcode-") as folder:
        target = Path(folder, f"clip.{VIDEO_CODECS[codec]['extension']}")
        _run(source.output(str(target), **options), stdin=frames.tobytes())
        return target.read_bytes()


def _check_decodes(encoded: bytes, *, frames: int, height: int, width: int, codec: str) -> None:
    """Decode the encoded bytes once more: a sample the loaders cannot decode must never reach a shard."""
    command = ["ffprobe", *QUIET, "-count_frames", "-select_streams", "v:0", "-show_entries",
               "stream=nb_read_frames,width,height", "-of", "json", "pipe:"]
    probe = subprocess.run(command, input=encoded, capture_output=True, check=False)
    if probe.returncode != 0:
        raise TranscodeError(f"encoded {codec} does not decode: {summarize_stderr(probe.stderr)}")
    streams = json.loads(probe.stdout or b"{}").get("streams") or [{}]
    found = (int(streams[0].get("nb_read_frames", 0)), streams[0].get("height"), streams[0].get("width"))
    if found != (frames, height, width):
        raise TranscodeError(f"encoded {codec} decodes to {found[0]} frames of {found[1]}x{found[2]}, "
                             f"expected {frames} frames of {height}x{width}")


def transcode_audio(src: Path | str, *, sample_rate: int, samples: int) -> bytes:
    """WAV bytes (mono 16-bit PCM at `sample_rate`) of exactly `samples` samples, trimmed or zero-padded.

    `src` is anything ffmpeg reads, including a video file's audio track.
    """
    stream = ffmpeg.input(str(src)).audio
    raw = _run(stream.output("pipe:", format="f32le", ac=1, ar=sample_rate))
    decoded = np.frombuffer(raw, dtype="<f4")
    if decoded.size == 0:
        raise TranscodeError("no decodable audio samples")
    fitted = np.zeros(samples, dtype=np.float32)
    fitted[:min(samples, decoded.size)] = decoded[:samples]
    return _wav_bytes((np.clip(fitted, -1.0, 1.0) * 32767).astype("<i2"), sample_rate=sample_rate)


def _wav_bytes(pcm: np.ndarray, *, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.tobytes())
    return buffer.getvalue()


def read_text(value: Path | str) -> str:
    """Inline text as is; a Path is read as a UTF-8 text file."""
    if not isinstance(value, Path):
        return value
    try:
        return value.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TranscodeError(f"cannot read text file {value}: {error}") from None


def encode_text(text: str, *, tokenizer: Tokenizer, max_tokens: int) -> tuple[bytes, bytes]:
    """(UTF-8 text, `max_tokens` little-endian int32 ids, truncated and 0-padded)."""
    ids = tokenizer.encode(text).ids[:max_tokens]
    padded = np.zeros(max_tokens, dtype="<i4")
    padded[:len(ids)] = ids
    return text.encode("utf-8"), padded.tobytes()


def _run(stream, *, stdin: bytes | None = None) -> bytes:
    """Run an ffmpeg-python stream quietly; return stdout or raise TranscodeError with ffmpeg's reason.

    -nostdin keeps ffmpeg from reading keystrokes off an inherited terminal; piped input still works.
    """
    try:
        stdout, _ = stream.global_args(*QUIET, "-nostdin").overwrite_output().run(
            input=stdin, capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as error:
        raise TranscodeError(summarize_stderr(error.stderr)) from None
    return stdout


def summarize_stderr(stderr: bytes | None) -> str:
    """The last meaningful line of ffmpeg's stderr, without memory addresses (they differ per run)."""
    lines = [line.strip() for line in (stderr or b"").decode("utf-8", "replace").splitlines()]
    meaningful = [line for line in lines if line and not line.startswith(GENERIC_FFMPEG_LINES)]
    if not meaningful:
        return "ffmpeg failed without a message"
    return re.sub(r" @ 0x[0-9a-f]+", "", meaningful[-1])

"""Convert one sample's media to shard members, and prove every encoded member decodes.

With PyAV installed a VP9/H.264 + WAV/FLAC sample costs no process launch at all: every source (video,
depth video, audio, the audio track of a video file) is decoded in-process through the same libavfilter
chain the ffmpeg CLI would run (fps, scale, crop/pad, frame range), frames and samples are selected in
numpy, video and FLAC members are encoded in-process with PyAV (the same FFmpeg encoders, without the
~40-150 ms start of a process per call), and every encoded member is decode-checked in-process: VP9 and
MJPEG by DALI's own CPU video decoder (the one the training loader uses), H.264 and FLAC by PyAV. MJPEG is
encoded by one ffmpeg launch (its -q:v is a CLI feature). Without PyAV, decoding, encoding and checks fall
back to ffmpeg launches (at most three per sample, each batching all of the sample's inputs or outputs).
Depth images (Pillow), features (.npy) and WAV need no ffmpeg at all.
"""
from __future__ import annotations

import io
import re
import subprocess
import tempfile
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from shards.manifest import FrameRange

__all__ = [
    "AUDIO_FORMATS",
    "FRAME_POLICIES",
    "RESIZE_POLICIES",
    "VIDEO_CODECS",
    "AudioSettings",
    "DepthSettings",
    "FeatureSettings",
    "TranscodeError",
    "VideoSettings",
    "convert_media",
    "depth_source_bits",
    "encode_text",
    "feature_dim",
    "list_depth_frames",
    "pick_frame_indices",
    "read_text",
    "summarize_stderr",
    "video_extension",
]

# Output options per codec. Every codec is 8-bit 4:2:0, which both DALI decoders (CPU: VP9, MJPEG;
# GPU/NVDEC: all three) accept. `threads=1` and `+bitexact` make the bytes reproducible: multithreaded
# libvpx and the Matroska muxer's random segment UID would otherwise change the shard hashes.
VIDEO_CODECS = {
    "vp9": {"extension": "webm", "options": ["-f", "webm", "-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p",
                                             "-deadline", "realtime", "-cpu-used", "8", "-crf", "32", "-b:v", "0"]},
    "mjpeg": {"extension": "avi", "options": ["-f", "avi", "-c:v", "mjpeg", "-pix_fmt", "yuvj420p", "-q:v", "3"]},
    "h264": {"extension": "mp4", "options": ["-f", "mp4", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                                             "-movflags", "+faststart", "-sc_threshold", "0"]},
}
AUDIO_FORMATS = ("wav", "flac")
RESIZE_POLICIES = ("crop", "pad")
FRAME_POLICIES = ("uniform", "stride")
QUIET = ("-hide_banner", "-loglevel", "error", "-nostdin", "-y")
GENERIC_FFMPEG_LINES = ("Conversion failed!", "Exiting normally", "To ignore this")
SIXTEEN_BIT_PIXEL_FORMATS = re.compile(r"(16|12|10|14|9)(le|be)?$")


class TranscodeError(Exception):
    """A sample's media could not be converted; `reason` is a one-line summary for rejects.jsonl and
    `modality` names the member that failed (None when not known yet)."""

    def __init__(self, reason: str, modality: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.modality = modality


@dataclass(frozen=True)
class VideoSettings:
    """How video and depth frames are sampled and sized (docs/formats.md)."""

    fps: float
    frames: int
    height: int
    width: int
    codec: str = "vp9"
    resize: str = "crop"  # crop: scale to cover, cut the centre; pad: scale to fit, pad the borders black
    policy: str = "uniform"  # uniform: `frames` spread over the clip; stride: `frames` every `stride`-th frame
    stride: int = 1
    keyint: int = 0  # keyframe interval; 0 = one keyframe per `frames` (the whole clip is one GOP)

    @property
    def gop(self) -> int:
        return self.keyint or self.frames


@dataclass(frozen=True)
class AudioSettings:
    sample_rate: int
    samples: int
    format: str = "wav"
    fit: str = "start"  # start: keep the first `samples`, pad at the end; centre: keep the middle, pad both ends


@dataclass(frozen=True)
class DepthSettings:
    dtype: str = "uint8"  # the source bit depth: uint8 or uint16

    @property
    def max_value(self) -> int:
        return 65535 if self.dtype == "uint16" else 255


@dataclass(frozen=True)
class FeatureSettings:
    dim: int
    max_frames: int


def video_extension(codec: str) -> str:
    """The container extension of `codec`'s members: webm, avi or mp4."""
    if codec not in VIDEO_CODECS:
        raise ValueError(f"unknown video codec {codec!r}; use one of {', '.join(VIDEO_CODECS)}.")
    return VIDEO_CODECS[codec]["extension"]


def pick_frame_indices(available: int, frames: int, *, policy: str = "uniform", stride: int = 1) -> np.ndarray:
    """Indices of `frames` frames out of `available`; the last frame repeats when there are too few.

    uniform: segment centres spread over the whole clip. stride: a window of `frames` frames `stride`
    apart, centred in the clip (a fixed clip length of frames * stride source frames).
    """
    if available == 0:
        raise TranscodeError("no decodable video frames")
    if policy == "stride":
        window = (frames - 1) * stride + 1
        start = max(0, (available - window) // 2)
        return np.minimum(start + np.arange(frames) * stride, available - 1)
    if available < frames:
        return np.minimum(np.arange(frames), available - 1)
    return ((np.arange(frames) + 0.5) * available / frames).astype(int)


# --- one sample -----------------------------------------------------------------------------------------

@dataclass
class _Job:
    """One ffmpeg output: its input arguments (ending in the input path), output arguments and target."""

    modality: str
    input_args: tuple[str, ...]
    output_args: list[str]  # "{input}" stands for the input's index in the combined command
    target: Path


@dataclass
class _SampleWork:
    folder: Path
    members: dict[str, bytes] = field(default_factory=dict)


def convert_media(values: dict[str, tuple[str, Path | str]], *, video: VideoSettings, audio: AudioSettings,
                  depth: dict[str, DepthSettings], features: dict[str, FeatureSettings],
                  tokenizer: Tokenizer | None, max_tokens: int) -> dict[str, bytes]:
    """Members (`<name>.<ext>` -> bytes, in `values` order) of one sample's modalities.

    `values` maps modality name -> (kind, path or inline text). Raises TranscodeError naming the modality.
    """
    for name, (kind, value) in values.items():
        _check_source(name, kind, value)
    with tempfile.TemporaryDirectory(prefix="cotrain-sample-") as folder:
        work = _SampleWork(Path(folder))
        decoded = _decode_stage(values, work, video=video, audio=audio)
        encode_jobs = []
        for name, (kind, value) in values.items():
            try:
                encode_jobs += _prepare_member(name, kind, value, decoded, work, video=video, audio=audio,
                                               depth=depth.get(name), features=features.get(name),
                                               tokenizer=tokenizer, max_tokens=max_tokens)
            except TranscodeError as error:
                raise TranscodeError(error.reason, name) from None
        _run_jobs(encode_jobs)
        for job in encode_jobs:
            work.members[job.target.name] = job.target.read_bytes()
        _check_stage(work, video=video, audio=audio)
        return {member: work.members[member] for member in _member_order(values, work.members)}


def _member_order(values: dict, members: dict[str, bytes]) -> list[str]:
    """Members grouped by modality in manifest order (text: .txt then .ids)."""
    ordered = []
    for name in values:
        ordered += sorted((m for m in members if m.split(".", 1)[0] == name), key=lambda m: m.endswith(".ids"))
    return ordered


def _check_source(name: str, kind: str, value: Path | str | FrameRange) -> None:
    """Missing and empty files get a precise reason before ffmpeg sees them."""
    value = _path_of(value)
    if not isinstance(value, Path) or kind in ("video", "depth") and _is_image_sequence(value):
        return
    if not value.exists():
        raise TranscodeError(f"file not found: {value}; fix the path in the manifest", name)
    if value.stat().st_size == 0:
        raise TranscodeError(f"file is empty (0 bytes): {value}; re-export or drop the sample", name)


def _decode_stage(values: dict, work: _SampleWork, *, video: VideoSettings, audio: AudioSettings) -> dict:
    """Decode every ffmpeg-read input; return name -> decoded numpy array.

    In-process with PyAV (libavfilter runs the same filter chain as the CLI would); without PyAV, all
    inputs of the sample in one ffmpeg launch.
    """
    try:
        import av
    except ImportError:
        return _decode_with_cli(values, work, video=video, audio=audio)
    decoded = {}
    for name, (kind, value) in values.items():
        try:
            if kind in ("video", "depth") and not _is_image_sequence(value):
                pixel_format = "rgb24" if kind == "video" else "gray16le"
                decoded[name] = _pyav_video(av, _path_of(value), _range_filter(value) + _video_filter(video),
                                            pixel_format, video)
            elif kind == "audio":
                decoded[name] = _pyav_audio(av, value, audio.sample_rate)
        except (av.error.FFmpegError, ValueError) as error:
            raise TranscodeError(_pyav_reason(error), name) from None
    return decoded


def _pyav_reason(error: Exception) -> str:
    """PyAV's message without the errno prefix, e.g. 'Invalid data found when processing input: 'x.mp4''."""
    return re.sub(r"^\[Errno -?\d+\] ", "", str(error)) or type(error).__name__


def _pyav_video(av, path: Path, chain: str, pixel_format: str, video: VideoSettings) -> np.ndarray:
    """All frames of the first video stream through `chain` (comma-separated filters), as one array."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_count = 1
        graph = av.filter.Graph()
        nodes = [graph.add_buffer(template=stream)]
        for piece in chain.split(","):
            name, _, arguments = piece.partition("=")
            nodes.append(graph.add(name, arguments))
        nodes += [graph.add("format", pixel_format), graph.add("buffersink")]
        for source, target in zip(nodes, nodes[1:]):
            source.link_to(target)
        graph.configure()
        frames: list[np.ndarray] = []
        for frame in container.decode(stream):
            if not _push(av, graph, frame, frames):
                break  # trim has passed the frame range: the rest need not be decoded
        _push(av, graph, None, frames)
    shape = (video.height, video.width, 3) if pixel_format == "rgb24" else (video.height, video.width)
    return np.stack(frames) if frames else np.zeros((0, *shape), dtype=np.uint8)


def _push(av, graph, frame, frames: list) -> bool:
    """Feed one frame (None = end) and collect every frame the graph has ready; False once it has ended."""
    try:
        graph.push(frame)
    except av.error.EOFError:
        return False
    while True:
        try:
            frames.append(graph.pull().to_ndarray())
        except (av.error.BlockingIOError, av.error.EOFError):
            return True


def _pyav_audio(av, path: Path, sample_rate: int) -> np.ndarray:
    """The first audio stream, mono float32 at `sample_rate` (the audio track of a video file included)."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        parts = [out.to_ndarray().reshape(-1) for frame in container.decode(container.streams.audio[0])
                 for out in resampler.resample(frame)]
        parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, dtype=np.float32)


def _decode_with_cli(values: dict, work: _SampleWork, *, video: VideoSettings, audio: AudioSettings) -> dict:
    """Decode every ffmpeg-read input in one launch; return name -> decoded numpy array."""
    jobs = []
    for name, (kind, value) in values.items():
        if kind in ("video", "depth") and not _is_image_sequence(value):
            pixel_format = "rgb24" if kind == "video" else "gray16le"
            jobs.append(_Job(name, ("-i", str(_path_of(value))), ["-map", "{input}:v:0",
                                                                  "-vf", _range_filter(value) + _video_filter(video),
                                                        "-f", "rawvideo", "-pix_fmt", pixel_format],
                             work.folder / f"{name}.decoded"))
        elif kind == "audio":
            jobs.append(_Job(name, ("-i", str(value)), ["-map", "{input}:a:0", "-ac", "1", "-ar",
                                                        str(audio.sample_rate), "-f", "f32le"],
                             work.folder / f"{name}.decoded"))
    _run_jobs(jobs)
    decoded = {}
    for job in jobs:
        raw = job.target.read_bytes()
        kind = values[job.modality][0]
        if kind == "audio":
            decoded[job.modality] = np.frombuffer(raw, dtype="<f4")
        elif kind == "video":
            decoded[job.modality] = np.frombuffer(raw, dtype=np.uint8).reshape(-1, video.height, video.width, 3)
        else:
            decoded[job.modality] = np.frombuffer(raw, dtype="<u2").reshape(-1, video.height, video.width)
    return decoded


def _path_of(value):
    return value.path if isinstance(value, FrameRange) else value


def _range_filter(value) -> str:
    """Keep source frames start..end (1-based, inclusive) before any resampling."""
    if not isinstance(value, FrameRange):
        return ""
    return f"trim=start_frame={value.start - 1}:end_frame={value.end},setpts=PTS-STARTPTS,"


def _video_filter(video: VideoSettings) -> str:
    """fps, then scale and centre-crop (cover) or scale and centre-pad (fit) to height x width."""
    size = f"{video.width}:{video.height}"
    if video.resize == "pad":
        return (f"fps={video.fps},scale={size}:force_original_aspect_ratio=decrease:flags=area,"
                f"pad={size}:(ow-iw)/2:(oh-ih)/2")
    return f"fps={video.fps},scale={size}:force_original_aspect_ratio=increase:flags=area,crop={size}"


def _prepare_member(name: str, kind: str, value, decoded: dict, work: _SampleWork, *, video: VideoSettings,
                    audio: AudioSettings, depth: DepthSettings | None, features: FeatureSettings | None,
                    tokenizer: Tokenizer | None, max_tokens: int) -> list[_Job]:
    """Fill work.members for members made in Python; return the encode jobs of the others."""
    if kind == "video":
        if name in decoded:
            chosen = decoded[name][pick_frame_indices(len(decoded[name]), video.frames, policy=video.policy,
                                                      stride=video.stride)]
        else:
            chosen = _rgb_image_frames(value, video)
        encoded = _encode_video_in_process(chosen, video)
        if encoded is None:
            return [_video_encode_job(name, chosen, work, video)]
        work.members[f"{name}.{video_extension(video.codec)}"] = encoded
        return []
    if kind == "audio":
        return _audio_member(name, decoded[name], work, audio)
    if kind == "depth":
        frames = _depth_frames(value, decoded.get(name), video, depth)
        work.members[f"{name}.npy"] = _npy_bytes(frames)
    elif kind == "features":
        work.members[f"{name}.npy"] = _npy_bytes(_load_features(value, features))
    else:
        text, ids = encode_text(read_text(value), tokenizer=tokenizer, max_tokens=max_tokens)
        work.members[f"{name}.txt"], work.members[f"{name}.ids"] = text, ids
    return []


def _video_encode_job(name: str, chosen: np.ndarray, work: _SampleWork, video: VideoSettings) -> _Job:
    source = work.folder / f"{name}.chosen"
    source.write_bytes(np.ascontiguousarray(chosen).tobytes())
    options = [*VIDEO_CODECS[video.codec]["options"], "-g", str(video.gop), "-keyint_min", str(video.gop),
               "-r", str(video.fps), "-threads", "1", "-fflags", "+bitexact"]
    return _Job(name, ("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{video.width}x{video.height}",
                       "-framerate", str(video.fps), "-i", str(source)),
                ["-map", "{input}:v:0", *options], work.folder / f"{name}.{video_extension(video.codec)}")


def _audio_member(name: str, decoded: np.ndarray, work: _SampleWork, audio: AudioSettings) -> list[_Job]:
    """WAV is written here; FLAC is encoded by ffmpeg from the same 16-bit samples (lossless)."""
    if decoded.size == 0:
        raise TranscodeError("no decodable audio samples")
    pcm = (np.clip(_fit_audio(decoded, audio), -1.0, 1.0) * 32767).astype("<i2")
    if audio.format == "wav":
        work.members[f"{name}.wav"] = _wav_bytes(pcm, sample_rate=audio.sample_rate)
        return []
    encoded = _encode_flac_in_process(pcm, audio.sample_rate)
    if encoded is not None:
        work.members[f"{name}.flac"] = encoded
        return []
    source = work.folder / f"{name}.pcm"
    source.write_bytes(pcm.tobytes())
    return [_Job(name, ("-f", "s16le", "-ar", str(audio.sample_rate), "-ac", "1", "-i", str(source)),
                 ["-map", "{input}:a:0", "-c:a", "flac", "-fflags", "+bitexact", "-flags", "+bitexact",
                  "-f", "flac"], work.folder / f"{name}.flac")]


def _fit_audio(decoded: np.ndarray, audio: AudioSettings) -> np.ndarray:
    """Exactly `samples` samples: trimmed (start or centre kept) or zero-padded (at the end or both ends)."""
    fitted = np.zeros(audio.samples, dtype=np.float32)
    surplus = decoded.size - audio.samples
    if audio.fit == "centre":
        start = max(surplus, 0) // 2
        offset = max(-surplus, 0) // 2
    else:
        start = offset = 0
    kept = decoded[start:start + audio.samples]
    fitted[offset:offset + kept.size] = kept
    return fitted


def _check_stage(work: _SampleWork, *, video: VideoSettings, audio: AudioSettings) -> None:
    """Decode every encoded member once more: a sample the loaders cannot decode never reaches a shard.

    VP9/MJPEG go through DALI's CPU decoder, H.264 and FLAC through PyAV, all in this process; without
    them, one ffmpeg launch decodes the rest.
    """
    jobs, expected = [], {}
    for member, data in work.members.items():
        modality, extension = member.split(".", 1)
        if extension not in ("webm", "avi", "mp4", "flac"):
            continue
        if extension in ("webm", "avi") and _check_with_dali(modality, data, video):
            continue
        if _check_with_pyav(modality, member, data, video=video, audio=audio):
            continue
        source, target = work.folder / member, work.folder / f"{member}.check"
        source.write_bytes(data)
        if extension == "flac":
            jobs.append(_Job(modality, ("-i", str(source)), ["-map", "{input}:a:0", "-f", "s16le"], target))
            expected[target] = (audio.samples * 2, f"{audio.samples} audio samples")
        else:
            jobs.append(_Job(modality, ("-i", str(source)),
                             ["-map", "{input}:v:0", "-f", "rawvideo", "-pix_fmt", "gray"], target))
            expected[target] = (video.frames * video.height * video.width,
                                f"{video.frames} frames of {video.height}x{video.width}")
    try:
        _run_jobs(jobs)
    except TranscodeError as error:
        raise TranscodeError(f"encoded member does not decode: {error.reason}", error.modality) from None
    for job in jobs:
        size, words = expected[job.target]
        if job.target.stat().st_size != size:
            raise TranscodeError(f"encoded {job.target.stem} decodes to {job.target.stat().st_size} bytes, "
                                 f"expected {words}", job.modality)


def _check_with_pyav(modality: str, member: str, data: bytes, *, video: VideoSettings,
                     audio: AudioSettings) -> bool:
    """Decode a member fully with PyAV; False when PyAV is unavailable."""
    try:
        import av
    except ImportError:
        return False
    try:
        with av.open(io.BytesIO(data)) as container:
            if member.endswith(".flac"):
                count = sum(frame.samples for frame in container.decode(audio=0))
                found, wanted = count, audio.samples
            else:
                frames = [(frame.height, frame.width) for frame in container.decode(video=0)]
                found = (len(frames), *(frames[0] if frames else (0, 0)))
                wanted = (video.frames, video.height, video.width)
    except (av.error.FFmpegError, ValueError, IndexError) as error:
        raise TranscodeError(f"encoded {member} does not decode: {error}", modality) from None
    if found != wanted:
        raise TranscodeError(f"encoded {member} decodes to {found}, expected {wanted}", modality)
    return True


# PyAV encoder settings per codec, the same as VIDEO_CODECS' command-line options. MJPEG stays with the
# CLI: its `-q:v` is applied by the ffmpeg tool to every frame, which PyAV does not expose.
PYAV_VIDEO = {
    "vp9": ("libvpx-vp9", "yuv420p", {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"}, {}),
    "h264": ("libx264", "yuv420p", {"sc_threshold": "0"}, {"movflags": "+faststart"}),
}


def _encode_video_in_process(chosen: np.ndarray, video: VideoSettings) -> bytes | None:
    """(T, H, W, 3) uint8 frames encoded with PyAV (bit-exact, one thread); None when PyAV is unavailable."""
    try:
        import av
    except ImportError:
        return None
    if video.codec not in PYAV_VIDEO:
        return None
    codec, pixel_format, options, container_options = PYAV_VIDEO[video.codec]
    if "movflags" not in container_options:
        buffer = io.BytesIO()
        _pyav_encode(av, buffer, chosen, video, codec, pixel_format, options, container_options)
        return buffer.getvalue()
    # +faststart rewrites the file to move the index in front: it needs a real file, not a buffer.
    with tempfile.TemporaryDirectory(prefix="cotrain-encode-") as folder:
        target = Path(folder, f"clip.{video_extension(video.codec)}")
        _pyav_encode(av, str(target), chosen, video, codec, pixel_format, options, container_options)
        return target.read_bytes()


def _pyav_encode(av, target, chosen: np.ndarray, video: VideoSettings, codec: str, pixel_format: str,
                 options: dict, container_options: dict) -> None:
    with av.open(target, "w", format=VIDEO_CODECS[video.codec]["options"][1],
                 container_options={"fflags": "+bitexact", **container_options}) as container:
        stream = container.add_stream(codec, rate=_fraction(video.fps))
        stream.width, stream.height, stream.pix_fmt = video.width, video.height, pixel_format
        stream.thread_count = 1
        stream.options = {"g": str(video.gop), "keyint_min": str(video.gop), **options}
        for frame in chosen:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def _encode_flac_in_process(pcm: np.ndarray, sample_rate: int) -> bytes | None:
    """Mono 16-bit samples as FLAC bytes via PyAV; None when PyAV is unavailable."""
    try:
        import av
    except ImportError:
        return None
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("flac", rate=sample_rate, layout="mono")
        stream.format = "s16"
        stream.thread_count = 1
        size = stream.codec_context.frame_size or 4608
        for start in range(0, len(pcm), size):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[None, start:start + size]), format="s16",
                                               layout="mono")
            frame.sample_rate, frame.pts = sample_rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def _fraction(value: float):
    from fractions import Fraction
    return Fraction(value).limit_denominator(1001)


_dali_checker: dict = {}


def _check_with_dali(modality: str, data: bytes, video: VideoSettings) -> bool:
    """Decode a VP9/MJPEG member with DALI's CPU decoder in this process; False when DALI is unavailable.

    One small pipeline per worker process, rebuilt after a failure (DALI invalidates a pipeline that
    raised). Raises TranscodeError when the member does not decode to the expected frames.
    """
    try:
        pipe = _dali_checker.get("pipe") or _build_dali_checker()
    except ImportError:
        return False
    try:
        pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
        (frames,) = pipe.run()
        shape = tuple(np.array(frames.at(0)).shape)
    except RuntimeError as error:
        _dali_checker.clear()
        raise TranscodeError(f"encoded member does not decode in DALI: {str(error).splitlines()[-1][:200]}",
                             modality) from None
    if shape != (video.frames, video.height, video.width, 3):
        raise TranscodeError(f"encoded {modality} decodes to frames of shape {shape}, expected "
                             f"{(video.frames, video.height, video.width, 3)}", modality)
    return True


def _build_dali_checker():
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def decode():
        return fn.decoders.video(fn.external_source(name="encoded", dtype=types.UINT8, ndim=1), device="cpu")

    pipe = decode()
    pipe.build()
    _dali_checker["pipe"] = pipe
    return pipe


def _run_jobs(jobs: list[_Job]) -> None:
    """All jobs in one ffmpeg launch; on failure, rerun them one by one to name the failing modality."""
    if not jobs:
        return
    try:
        _ffmpeg(_command(jobs))
    except TranscodeError as error:
        if len(jobs) == 1:
            raise TranscodeError(error.reason, jobs[0].modality) from None
        for job in jobs:
            _run_jobs([job])
        raise TranscodeError(error.reason, jobs[0].modality) from None


def _command(jobs: list[_Job]) -> list[str]:
    """Inputs first (each distinct input once, so a video and its audio track share one demuxer), then outputs."""
    inputs: list[tuple[str, ...]] = []
    for job in jobs:
        if job.input_args not in inputs:
            inputs.append(job.input_args)
    command = [arg for input_args in inputs for arg in input_args]
    for job in jobs:
        index = str(inputs.index(job.input_args))
        command += [arg.replace("{input}", index) for arg in job.output_args] + [str(job.target)]
    return command


def _ffmpeg(arguments: list[str]) -> None:
    completed = subprocess.run(["ffmpeg", *QUIET, *arguments], capture_output=True, check=False)
    if completed.returncode != 0:
        raise TranscodeError(summarize_stderr(completed.stderr))


# --- depth, features, audio, text -------------------------------------------------------------------------

def _is_image_sequence(value) -> bool:
    """A folder of images or a glob pattern of images (as opposed to a video file)."""
    value = _path_of(value)
    text = str(value)
    return (isinstance(value, Path) and value.is_dir()) or any(c in text for c in "*?[") or text.endswith("/")


def list_depth_frames(value) -> list[Path]:
    """The frame images of a folder (its PNG/JPEG files) or glob pattern, in name order, cut to the
    frame range when there is one."""
    folder = _path_of(value)
    if folder.is_dir():
        paths = [p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    else:
        paths = list(folder.parent.glob(folder.name))
    paths.sort(key=lambda p: p.name)
    if isinstance(value, FrameRange):
        paths = paths[value.start - 1:value.end]
    return paths


def _rgb_image_frames(value, video: VideoSettings) -> np.ndarray:
    """(frames, H, W, 3) uint8 from an image sequence: chosen frames, sized like decoded video."""
    from PIL import Image, UnidentifiedImageError
    paths = list_depth_frames(value)
    if not paths:
        raise TranscodeError(f"no PNG or JPEG frames in {value}")
    chosen = [paths[i] for i in pick_frame_indices(len(paths), video.frames, policy=video.policy,
                                                   stride=video.stride)]
    frames = []
    for path in chosen:
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        except (OSError, UnidentifiedImageError) as error:
            raise TranscodeError(f"cannot read image {path}: {error}") from None
        planes = [_resize_plane(pixels[..., channel], video) for channel in range(3)]
        frames.append(np.clip(np.rint(np.stack(planes, axis=-1)), 0, 255).astype(np.uint8))
    return np.stack(frames)


def depth_source_bits(value) -> int:
    """8 or 16: the bit depth of a depth source (first image's mode, or the video's pixel format)."""
    if _is_image_sequence(value):
        frames = list_depth_frames(value)
        if not frames:
            raise TranscodeError(f"no PNG or JPEG frames in {value}")
        from PIL import Image
        with Image.open(frames[0]) as image:
            return 16 if image.mode.startswith("I") else 8
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                            "stream=pix_fmt", "-of", "csv=p=0", str(_path_of(value))], capture_output=True,
                           check=False)
    if probe.returncode != 0:
        raise TranscodeError(summarize_stderr(probe.stderr))
    return 16 if SIXTEEN_BIT_PIXEL_FORMATS.search(probe.stdout.decode().strip()) else 8


def _depth_frames(value: Path, decoded: np.ndarray | None, video: VideoSettings,
                  depth: DepthSettings) -> np.ndarray:
    """(frames, H, W) uint8 or uint16 depth, sampled and sized like video frames."""
    if decoded is not None:  # a depth video, decoded as gray16le (8-bit sources read as v * 257)
        chosen = decoded[pick_frame_indices(len(decoded), video.frames, policy=video.policy, stride=video.stride)]
        return (chosen >> 8).astype(np.uint8) if depth.dtype == "uint8" else chosen.astype(np.uint16)
    paths = list_depth_frames(value)
    if not paths:
        raise TranscodeError(f"no PNG or JPEG frames in {value}; point the manifest at a folder or a pattern "
                             f"such as dir/*.png")
    chosen = [paths[i] for i in pick_frame_indices(len(paths), video.frames, policy=video.policy,
                                                   stride=video.stride)]
    return np.stack([_read_depth_image(path, video, depth) for path in chosen])


def _read_depth_image(path: Path, video: VideoSettings, depth: DepthSettings) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            sixteen = image.mode.startswith("I")
            pixels = np.asarray(image if sixteen else image.convert("L"), dtype=np.float32)
    except (OSError, UnidentifiedImageError) as error:
        raise TranscodeError(f"cannot read depth image {path}: {error}") from None
    if sixteen and depth.dtype == "uint8":
        raise TranscodeError(f"{path} is a 16-bit image, but this depth modality stores uint8 (its first "
                             f"sample is 8-bit); give every sample the same bit depth")
    if not sixteen and depth.dtype == "uint16":
        pixels = pixels * 257  # 8-bit into a 16-bit modality: full scale stays full scale
    resized = _resize_plane(pixels, video)
    return np.clip(np.rint(resized), 0, depth.max_value).astype(depth.dtype)


def _resize_plane(pixels: np.ndarray, video: VideoSettings) -> np.ndarray:
    """Scale a float plane to cover (crop) or fit (pad) height x width, then cut or pad the centre."""
    from PIL import Image
    rows, cols = pixels.shape
    scale = (max if video.resize == "crop" else min)(video.height / rows, video.width / cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    scaled = np.asarray(Image.fromarray(pixels.astype(np.float32)).resize(size, Image.BILINEAR))
    out = np.zeros((video.height, video.width), dtype=np.float32)
    top, left = (scaled.shape[0] - video.height) // 2, (scaled.shape[1] - video.width) // 2
    if video.resize == "crop":
        return scaled[top:top + video.height, left:left + video.width]
    out[-top:-top + scaled.shape[0], -left:-left + scaled.shape[1]] = scaled
    return out


def feature_dim(value: Path) -> int:
    """The feature dimension D of a (T, D) or (D,) .npy file, read from its header only."""
    try:
        array = np.load(value, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise TranscodeError(f"cannot read features {value}: {error}") from None
    return int(array.shape[-1]) if array.ndim else 0


def _load_features(value: Path, features: FeatureSettings) -> np.ndarray:
    """(T, D) float32 features, T <= max_frames (longer sequences keep their first max_frames)."""
    try:
        array = np.load(value, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise TranscodeError(f"cannot read features {value}: {error}") from None
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise TranscodeError(f"features {value} have shape {array.shape} and dtype {array.dtype}; "
                             f"store a numeric (T, D) array")
    if array.shape[1] != features.dim or array.shape[0] == 0:
        raise TranscodeError(f"features {value} have shape {array.shape}; this modality needs (T >= 1, "
                             f"{features.dim}) (D is fixed by its first sample)")
    trimmed = array[:features.max_frames].astype(np.float32)
    if not np.isfinite(trimmed).all():
        raise TranscodeError(f"features {value} contain NaN or infinite values; clean them before building")
    return trimmed


def _npy_bytes(array: np.ndarray) -> bytes:
    """npy format version 1.0, the one DALI's numpy decoder reads."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buffer.getvalue()


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


def summarize_stderr(stderr: bytes | None) -> str:
    """The last meaningful line of ffmpeg's stderr, without memory addresses (they differ per run)."""
    lines = [line.strip() for line in (stderr or b"").decode("utf-8", "replace").splitlines()]
    meaningful = [line for line in lines if line and not line.startswith(GENERIC_FFMPEG_LINES)]
    if not meaningful:
        return "ffmpeg failed without a message"
    return re.sub(r" @ 0x[0-9a-f]+", "", meaningful[-1])

"""`cotrain predict`: run an exported unimodal model on raw media with the preprocessing the shards got.

    raw file ─ shards.transcode (the shards' conversion) ─ the loader's DALI decode (same operators) ─ model
The parameters (fps, frames, size, codec, sample rate, mel settings, tokenizer) come from the exported file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.export import ExportedModel

__all__ = ["preprocess", "predict_files"]


def _dali_decode(kind: str, encoded: bytes, spec: dict, loader: dict) -> torch.Tensor:
    """Decode one encoded clip with the loader's own DALI graph, on the GPU where training decoded (NVDEC where it
    reads the clip's size), else on the CPU: video (C, T, H, W) from the centred window, audio (F, T). Video
    DALI's CPU decoder cannot read (H.264) is decoded by ffmpeg first where NVDEC does not, as in the loader."""
    from nvidia.dali import fn, pipeline_def, types

    from pipeline.config import LoaderConfig
    from pipeline.dali_loader import _audio, _video, decoded_in_feed, video_decoder
    from pipeline.decode import decode_video
    from pipeline.samples import model_frames

    from .device import loader_device_id

    cfg = LoaderConfig(**loader)
    device_id = loader_device_id()
    gpu = device_id is not None
    frames_fed = kind == "video" and decoded_in_feed(spec, gpu)
    raw = decode_video(encoded, height=spec["height"], width=spec["width"]) if frames_fed else \
        np.frombuffer(encoded, dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, enable_conditionals=True, seed=0)
    def _pipe():
        data = fn.external_source(name="raw", dtype=types.UINT8, ndim=raw.ndim)
        if kind == "audio":
            return _audio(data, spec, cfg, gpu=gpu)[0]
        centred = fn.constant(idata=[(int(spec["frames"]) - model_frames(spec, cfg)) // 2], dtype=types.INT32)
        return _video(data, spec, cfg, centred, 0, gpu=gpu, decoder=video_decoder(spec, gpu))[0]

    pipe = _pipe()
    pipe.build()
    pipe.feed_input("raw", [raw])
    (out,) = pipe.run()
    out = out.as_cpu() if gpu else out
    return torch.from_numpy(np.array(out.as_array()[0]))


def _convert(kind: str, source: Path, spec: dict) -> bytes:
    """The member `cotrain shards build` would have stored for this file, with the stored spec's settings."""
    from shards.transcode import AudioSettings, VideoSettings, convert_media

    video = VideoSettings(fps=spec.get("fps", 1), frames=spec.get("frames", 1), height=spec.get("height", 1),
                          width=spec.get("width", 1), codec=spec.get("codec", "vp9"), resize=spec.get("resize", "crop"),
                          policy=spec.get("policy", "uniform"), stride=spec.get("stride", 1),
                          keyint=spec.get("keyint", 0))
    audio = AudioSettings(sample_rate=spec.get("sample_rate", 16000), samples=spec.get("samples", 1),
                          format=spec.get("format", "wav"), fit=spec.get("fit", "start"))
    members = convert_media({"x": (kind, source)}, video=video, audio=audio, depth={}, features={}, tokenizer=None,
                            max_tokens=0)
    return next(iter(members.values()))


def preprocess(meta: dict, source: str, *, literal: bool = False) -> tuple[torch.Tensor, ...]:
    """The model's input (a batch of one) for a raw media file, or with `literal` for the text `source` itself."""
    from shards.transcode import encode_text, read_text

    kind, spec = meta["spec"]["kind"], meta["source"]
    if literal and kind != "text":
        raise ValueError(f"--text gives text, but this model reads {kind}: give {kind} files instead")
    if not literal and not Path(source).is_file():
        hint = "; give literal text with --text" if kind == "text" else ""
        raise FileNotFoundError(f"{source} not found: give a {kind} file{hint}")
    if kind in ("video", "audio"):
        return (_dali_decode(kind, _convert(kind, Path(source), spec), spec, meta["loader"])[None],)
    if kind == "text":
        from tokenizers import Tokenizer

        text = source if literal else read_text(Path(source))
        _, ids = encode_text(text, tokenizer=Tokenizer.from_str(meta["tokenizer"]), max_tokens=spec["max_tokens"])
        return (torch.from_numpy(np.frombuffer(ids, dtype="<i4").copy())[None],)
    if kind == "features":
        steps = np.load(source).astype(np.float32)[: int(spec["max_frames"])]  # (T_i, D), trimmed like the shards
        padded = np.zeros((int(spec["max_frames"]), steps.shape[1]), dtype=np.float32)
        padded[: len(steps)] = steps
        return torch.from_numpy(padded)[None], torch.tensor([len(steps)])
    raise ValueError(f"predict does not read {kind} inputs yet; supported: video, audio, text, features")


def _describe(meta: dict, outputs: torch.Tensor) -> dict:
    """Class probabilities (class), per-label probabilities (multilabel) or the predicted values (regression)."""
    task, names = meta.get("task", "class"), meta.get("class_names")
    row = outputs[0].float()
    if task == "regression":
        return {"values": row.tolist()}
    probs = torch.softmax(row, -1) if task == "class" else torch.sigmoid(row)
    labels = names or [str(i) for i in range(len(probs))]
    result = {"probabilities": dict(zip(labels, probs.tolist()))}
    if task == "class":
        result["prediction"] = labels[int(probs.argmax())]
    return result


def predict_files(model_path: str | Path, sources: list[str], texts: list[str] = ()) -> list[dict]:
    """One result per input, files first then literal texts: {"input", and the task's outputs} or, for an
    input that could not be predicted, {"input", "error"}; one bad input never costs the others' results."""
    model = ExportedModel(model_path)
    return ([_predict_one(model, str(s), literal=False) for s in sources]
            + [_predict_one(model, t, literal=True) for t in texts])


def _predict_one(model: ExportedModel, source: str, *, literal: bool) -> dict:
    try:
        return {"input": source, **_describe(model.meta, model(*preprocess(model.meta, source, literal=literal)))}
    except Exception as err:  # noqa: BLE001 -- a corrupt file fails in ffmpeg, DALI, numpy or the model alike
        return {"input": source, "error": _one_line(err)}


def _one_line(err: Exception) -> str:
    """The reason in one line: the exception's first non-empty line, prefixed by its type when that says more."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = lines[0] if lines else "unreadable"
    return first if isinstance(err, (ValueError, FileNotFoundError)) else f"{type(err).__name__}: {first}"

"""shards/: depth (images and video), features, FLAC audio, audio from a video's track, video sampling policies."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from shards.build import build_shards
from shards.manifest import read_manifest
from shards.transcode import pick_frame_indices


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _samples(out: Path, split: str = "train") -> dict[str, dict]:
    dataset = json.loads((out / "dataset.json").read_text())
    tars = [str(out / s["tar"]) for s in dataset["splits"][split]["shards"]]
    return {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}


def _npy(data: bytes) -> np.ndarray:
    assert data[6:8] == b"\x01\x00"  # npy format version 1.0
    return np.load(io.BytesIO(data), allow_pickle=False)


def _write_depth_pngs(folder: Path, count: int, *, bits: int, size=(20, 30)) -> list[np.ndarray]:
    folder.mkdir(parents=True)
    frames = []
    for index in range(count):
        top = 60000 if bits == 16 else 250
        frame = np.full(size, (index + 1) * top // count, dtype=np.uint16 if bits == 16 else np.uint8)
        Image.fromarray(frame).save(folder / f"{index:04d}.png")
        frames.append(frame)
    return frames


def test_sixteen_bit_png_depth_keeps_its_bit_depth(tmp_path):
    frames = _write_depth_pngs(tmp_path / "clip/Depth", 10, bits=16)
    manifest = _jsonl(tmp_path / "m.jsonl", [{"key": "a", "split": "train", "label": 0, "depth": "clip/Depth/*.png"}])
    assert read_manifest(manifest).kinds == {"depth": "depth"}
    out = tmp_path / "out"
    dataset = build_shards(manifest, out=out, frames=4, height=8, width=12, workers=1, progress=False)
    assert dataset["modalities"]["depth"] == {
        "kind": "depth", "ext": "depth.npy", "dtype": "uint16", "frames": 4, "height": 8, "width": 12,
        "max_value": 65535, "fps": 8, "resize": "crop", "policy": "uniform", "stride": 1}
    depth = _npy(_samples(out)["a"]["depth.npy"])
    assert depth.shape == (4, 8, 12) and depth.dtype == np.uint16
    chosen = pick_frame_indices(10, 4)
    assert depth[:, 4, 6].tolist() == [int(frames[i][0, 0]) for i in chosen]  # flat frames keep exact values
    assert depth.max() > 255


def test_eight_bit_depth_folder_and_depth_video_store_uint8(synthetic_manifest, tmp_path):
    _write_depth_pngs(tmp_path / "frames", 6, bits=8)
    video = json.loads(synthetic_manifest.read_text().splitlines()[0])["rgb"]
    manifest = _jsonl(tmp_path / "m.jsonl", [
        {"key": "a", "split": "train", "label": 0, "depth": "frames/"},
        {"key": "b", "split": "train", "label": 1, "depth": str(synthetic_manifest.parent / video)}])
    out = tmp_path / "out"
    dataset = build_shards(manifest, out=out, modality_kinds={"depth": "depth"}, frames=3, height=16,
                           width=16, workers=1, progress=False)
    assert dataset["modalities"]["depth"]["dtype"] == "uint8" and dataset["rejects"] == 0
    samples = _samples(out)
    from_images, from_video = _npy(samples["a"]["depth.npy"]), _npy(samples["b"]["depth.npy"])
    assert from_images.shape == from_video.shape == (3, 16, 16)
    assert from_images.dtype == from_video.dtype == np.uint8
    assert from_images[:, 8, 8].tolist() == [83, 166, 250]  # frames 1, 3, 5 of 6 (values (i + 1) * 250 // 6)
    assert from_video.std() > 0


def test_a_sixteen_bit_frame_in_an_eight_bit_depth_modality_is_rejected(tmp_path):
    _write_depth_pngs(tmp_path / "a", 2, bits=8)
    _write_depth_pngs(tmp_path / "b", 2, bits=16)
    manifest = _jsonl(tmp_path / "m.jsonl", [{"key": "a", "split": "train", "label": 0, "depth": "a/"},
                                             {"key": "b", "split": "train", "label": 0, "depth": "b/"},
                                             {"key": "c", "split": "train", "label": 0, "depth": "empty/*.png"}])
    out = tmp_path / "out"
    build_shards(manifest, out=out, frames=2, height=4, width=4, workers=1, progress=False)
    rejects = {r["key"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert "16-bit image, but this depth modality stores uint8" in rejects["b"]["reason"]
    assert "no PNG or JPEG frames" in rejects["c"]["reason"] and rejects["c"]["line"] == 3


def test_features_are_float32_npy_trimmed_to_max_frames(tmp_path):
    rng = np.random.default_rng(0)
    long, short = rng.normal(size=(50, 5)), rng.normal(size=(3, 5)).astype(np.float16)
    np.save(tmp_path / "long.npy", long)
    np.save(tmp_path / "short.npy", short)
    np.save(tmp_path / "wide.npy", np.zeros((4, 6)))
    np.save(tmp_path / "nan.npy", np.full((2, 5), np.nan))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    manifest = _jsonl(tmp_path / "m.jsonl", [{"key": k, "split": "train", "label": 0, "covarep": f"{k}.npy"}
                                             for k in ("long", "short", "wide", "nan", "junk")])
    out = tmp_path / "out"
    dataset = build_shards(manifest, out=out, feature_frames=20, workers=1, progress=False)
    assert dataset["modalities"]["covarep"] == {"kind": "features", "ext": "covarep.npy", "dtype": "float32",
                                                "dim": 5, "max_frames": 20}
    samples = _samples(out)
    stored_long, stored_short = _npy(samples["long"]["covarep.npy"]), _npy(samples["short"]["covarep.npy"])
    assert stored_long.dtype == np.float32 and np.array_equal(stored_long, long[:20].astype(np.float32))
    assert np.array_equal(stored_short, short.astype(np.float32))
    reasons = {r["key"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert set(reasons) == {"wide", "nan", "junk"}
    assert "needs (T >= 1, 5)" in reasons["wide"] and "NaN" in reasons["nan"] and "cannot read" in reasons["junk"]


def test_flac_audio_from_a_video_track_decodes_in_dali_to_the_wav_samples(tmp_path):
    clip = tmp_path / "clip.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1.5",
                    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=22050:duration=1.5", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(clip)], check=True)
    manifest = _jsonl(tmp_path / "m.jsonl", [{"key": "a", "split": "train", "label": 0, "rgb": "clip.mp4",
                                              "audio": "clip.mp4"}])
    wav_out, flac_out = tmp_path / "wav", tmp_path / "flac"
    build_shards(manifest, out=wav_out, modality_kinds={"audio": "audio"}, workers=1, progress=False)
    dataset = build_shards(manifest, out=flac_out, modality_kinds={"audio": "audio"}, audio_format="flac",
                           workers=1, progress=False)
    assert dataset["modalities"]["audio"]["ext"] == "audio.flac" and dataset["modalities"]["audio"]["format"] == "flac"
    flac = _samples(flac_out)["a"]["audio.flac"]
    assert flac[:4] == b"fLaC"
    wav_pcm = np.frombuffer(_samples(wav_out)["a"]["audio.wav"][44:], dtype="<i2")
    decoded = _dali_decode_audio(flac_out)
    assert decoded.shape == (16000,) and np.array_equal(decoded, wav_pcm)  # FLAC is lossless


def _dali_decode_audio(out: Path) -> np.ndarray:
    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        audio = fn.readers.webdataset(paths=[str(out / "train-000000.tar")], index_paths=[str(out / "train-000000.idx")],
                                      ext=["audio.flac"])
        decoded, _ = fn.decoders.audio(audio, dtype=types.INT16, downmix=True)
        return decoded

    pipe = decode()
    pipe.build()
    (decoded,) = pipe.run()
    return np.array(decoded.at(0))


def test_pad_keeps_the_whole_frame_and_crop_cuts_it(tmp_path):
    wide = tmp_path / "wide.mp4"  # white 64x16 frames: crop to 16x16 stays white, pad adds black bars
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "color=white:size=64x16:rate=8:duration=1",
                    "-pix_fmt", "yuv420p", str(wide)], check=True)
    manifest = _jsonl(tmp_path / "m.jsonl", [{"key": "a", "split": "train", "label": 0, "rgb": "wide.mp4"}])
    means = {}
    for resize in ("crop", "pad"):
        out = tmp_path / resize
        dataset = build_shards(manifest, out=out, resize=resize, height=16, width=16, frames=2, codec="mjpeg",
                               workers=1, progress=False)
        assert dataset["modalities"]["rgb"]["resize"] == resize
        raw = subprocess.run(["ffmpeg", "-v", "error", "-i", "pipe:", "-f", "rawvideo", "-pix_fmt", "gray", "pipe:"],
                             input=_samples(out)["a"]["rgb.avi"], capture_output=True, check=True).stdout
        frame = np.frombuffer(raw, dtype=np.uint8).reshape(2, 16, 16)[0]
        means[resize] = (frame[0].mean(), frame[8].mean())
    assert means["crop"][0] > 230 and means["crop"][1] > 230
    assert means["pad"][0] < 30 and means["pad"][1] > 230  # top rows are padding, the middle is picture


def test_stride_policy_takes_a_centred_window():
    assert pick_frame_indices(20, 4, policy="stride", stride=2).tolist() == [6, 8, 10, 12]  # window 6..12 of 0..19
    assert pick_frame_indices(5, 4, policy="stride", stride=2).tolist() == [0, 2, 4, 4]


def test_keyframe_interval_is_applied(synthetic_manifest, tmp_path):
    record = json.loads(synthetic_manifest.read_text().splitlines()[0])
    manifest = _jsonl(tmp_path / "m.jsonl", [{"key": "a", "split": "train", "label": 0,
                                              "rgb": str(synthetic_manifest.parent / record["rgb"])}])
    out = tmp_path / "out"
    dataset = build_shards(manifest, out=out, frames=8, keyint=4, codec="h264", workers=1, progress=False)
    assert dataset["modalities"]["rgb"]["keyint"] == 4
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=key_frame",
                            "-of", "csv=p=0", "pipe:"], input=_samples(out)["a"]["rgb.mp4"], capture_output=True,
                           check=True)
    assert [int(v.strip(",")) for v in probe.stdout.decode().split()] == [1, 0, 0, 0, 1, 0, 0, 0]


def test_in_process_dali_check_rejects_an_undecodable_member_and_recovers(tmp_path, synthetic_manifest):
    from shards.transcode import TranscodeError, VideoSettings, _check_with_dali
    broken = b"\x1aE\xdf\xa3" + b"garbage" * 50
    settings = VideoSettings(fps=8, frames=8, height=32, width=32)
    with pytest.raises(TranscodeError, match="does not decode in DALI") as error:
        _check_with_dali("rgb", broken, settings)
    assert error.value.modality == "rgb"
    good = tmp_path / "good.webm"  # the checker is rebuilt after a failure and accepts a good member
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=32x32:rate=8", "-frames:v", "8",
                    "-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p", str(good)], check=True)
    assert _check_with_dali("rgb", good.read_bytes(), settings)
    with pytest.raises(TranscodeError, match=r"shape \(8, 32, 32, 3\), expected \(4, 32, 32, 3\)"):
        _check_with_dali("rgb", good.read_bytes(), VideoSettings(fps=8, frames=4, height=32, width=32))


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_without_pyav_the_ffmpeg_cli_path_makes_the_same_members(synthetic_manifest, monkeypatch, codec):
    from shards.transcode import AudioSettings, VideoSettings, convert_media
    from shards.verify import decode_member
    record = json.loads(synthetic_manifest.read_text().splitlines()[0])
    values = {"rgb": ("video", synthetic_manifest.parent / record["rgb"]),
              "audio": ("audio", synthetic_manifest.parent / record["audio"])}
    settings = dict(video=VideoSettings(fps=8, frames=6, height=16, width=24, codec=codec),
                    audio=AudioSettings(sample_rate=8000, samples=8000, format="flac"),
                    depth={}, features={}, tokenizer=None, max_tokens=4)
    with_pyav = convert_media(values, **settings)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with_cli = convert_media(values, **settings)
    assert list(with_pyav) == list(with_cli) == [f"rgb.{'webm' if codec == 'vp9' else 'mp4'}", "audio.flac"]
    spec = {"kind": "video", "frames": 6, "height": 16, "width": 24}
    for members in (with_pyav, with_cli):
        assert decode_member(members[list(members)[0]], spec).shape == (6, 16, 24, 3)
        audio = decode_member(members["audio.flac"], {"kind": "audio", "format": "flac", "samples": 8000})
        assert audio.shape == (8000,)
    cli_audio = decode_member(with_cli["audio.flac"], {"kind": "audio", "format": "flac", "samples": 8000})
    pyav_audio = decode_member(with_pyav["audio.flac"], {"kind": "audio", "format": "flac", "samples": 8000})
    assert np.abs(cli_audio.astype(int) - pyav_audio.astype(int)).max() <= 2  # two resampler builds, same signal

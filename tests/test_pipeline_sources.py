"""pipeline/: remote shards (https via a local server, pipe:, brace lists) and corrupt data at read time."""
import functools
import http.server
import shutil
import threading

import numpy as np
import pytest
import torch

from pipeline import LoaderConfig, load_dataset_info, make_loader
from pipeline.source import CorruptSample


@pytest.fixture(scope="module")
def served_shards(tiny_shards):
    handler = functools.partial(_QuietHandler, directory=str(tiny_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _keys_and_text(loader):
    return [(k, t) for b in loader for k, t in zip(b.keys, b.inputs["text"].tolist())]


def _eval(info, backend="wds", **cfg):
    return make_loader(info, "train", LoaderConfig(batch_size=4, workers=0, **cfg), modalities=["text"],
                       training=False, backend=backend)


@pytest.mark.parametrize("backend", ["dali", "wds"])
def test_https_root_reads_the_same_samples_as_local(tiny_shards, served_shards, backend):
    local, remote = load_dataset_info(tiny_shards), load_dataset_info(served_shards)
    assert not remote.shards("train")[0].random_access
    assert _keys_and_text(_eval(remote, backend)) == _keys_and_text(_eval(local, backend))


def test_brace_pattern_and_pipe_urls(tiny_shards, served_shards):
    local = load_dataset_info(tiny_shards)
    braced = local.with_shard_urls("train", f"{served_shards}/train-{{000000..000002}}.tar")
    piped = local.with_shard_urls("train", f"pipe:cat {tiny_shards}/train-{{000000..000002}}.tar")
    expected = _keys_and_text(_eval(local))
    assert _keys_and_text(_eval(braced)) == expected == _keys_and_text(_eval(piped))
    # streamed shards are shuffled by shard blocks: still one seeded order, resumable as (epoch, step)
    train = make_loader(braced, "train", LoaderConfig(batch_size=4, workers=0), modalities=["text"], training=True)
    assert train.state_dict()["order"] == "by_shard"
    assert len({k for b in train.epoch() for k in b.keys}) == 20


def test_brace_url_naming_an_unknown_shard_is_refused(tiny_shards):
    with pytest.raises(ValueError, match="not a train shard"):
        load_dataset_info(tiny_shards).with_shard_urls("train", "/elsewhere/train-{000000..000009}.tar")


@pytest.fixture
def damaged(tiny_shards, tmp_path):
    """A copy whose second train shard is cut in half and whose first sample's text ids are garbage."""
    copy = tmp_path / "damaged"
    shutil.copytree(tiny_shards, copy)
    second = copy / "train-000001.tar"
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2])
    first_index = (copy / "train-000000.idx").read_text().splitlines()[1].split()
    words = {first_index[i]: (int(first_index[i + 1]), int(first_index[i + 2])) for i in range(0, len(first_index), 4)}
    offset, size = words["text.ids"]
    (copy / "train-000000.idx").write_text((copy / "train-000000.idx").read_text().replace(
        f"text.ids {offset} {size}", f"text.ids {offset} {size - 4}"))
    return copy


@pytest.mark.parametrize("backend", ["dali", "wds"])
def test_on_corrupt_fail_names_the_problem_and_the_fix(damaged, backend):
    info = load_dataset_info(damaged)
    with pytest.raises(CorruptSample, match="--on-corrupt skip"):
        list(_eval(info, backend))


@pytest.mark.parametrize("backend", ["dali", "wds"])
def test_on_corrupt_skip_counts_and_keeps_batch_counts(damaged, backend):
    info = load_dataset_info(damaged)
    loader = make_loader(info, "train", LoaderConfig(batch_size=4, workers=0, on_corrupt="skip"),
                         modalities=["text"], training=True, backend=backend)
    batches = list(loader.epoch())
    assert len(batches) == loader.steps_per_epoch == 5
    assert all(len(b) == 4 for b in batches)
    assert loader.skipped["bad_member"] >= 1 and loader.skipped["truncated_shard"] >= 1
    keys = {k for b in batches for k in b.keys}
    assert all(torch.all(b.lengths["text"] > 0) for b in batches) and len(keys) > 10


@pytest.fixture(scope="module")
def h264_shards(synthetic_manifest, tmp_path_factory):
    from shards.build import build_shards

    out = tmp_path_factory.mktemp("h264")
    build_shards(synthetic_manifest, out=out, codec="h264", max_shard_samples=16, workers=2)
    return out


def test_h264_on_the_cpu_path_is_decoded_in_the_feed(h264_shards, tiny_shards):
    from pipeline.dali_loader import decoded_in_feed

    info = load_dataset_info(h264_shards)
    rgb = info.modalities["rgb"]  # 32x32: below NVDEC's 48x16 minimum for H.264, so the feed decodes it on a GPU too
    assert decoded_in_feed(rgb, gpu=False) and decoded_in_feed(rgb, gpu=True)
    assert not decoded_in_feed(dict(rgb, width=64, height=64), gpu=True)
    cfg = LoaderConfig(batch_size=4, workers=0)
    dali, wds = ([b for b in make_loader(info, "val", cfg, modalities=["rgb"], training=False, backend=name)]
                 for name in ("dali", "wds"))
    vp9 = {k: x for b in make_loader(load_dataset_info(tiny_shards), "val", cfg, modalities=["rgb"], training=False,
                                     backend="dali") for k, x in zip(b.keys, b.inputs["rgb"])}
    for a, b in zip(dali, wds):
        assert a.keys == b.keys and torch.allclose(a.inputs["rgb"], b.inputs["rgb"], atol=1e-5)
        for key, clip in zip(a.keys, a.inputs["rgb"]):  # two lossy codecs of the same frames (measured 0.13)
            assert (clip - vp9[key]).abs().mean() < 0.25


def test_loader_check_runs_its_cpu_variant(h264_shards):
    import sys

    from bench.loader_check import check

    result = check(str(h264_shards), "cpu", split="val")
    assert result["ok"] and result["clips"] == 5 and result["path"] == "dali-cpu"
    assert sys.modules["bench.loader_check"].MEAN_TOLERANCE_LEVELS >= result["worst_clip_mean_abs_diff_levels"]


@pytest.fixture
def garbled_video(tiny_shards, tmp_path):
    """A copy in which one train clip keeps its WebM header but its frames are noise."""
    copy = tmp_path / "garbled"
    shutil.copytree(tiny_shards, copy)
    words = (copy / "train-000000.idx").read_text().splitlines()[2].split()
    members = {words[i]: (int(words[i + 1]), int(words[i + 2]), words[i + 3]) for i in range(0, len(words), 4)}
    offset, size, name = members["rgb.webm"]
    data = bytearray((copy / "train-000000.tar").read_bytes())
    noise = bytes(np.random.default_rng(0).integers(0, 256, size - 200, dtype=np.uint8))
    data[offset + 200:offset + size] = noise
    (copy / "train-000000.tar").write_bytes(bytes(data))
    return copy, name.split(".")[0]


@pytest.mark.parametrize("backend", ["dali", "wds"])
def test_a_clip_that_does_not_decode_is_skipped(garbled_video, backend):
    shards, bad_key = garbled_video
    info = load_dataset_info(shards)
    cfg = LoaderConfig(batch_size=4, workers=0, on_corrupt="skip", shuffle_buffer=0)
    loader = make_loader(info, "train", cfg, modalities=["rgb"], training=True, backend=backend)
    batches = list(loader.epoch())
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    assert bad_key not in {k for b in batches for k in b.keys}
    assert sum(loader.skipped.values()) >= 1
    strict = make_loader(info, "train", LoaderConfig(batch_size=4, workers=0, shuffle_buffer=0), modalities=["rgb"],
                         training=True, backend=backend)
    with pytest.raises((RuntimeError, CorruptSample)):
        list(strict.epoch())


def test_npy_members_read_from_many_threads_come_back_intact():
    """The reader parses .npy headers from a thread pool; CPython 3.11's AST constructor is not thread-safe
    (python/cpython#106905), which once stopped a grid with a SystemError, so read_npy serialises the parse."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from pipeline.source import read_npy

    arrays = [(np.arange(12) + i).astype(np.uint8).reshape(3, 4) for i in range(400)]
    blobs = []
    for array in arrays:
        buffer = io.BytesIO()
        np.save(buffer, array)
        blobs.append(buffer.getvalue())
    with ThreadPoolExecutor(8) as pool:
        back = list(pool.map(read_npy, blobs))
    assert all(np.array_equal(a, b) and b.dtype == np.uint8 for a, b in zip(arrays, back))


def test_pyav_decodes_every_stored_codec_in_process(tiny_shards, h264_shards, monkeypatch):
    """No process per clip: decoding works with subprocesses forbidden, and a bad member names its problem."""
    import subprocess

    from pipeline.decode import DecodeError, decode_audio, decode_video
    from pipeline.source import SampleReader
    from tests.pipeline_fixtures import flac_from_wav

    members = [SampleReader(load_dataset_info(s).shards("val")).read(0).members for s in (tiny_shards, h264_shards)]
    flac = flac_from_wav(members[0]["audio.wav"])

    def forbidden(*args, **kwargs):
        raise AssertionError("a decoder started a process")

    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    for clip in (members[0]["rgb.webm"], members[1]["rgb.mp4"]):
        assert decode_video(clip, height=32, width=32).shape == (8, 32, 32, 3)
    wav = decode_audio(members[0]["audio.wav"], sample_rate=16000)
    assert np.array_equal(decode_audio(flac, sample_rate=16000), wav)  # FLAC is lossless
    with pytest.raises(DecodeError, match="dataset.json says 64x64"):
        decode_video(members[0]["rgb.webm"], height=64, width=64)
    with pytest.raises(DecodeError, match="video does not decode"):
        decode_video(b"not a clip at all", height=32, width=32)
    with pytest.raises(DecodeError, match="audio does not decode"):
        decode_audio(b"not audio either", sample_rate=16000)

"""pipeline/: both loaders follow the batch contract for every member kind and label type."""
import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline import LoaderConfig, load_dataset_info, make_loader
from pipeline.decode import DEPTH_MEAN, DEPTH_STD
from tests.pipeline_fixtures import write_rich_shards

BACKENDS = ["dali", "wds"]


@pytest.fixture(scope="module")
def rich_shards(tiny_shards, tmp_path_factory):
    return write_rich_shards(tiny_shards, tmp_path_factory.mktemp("rich"))


def _stored(info):
    tars, _ = info.shard_paths("train")
    return {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}


def _eval_batches(info, backend, **cfg):
    return list(make_loader(info, "train", LoaderConfig(batch_size=4, workers=0, **cfg), training=False,
                            backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_depth_and_features_decode_to_the_stored_values(rich_shards, backend):
    info = load_dataset_info(rich_shards)
    stored = _stored(info)
    batches = _eval_batches(info, backend)
    assert sum(len(b) for b in batches) == 10
    for batch in batches:
        assert batch.inputs["depth"].shape == (len(batch), 1, 8, 32, 32)
        assert batch.inputs["depth"].dtype == torch.float32
        assert batch.inputs["feat"].shape == (len(batch), 5, 6)
        assert batch.lengths["feat"].dtype == torch.int64
        for i, key in enumerate(batch.keys):
            sample = stored[key]
            if "depth.npy" in sample:
                depth = np.load(io.BytesIO(sample["depth.npy"])).astype(np.float32) / 65535
                expected = torch.from_numpy((depth - DEPTH_MEAN) / DEPTH_STD)[None]
                assert torch.allclose(batch.inputs["depth"][i], expected, atol=1e-6)
                assert batch.present["depth"][i]
            else:
                assert not batch.present["depth"][i] and torch.count_nonzero(batch.inputs["depth"][i]) == 0
            if "feat.npy" in sample:
                rows = np.load(io.BytesIO(sample["feat.npy"]))[:5]
                assert batch.lengths["feat"][i] == len(rows)
                assert torch.equal(batch.inputs["feat"][i, :len(rows)], torch.from_numpy(rows))
                assert torch.count_nonzero(batch.inputs["feat"][i, len(rows):]) == 0
            else:
                assert not batch.present["feat"][i] and batch.lengths["feat"][i] == 0
            ids = np.frombuffer(sample["text.ids"], "<i4")
            assert batch.lengths["text"][i] == np.count_nonzero(ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flac_audio_gives_the_features_of_its_wav_source(rich_shards, tiny_shards, backend):
    flac = _eval_batches(load_dataset_info(rich_shards), backend)
    wav = {k: x for b in _eval_batches(load_dataset_info(tiny_shards), backend) for k, x in
           zip(b.keys, b.inputs["audio"])}
    for batch in flac:
        for key, x in zip(batch.keys, batch.inputs["audio"]):
            assert torch.allclose(x, wav[key], atol=1e-4)  # FLAC is lossless


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("features, rows", [("mfcc", 13), ("waveform", None)])
def test_audio_feature_options(tiny_shards, backend, features, rows):
    info = load_dataset_info(tiny_shards)
    batch = next(iter(make_loader(info, "val", LoaderConfig(batch_size=2, audio_features=features, workers=0),
                                  modalities=["audio"], training=False, backend=backend)))
    expected = (2, rows, 101) if rows else (2, info.modalities["audio"]["samples"])
    assert batch.inputs["audio"].shape == expected
    if rows:  # per-sample normalised
        assert abs(float(batch.inputs["audio"][0].mean())) < 1e-3


@pytest.mark.parametrize("label_type", ["regression", "multilabel"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_label_types(tiny_shards, tmp_path, label_type, backend):
    info = load_dataset_info(write_rich_shards(tiny_shards, tmp_path / label_type, label_type=label_type,
                                               audio_format="wav"))
    stored = _stored(info)
    batch = next(iter(make_loader(info, "train", LoaderConfig(batch_size=4, workers=0), modalities=["text"],
                                  training=False, backend=backend)))
    assert batch.labels.dtype == torch.float32
    for key, label in zip(batch.keys, batch.labels):
        value = json.loads(stored[key]["json"])["label"]
        if label_type == "regression":
            assert torch.allclose(label, torch.tensor(value, dtype=torch.float32))
        else:
            assert label.shape == (4,) and set(torch.nonzero(label).flatten().tolist()) == set(value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temporal_window_random_in_training_centred_in_eval(rich_shards, backend):
    info = load_dataset_info(rich_shards)
    full = {k: x for b in _eval_batches(info, backend) for k, x in zip(b.keys, b.inputs["rgb"])}
    cfg = LoaderConfig(batch_size=4, workers=0, video_frames=4)
    for batch in make_loader(info, "train", cfg, modalities=["rgb"], training=False, backend=backend):
        for key, clip in zip(batch.keys, batch.inputs["rgb"]):
            assert torch.equal(clip, full[key][:, 2:6])  # (8 - 4) // 2 = 2
    starts = set()
    loader = make_loader(info, "train", cfg, modalities=["rgb"], training=True, backend=backend, seed=3)
    for batch in loader.epoch():
        for key, clip in zip(batch.keys, batch.inputs["rgb"]):
            matches = [s for s in range(5) if torch.equal(clip, full[key][:, s:s + 4])]
            assert len(matches) >= 1
            starts.add(matches[0])
    assert len(starts) > 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_hflip_only_when_configured(rich_shards, backend):
    info = load_dataset_info(rich_shards)
    full = {k: x for b in _eval_batches(info, backend) for k, x in zip(b.keys, b.inputs["rgb"])}
    plain = make_loader(info, "train", LoaderConfig(batch_size=4, workers=0), modalities=["rgb"], training=True,
                        backend=backend)
    assert all(torch.equal(c, full[k]) for b in plain.epoch() for k, c in zip(b.keys, b.inputs["rgb"]))
    flipped = make_loader(info, "train", LoaderConfig(batch_size=4, workers=0, augment={"rgb": {"hflip": 1.0}}),
                          modalities=["rgb"], training=True, backend=backend)
    assert all(torch.equal(c, full[k].flip(-1)) for b in flipped.epoch() for k, c in zip(b.keys, b.inputs["rgb"]))


def test_config_errors_name_the_field(rich_shards):
    info = load_dataset_info(rich_shards)
    with pytest.raises(ValueError, match="audio_features"):
        LoaderConfig(audio_features="mel")
    with pytest.raises(ValueError, match="on_corrupt"):
        LoaderConfig(on_corrupt="ignore")
    with pytest.raises(ValueError, match="supports: none"):
        make_loader(info, "train", LoaderConfig(augment={"audio": {"hflip": 0.5}}), training=True)
    with pytest.raises(ValueError, match="backend"):
        make_loader(info, "train", LoaderConfig(), training=True, backend="torch")
    with pytest.raises(ValueError, match="loader.backend must be one of auto, dali, wds"):
        LoaderConfig(backend="ffmpeg")


def test_auto_backend_falls_back_without_dali(tiny_shards, monkeypatch):
    import sys

    info = load_dataset_info(tiny_shards)
    assert make_loader(info, "val", LoaderConfig(), training=False).backend == "dali"
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if nvidia-dali were not installed
    loader = make_loader(info, "val", LoaderConfig(batch_size=2, workers=0), modalities=["text"], training=False)
    assert loader.backend == "wds" and len(next(iter(loader))) == 2
    with pytest.raises(ImportError, match="backend 'wds'"):
        make_loader(info, "val", LoaderConfig(), training=False, backend="dali")

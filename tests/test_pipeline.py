"""pipeline/: DALI batches follow the batch contract and cover each split exactly as dataset.json says."""
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline.dali_loader import DaliLoader, LoaderConfig
from pipeline.dataset import load_dataset_info


def _wds_samples(info, split):
    tars, _ = info.shard_paths(split)
    return {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}


def test_eval_pass_yields_every_sample_once_with_its_label(tiny_shards):
    info = load_dataset_info(tiny_shards)
    expected = _wds_samples(info, "test")
    seen = {}
    for batch in DaliLoader(info, "test", LoaderConfig(batch_size=5), training=False):
        for key, label in zip(batch.keys, batch.labels.tolist()):
            assert key not in seen
            seen[key] = label
    assert len(seen) == info.samples("test") == len(expected)
    assert seen == {k: json.loads(s["json"])["label"] for k, s in expected.items()}


def test_batch_contract_shapes_and_dtypes(tiny_shards):
    info = load_dataset_info(tiny_shards)
    rgb, audio, text = (info.modalities[m] for m in ("rgb", "audio", "text"))
    batch = next(iter(DaliLoader(info, "train", LoaderConfig(batch_size=4), training=True)))
    assert batch.inputs["rgb"].shape == (4, 3, rgb["frames"], rgb["height"], rgb["width"])
    assert batch.inputs["rgb"].dtype == torch.float32
    assert batch.inputs["audio"].shape[:2] == (4, 40)
    assert batch.inputs["text"].shape == (4, text["max_tokens"]) and batch.inputs["text"].dtype == torch.int32
    assert batch.labels.dtype == torch.int64 and len(batch.keys) == 4
    assert all(p.dtype == torch.bool and p.shape == (4,) for p in batch.present.values())
    assert audio["sample_rate"] > 0


def test_text_ids_match_the_stored_member(tiny_shards):
    info = load_dataset_info(tiny_shards)
    stored = _wds_samples(info, "val")
    for batch in DaliLoader(info, "val", LoaderConfig(batch_size=4), modalities=["text"], training=False):
        for key, ids in zip(batch.keys, batch.inputs["text"]):
            assert np.array_equal(ids.numpy(), np.frombuffer(stored[key]["text.ids"], dtype="<i4"))


def test_missing_modality_is_zero_and_marked_absent(tiny_shards_with_gap):
    shards, missing_key = tiny_shards_with_gap
    info = load_dataset_info(shards)
    found = False
    for batch in DaliLoader(info, "train", LoaderConfig(batch_size=4), training=False):
        for i, key in enumerate(batch.keys):
            if key == missing_key:
                found = True
                assert not batch.present["audio"][i]
                assert torch.count_nonzero(batch.inputs["audio"][i]) == 0
                assert batch.present["rgb"][i]
            else:
                assert batch.present["audio"][i]
    assert found


def test_ranks_read_disjoint_samples_and_the_same_number_of_batches(tiny_shards):
    info = load_dataset_info(tiny_shards)
    loaders = [DaliLoader(info, "train", LoaderConfig(batch_size=4, shuffle_buffer=0), training=True, rank=r,
                          world_size=2) for r in range(2)]
    assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch == info.samples("train") // 8
    keys = [[k for b in loader.epoch() for k in b.keys] for loader in loaders]
    assert len(keys[0]) == len(keys[1])
    assert not set(keys[0]) & set(keys[1])


def test_too_large_batch_is_a_clear_error(tiny_shards):
    info = load_dataset_info(tiny_shards)
    loader = DaliLoader(info, "val", LoaderConfig(batch_size=64), training=True)
    with pytest.raises(ValueError, match="lower --batch-size"):
        _ = loader.steps_per_epoch


def test_unknown_modality_and_split_name_the_valid_ones(tiny_shards):
    info = load_dataset_info(tiny_shards)
    with pytest.raises(ValueError, match="valid: rgb, audio, text"):
        info.select(["depth"])
    with pytest.raises(ValueError, match="it has: test, train, val"):
        info.shard_paths("holdout")


def test_missing_dataset_json_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="cotrain shards build"):
        load_dataset_info(tmp_path)

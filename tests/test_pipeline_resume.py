"""pipeline/: parity between the loaders, seeded per-epoch order, exact resume, disjoint equal ranks."""
import pickle

import pytest
import torch

from pipeline import LoaderConfig, load_dataset_info, make_loader

BACKENDS = ["dali", "wds"]
VIDEO_MEAN_TOLERANCE = 1.0 / (0.225 * 255)  # one 8-bit level, in normalised units (mean over a clip)
VIDEO_MAX_TOLERANCE = 10.0 / (0.225 * 255)  # ten levels at any pixel (measured: 8; different YUV->RGB code)
AUDIO_TOLERANCE = 1e-4                       # float32 rounding of the same formulas


def _loader(info, backend, *, seed=5, rank=0, world_size=1, modalities=("audio", "text"), **cfg):
    cfg = dict(dict(batch_size=3, workers=0), **cfg)
    return make_loader(info, "train", LoaderConfig(**cfg), modalities=list(modalities), training=True, seed=seed,
                       rank=rank, world_size=world_size, backend=backend)


def _same(a, b):
    return a.keys == b.keys and all(torch.equal(a.inputs[m], b.inputs[m]) for m in a.inputs) \
        and torch.equal(a.labels, b.labels)


def test_both_loaders_give_the_same_tensors(tiny_shards):
    info = load_dataset_info(tiny_shards)
    dali, wds = (list(_loader(info, b, modalities=("rgb", "audio", "text")).epoch()) for b in BACKENDS)
    assert len(dali) == len(wds) == info.samples("train") // 3
    for a, b in zip(dali, wds):
        assert a.keys == b.keys and torch.equal(a.labels, b.labels)
        assert torch.equal(a.inputs["text"], b.inputs["text"]) and torch.equal(a.lengths["text"], b.lengths["text"])
        assert torch.equal(a.present["rgb"], b.present["rgb"])
        assert (a.inputs["audio"] - b.inputs["audio"]).abs().max() < AUDIO_TOLERANCE
        video = (a.inputs["rgb"] - b.inputs["rgb"]).abs()
        assert video.mean(dim=(1, 2, 3, 4)).max() < VIDEO_MEAN_TOLERANCE and video.max() < VIDEO_MAX_TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_depends_on_seed_and_epoch_only(tiny_shards, backend):
    info = load_dataset_info(tiny_shards)
    first, again, other = (_loader(info, backend, seed=s) for s in (5, 5, 6))
    epochs = [[k for b in first.epoch() for k in b.keys] for _ in range(2)]
    assert epochs == [[k for b in again.epoch() for k in b.keys] for _ in range(2)]
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert epochs[0] != [k for b in other.epoch() for k in b.keys]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stop_at", [2, 7])  # mid-epoch, and in the second epoch (7 steps per epoch)
def test_restore_gives_the_uninterrupted_batches(tiny_shards, backend, stop_at):
    info = load_dataset_info(tiny_shards)
    workers = {"workers": 2} if stop_at == 7 else {}  # the DALI-free loader's worker processes, once
    _loader = lambda *a, **k: globals()["_loader"](*a, **workers, **k)  # noqa: E731
    reference = _loader(info, backend)
    uninterrupted = [b for _ in range(3) for b in reference.epoch()]
    interrupted, taken = _loader(info, backend), 0
    for batch in interrupted.epoch():
        taken += 1
        if taken == stop_at:
            break
    if taken < stop_at:  # the stop lies in a later epoch
        for batch in interrupted.epoch():
            taken += 1
            if taken == stop_at:
                break
    state = pickle.loads(pickle.dumps(interrupted.state_dict()))
    restored, control = _loader(info, backend), _loader(info, backend)
    restored.load_state_dict(state)
    resumed = [b for _ in range(3 - state["epoch"]) for b in restored.epoch()]
    assert len(resumed) == len(uninterrupted) - stop_at
    assert all(_same(a, b) for a, b in zip(resumed, uninterrupted[stop_at:]))
    # negative control: the same run without restoring the state does not continue where it stopped
    not_restored = [b for b in control.epoch()]
    assert not all(_same(a, b) for a, b in zip(not_restored, uninterrupted[stop_at:]))


def test_a_state_from_another_world_size_is_refused(tiny_shards):
    info = load_dataset_info(tiny_shards)
    state = _loader(info, "wds", world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        _loader(info, "wds").load_state_dict(state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_read_disjoint_parts_with_equal_batch_counts(tiny_shards, backend):
    info = load_dataset_info(tiny_shards)  # 22 train samples in shards of 8, 8, 6
    for epoch in range(2):
        ranks = [_loader(info, backend, rank=r, world_size=2, batch_size=4) for r in range(2)]
        for loader in ranks:
            loader.load_state_dict(dict(loader.state_dict(), epoch=epoch))
        keys = [[k for b in loader.epoch() for k in b.keys] for loader in ranks]
        assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == 22 // 8
        assert len(keys[0]) == len(keys[1]) == 8 and not set(keys[0]) & set(keys[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_ranks_cover_the_split_once(tiny_shards, backend):
    info = load_dataset_info(tiny_shards)
    keys = [k for r in range(2) for b in make_loader(info, "train", LoaderConfig(batch_size=4, workers=0),
                                                      modalities=["text"], training=False, rank=r, world_size=2,
                                                      backend=backend) for k in b.keys]
    assert len(keys) == len(set(keys)) == info.samples("train")


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_taken_while_a_batch_is_in_hand_resumes_after_it(tiny_shards, backend):
    info = load_dataset_info(tiny_shards)
    loader = _loader(info, backend)
    batches = loader.epoch()
    next(batches)
    state = loader.state_dict()  # what a checkpoint after training on the first batch saves
    second = next(batches)
    restored = _loader(info, backend)
    restored.load_state_dict(state)
    assert state["step"] == 1 and _same(next(restored.epoch()), second)

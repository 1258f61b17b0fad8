"""shards/synth_tasks.py: the gesture, emotion and sentiment corpora are real media the builder accepts,
deterministic, and built as designed (each modality shows its own noisy, partly confused view)."""
import hashlib
import json
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

from shards.build import build_shards
from shards.cli import shards_group
from shards.manifest import read_manifest
from shards.synth_media import FaceExpression, render_face
from shards.synth_tasks import (CONFUSED, FACES, P_MISLEAD, SENTIMENT_MOUTH_BEND, _gesture_depth, _gesture_rgb,
                                _sentiment_voice, render_sentiment_text, write_task_corpus)

SAMPLES = 14  # 10 train / 2 val / 2 test


@pytest.fixture(scope="module", params=["gesture", "emotion", "sentiment"])
def corpus(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param)
    return request.param, write_task_corpus(request.param, out, n=SAMPLES, seed=5, workers=2, progress=False)


def _records(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _media_digests(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_the_builder_turns_every_task_into_shards_with_the_right_kinds_and_labels(corpus, tmp_path):
    task, manifest = corpus
    kinds = read_manifest(manifest).kinds
    expected = {"gesture": {"rgb": "video", "depth": "depth"}, "emotion": {"rgb": "video", "audio": "audio"},
                "sentiment": {"rgb": "video", "audio": "audio", "text": "text"}}[task]
    assert kinds == expected
    description = build_shards(manifest, out=tmp_path / "shards", workers=1, progress=False)
    assert description["rejects"] == 0
    assert sum(split["samples"] for split in description["splits"].values()) == SAMPLES
    if task == "sentiment":
        assert description["label"] == {"type": "regression", "dim": 1}
    else:
        assert description["label"]["type"] == "class" and description["label"]["num_classes"] <= 6


def test_labels_have_the_task_type_and_range(corpus):
    task, manifest = corpus
    labels = [record["label"] for record in _records(manifest)]
    if task == "sentiment":
        assert all(isinstance(label, float) and -3.0 <= label <= 3.0 for label in labels)
        assert len(set(labels)) == len(labels)  # continuous scores, not a few levels
    else:
        assert all(isinstance(label, int) and 0 <= label < 6 for label in labels)


def test_media_are_real_files_of_the_documented_sizes(corpus):
    task, manifest = corpus
    record = _records(manifest)[0]
    with av.open(str(manifest.parent / record["rgb"])) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 16 and frames[0].shape == (48, 48, 3)
    if "audio" in record:
        with wave.open(str(manifest.parent / record["audio"])) as wav:
            assert (wav.getframerate(), wav.getnframes(), wav.getnchannels()) == (16000, 16000, 1)


def test_same_seed_gives_the_same_manifest_and_media_bytes_other_seed_differs(corpus, tmp_path):
    task, manifest = corpus
    again = write_task_corpus(task, tmp_path / "again", n=SAMPLES, seed=5, workers=1, progress=False)
    assert again.read_bytes() == manifest.read_bytes()
    assert _media_digests(again.parent) == _media_digests(manifest.parent)
    other = write_task_corpus(task, tmp_path / "other", n=2, seed=6, workers=1, progress=False)
    video = _records(manifest)[0]["rgb"]
    assert _media_digests(other.parent)[video] != _media_digests(manifest.parent)[video]


def test_shown_values_follow_the_label_except_for_the_misleading_fraction(tmp_path):
    """Over 400 sentiment draws (text only, no media: cheap) each modality shows the label about
    1 - p_mislead of the time, and independently: all three wrong together is rare."""
    from shards.synth_tasks import _shown_score
    rng = np.random.default_rng(0)
    labels = rng.uniform(-3, 3, size=2000)
    shown = {name: np.array([_shown_score(rng, label, p) for label in labels])
             for name, p in P_MISLEAD["sentiment"].items()}
    wrong = {name: values != labels for name, values in shown.items()}
    for name, p in P_MISLEAD["sentiment"].items():
        assert abs(wrong[name].mean() - p) < 0.03
        assert np.all(np.abs(shown[name][wrong[name]] - labels[wrong[name]]) >= 1.0)
    assert (wrong["rgb"] & wrong["audio"] & wrong["text"]).mean() < 0.02


def test_shown_jsonl_records_the_class_each_modality_renders(corpus):
    task, manifest = corpus
    shown = [json.loads(line) for line in (manifest.parent / "shown.jsonl").read_text().splitlines()]
    records = _records(manifest)
    assert [row["key"] for row in shown] == [record["key"] for record in records]
    assert set(shown[0]) - {"key"} == set(P_MISLEAD[task])


def _motion_centroids(frames: np.ndarray) -> np.ndarray:
    """(T, 2) brightness-weighted (x, y) of each frame's brightest pixels."""
    grey = frames.astype(float).mean(axis=-1)
    centroids = []
    for frame in grey:
        mask = frame >= np.quantile(frame, 0.985)
        ys, xs = np.nonzero(mask)
        centroids.append((xs.mean(), ys.mean()))
    return np.array(centroids)


def test_gesture_rgb_hides_push_versus_pull_and_depth_hides_left_versus_right():
    """Push/pull are the same still hand in rgb but ramp in depth; left/right swipes move the hand in rgb
    in opposite directions but in depth with a random sign."""
    def rgb_dx(shown, seed):
        return np.polyfit(np.arange(16), _motion_centroids(_gesture_rgb(np.random.default_rng(seed), shown))[:, 0], 1)[0]

    def depth_brightness_slope(shown, seed):
        frames = _gesture_depth(np.random.default_rng(seed), shown).astype(float)[..., 0]
        return np.polyfit(np.arange(16), np.sort(frames.reshape(16, -1), axis=1)[:, -20:].mean(axis=1), 1)[0]

    seeds = range(12)
    assert all(rgb_dx(0, s) > 0.3 for s in seeds) and all(rgb_dx(2, s) < -0.3 for s in seeds)
    assert all(abs(rgb_dx(4, s)) < 0.3 for s in seeds) and all(abs(rgb_dx(5, s)) < 0.3 for s in seeds)
    assert all(depth_brightness_slope(4, s) > 1.0 for s in seeds)
    assert all(depth_brightness_slope(5, s) < -1.0 for s in seeds)

    def depth_dx(shown, seed):
        frames = _gesture_depth(np.random.default_rng(seed), shown)
        return np.polyfit(np.arange(16), _motion_centroids(frames)[:, 0], 1)[0]

    signs = {shown: {np.sign(depth_dx(shown, s)) for s in range(12)} for shown in (0, 2)}
    assert signs[0] == {-1.0, 1.0} and signs[2] == {-1.0, 1.0}  # either direction for either swipe
    assert CONFUSED["gesture"] == {"rgb": (4, 5), "depth": (0, 2)}


def test_emotion_faces_differ_by_class_except_the_confused_pair():
    """Mean final frames of 8 faces per class: happy's mouth region differs from sad's, fearful and
    surprised are drawn from one expression (same seed -> same pixels)."""
    def last_frame(emotion, seed):
        return render_face(np.random.default_rng(seed), FACES[emotion], noise=0.0)[-1].astype(float)

    assert np.array_equal(last_frame("fearful", 3), last_frame("surprised", 3))
    assert not np.array_equal(last_frame("happy", 3), last_frame("sad", 3))


def _median_pitch(samples: np.ndarray, rate: int = 16000) -> float:
    """Median over 50 ms frames of the autocorrelation peak's frequency in 60-400 Hz."""
    estimates = []
    for start in range(0, len(samples) - 800, 800):
        frame = samples[start:start + 800].astype(float)
        frame -= frame.mean()
        corr = np.correlate(frame, frame, mode="full")[len(frame) - 1:]
        lag = np.argmax(corr[rate // 400:rate // 60]) + rate // 400
        estimates.append(rate / lag)
    return float(np.median(estimates))


def test_sentiment_voice_pitch_follows_the_signed_score():
    """The voice carries the sign, not only |score|: for each of 6 speakers (a seed fixes the speaker), +3 is
    pitched about an octave above -3 (an arousal-only voice pitches them alike), and 0 lies between."""
    pitch = {score: np.array([_median_pitch(_sentiment_voice(np.random.default_rng(seed), score))
                              for seed in range(6)]) for score in (-3.0, 0.0, 3.0)}
    assert np.all(pitch[3.0] > 1.4 * pitch[-3.0])
    assert np.median(pitch[-3.0]) < np.median(pitch[0.0]) < np.median(pitch[3.0])


def test_sentiment_face_bends_the_mouth_more_than_emotions_face():
    """Same seed and face, smile minus frown: sentiment's bend moves more pixels than emotion's default,
    and the default draws emotion's faces unchanged (same pixels as without the argument)."""
    def last_frame(curve, **kwargs):
        face = FaceExpression(curve, 0.3, 0.0, 0.5)
        return render_face(np.random.default_rng(4), face, noise=0.0, **kwargs)[-1].astype(float)

    change = {bend: np.abs(last_frame(1.0, mouth_bend=bend) - last_frame(-1.0, mouth_bend=bend)).sum()
              for bend in (2.5, SENTIMENT_MOUTH_BEND)}
    assert change[SENTIMENT_MOUTH_BEND] > 1.5 * change[2.5] > 0
    assert np.array_equal(last_frame(1.0), last_frame(1.0, mouth_bend=2.5, latest_onset=0.5))


def test_sentiment_text_grades_strength_and_negates():
    words = {score: render_sentiment_text(np.random.default_rng(1), score).split() for score in (3.0, -2.0, 0.2)}
    assert set(words[3.0]) & {"great", "excellent", "wonderful"}
    assert set(words[-2.0]) & {"bad", "poor", "annoying"}
    assert not set(words[0.2]) & {"okay", "good", "great", "meh", "bad", "terrible", "not"}
    negated = [render_sentiment_text(np.random.default_rng(seed), 1.0).split() for seed in range(30)]
    assert any("not" in text and set(text) & {"bad", "poor", "annoying"} for text in negated)
    assert all("not" in text or set(text) & {"okay", "fine", "decent"} for text in negated)


def test_cli_writes_a_task_and_a_bad_task_lists_the_valid_names(tmp_path):
    runner = CliRunner()
    result = runner.invoke(shards_group, ["synth", "--task", "gesturez", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert "demo, gesture, emotion, sentiment" in result.output
    result = runner.invoke(shards_group, ["synth", "--task", "emotion", "--classes", "4", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--classes" in result.output
    result = runner.invoke(shards_group, ["synth", "--task", "emotion", "--count", "3", "--workers", "1",
                                          "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert len(_records(tmp_path / "e" / "manifest.jsonl")) == 3


def test_family_signals_carry_the_class_in_hue_and_direction_and_visibility_follows_strength(tmp_path):
    from shards.synth_family import HUES, FamilyMember, render_family_video

    classes, size = 12, 32
    for shown in (1, 10):  # class 10 of 12: direction 10 % 8 = 2 (up), hue 10 // 8 = 1 (green)
        clear = render_family_video(np.random.default_rng(7), shown, classes, size, 1.0).astype(float)
        hidden = render_family_video(np.random.default_rng(7), shown, classes, size, 0.0).astype(float)
        signal = np.clip(clear - hidden, 0, None)  # the class blob alone (noise and distractor cancel)
        colour = signal.sum(axis=(0, 1, 2))
        assert np.allclose(colour / colour.max(), HUES[shown // 8], atol=0.15)
        energy = signal.sum(axis=3)
        ys, xs = np.indices(energy.shape[1:])
        path = [((xs * e).sum() / e.sum(), (ys * e).sum() / e.sum()) for e in energy]
        (x0, y0), (x1, y1) = path[0], path[-1]
        angle = np.arctan2(-(y1 - y0), x1 - x0) % (2 * np.pi)  # rows grow downwards
        assert abs(angle - 2 * np.pi * (shown % 8) / 8) < 0.3
    manifest = write_task_corpus("family", tmp_path / "f", n=40, seed=2, workers=1, progress=False,
                                 family={"classes": classes, "size": 20, "strength": {"rgb": 1.0, "audio": 0.25}})
    seen = [json.loads(line) for line in (manifest.parent / "shown.jsonl").read_text().splitlines()]
    assert all(0.6 <= s["rgb"] <= 1.0 for s in seen)
    assert 2 <= sum(s["audio"] >= 0.6 for s in seen) <= 20  # about a quarter clear
    record = _records(manifest)[0]
    with av.open(str(manifest.parent / record["rgb"])) as container:
        assert next(container.decode(video=0)).to_ndarray(format="rgb24").shape == (20, 20, 3)
    with pytest.raises(ValueError, match="family strength.audio"):
        FamilyMember(classes=4, strength={"audio": 1.5})

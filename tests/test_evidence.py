"""Accuracy by visibility band (ops/evidence.py): which errors a student could still fix."""
import json

from ops.evaluate import write_predictions
from ops.evidence import BANDS, accuracy_by_band, band_table, read_visibility


def _run(path, rows):
    path.mkdir()
    write_predictions(path / "predictions-test.jsonl",
                      {k: {"key": k, "label": label, "outputs": {"audio": out}} for k, label, out in rows})
    return path


def test_accuracy_is_pooled_over_seeds_per_band_of_the_modality_visibility(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shown = {"a": 0.05, "b": 0.05, "c": 0.25, "d": 0.9}
    (corpus / "shown.jsonl").write_text("".join(json.dumps({"key": k, "rgb": 1.0, "audio": v}) + "\n"
                                                for k, v in shown.items()))
    visibility = read_visibility(corpus)
    right, wrong = [0.0, 5.0], [5.0, 0.0]  # argmax 1 / argmax 0; every label is 1
    seed0 = _run(tmp_path / "s0", [("a", 1, wrong), ("b", 1, right), ("c", 1, right), ("d", 1, right)])
    seed1 = _run(tmp_path / "s1", [("a", 1, wrong), ("b", 1, wrong), ("c", 1, wrong), ("d", 1, right)])
    counts = accuracy_by_band([seed0, seed1], ["audio"], "audio", visibility)["audio"]
    assert len(counts) == len(BANDS)
    assert counts[0] == (1, 4) and counts[2] == (1, 2) and counts[-1] == (2, 2) and counts[1] == (0, 0)
    table = band_table({"audio": {"alone": counts}})
    assert table[-1].startswith("| audio | alone | 25.0 (4) |  | 50.0 (2) |") and table[-1].endswith("100.0 (2) |")


def test_a_corpus_without_visibility_gives_none(tmp_path):
    assert read_visibility(tmp_path) is None

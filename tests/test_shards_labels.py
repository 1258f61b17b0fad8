"""shards/: label types (class ids, class names, regression, multi-label) and CSV manifests."""
import json

import pytest
import webdataset as wds

from shards.build import build_shards
from shards.manifest import ManifestError, read_manifest


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _labels(manifest):
    return [sample.label for sample in manifest.samples]


def test_class_names_map_to_ids_in_sorted_name_order(tmp_path):
    manifest = read_manifest(_jsonl(tmp_path / "m.jsonl", [
        {"key": "a", "split": "train", "label": "sad", "text": "x"},
        {"key": "b", "split": "train", "label": "angry", "text": "y"},
        {"key": "c", "split": "val", "label": "sad", "text": "z"}]))
    assert manifest.label == {"type": "class", "num_classes": 2, "names": ["angry", "sad"]}
    assert _labels(manifest) == [1, 0, 1]


def test_integer_classes_count_up_to_the_largest_id(tmp_path):
    manifest = read_manifest(_jsonl(tmp_path / "m.jsonl", [
        {"key": "a", "split": "train", "label": 4, "text": "x"}, {"key": "b", "split": "train", "label": 0, "text": "y"}]))
    assert manifest.label == {"type": "class", "num_classes": 5, "names": None} and _labels(manifest) == [4, 0]


def test_declared_classes_fix_the_count_and_the_ids_whatever_labels_a_subset_holds(tmp_path):
    counted = read_manifest(_jsonl(tmp_path / "c.jsonl", [
        {"classes": 83}, {"key": "a", "split": "train", "label": 4, "text": "x"}]))
    assert counted.label == {"type": "class", "num_classes": 83, "names": None} and _labels(counted) == [4]
    named = read_manifest(_jsonl(tmp_path / "n.jsonl", [
        {"classes": ["neutral", "calm", "happy"]}, {"key": "a", "split": "train", "label": "happy", "text": "x"},
        {"key": "b", "split": "val", "label": "neutral", "text": "y"}]))
    assert named.label == {"type": "class", "num_classes": 3, "names": ["neutral", "calm", "happy"]}
    assert _labels(named) == [2, 0] and named.samples[0].line == 2
    multi = read_manifest(_jsonl(tmp_path / "m.jsonl", [
        {"classes": ["a", "b", "c"]}, {"key": "a", "split": "train", "label": [0, 1], "text": "x"}]))
    assert multi.label == {"type": "multilabel", "num_classes": 3, "names": ["a", "b", "c"]}


@pytest.mark.parametrize("classes,label,message", [
    (5, 5, "line 2: label 5 is invalid; class ids are integers >= 0 below the 5 declared classes"),
    (["sad", "happy"], "angry", "line 2: label 'angry' is not one of the declared classes \\(sad, happy\\)"),
    (2, "happy", "declares 2 classes by number, but its labels are class names"),
    (3, 0.5, "declares classes, but its labels are regression targets"),
    (0, 1, "line 1: classes 0 is invalid"),
    (["a", "a"], "a", "line 1: classes \\['a', 'a'\\] is invalid; declare the number of classes"),
])
def test_labels_outside_the_declared_classes_name_the_line(tmp_path, classes, label, message):
    path = _jsonl(tmp_path / "m.jsonl", [{"classes": classes}, {"key": "a", "split": "train", "label": label, "text": "x"}])
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_floats_are_regression_and_ints_among_them_are_an_error_unless_the_type_is_given(tmp_path):
    floats = read_manifest(_jsonl(tmp_path / "f.jsonl", [
        {"key": "a", "split": "train", "label": -2.5, "text": "x"}, {"key": "b", "split": "train", "label": 3.0, "text": "y"}]))
    assert floats.label == {"type": "regression", "dim": 1} and _labels(floats) == [-2.5, 3.0]
    mixed = _jsonl(tmp_path / "m.jsonl", [{"key": f"k{i}", "split": "train", "label": i % 3, "text": "x"}
                                          for i in range(5)] + [{"key": "z", "split": "train", "label": 0.5, "text": "y"}])
    with pytest.raises(ManifestError, match="line 6: label 0.5 is a number with a fraction, but line 1 has the "
                                            "integer label 0.*--label-type regression"):
        read_manifest(mixed)
    forced = read_manifest(mixed, label_type="regression")
    assert forced.label == {"type": "regression", "dim": 1} and _labels(forced)[-2:] == [1.0, 0.5]


def test_a_class_id_far_beyond_the_samples_is_an_error_naming_its_line(tmp_path):
    records = [{"key": f"k{i}", "split": "train", "label": i % 4, "text": "x"} for i in range(20)]
    records[7]["label"] = 100000
    with pytest.raises(ManifestError, match="line 8: class id 100000 makes 100001 classes for 20 samples"):
        read_manifest(_jsonl(tmp_path / "m.jsonl", records))
    records[7]["label"] = 999  # sparse, but within what a small sample of a large label set leaves
    assert read_manifest(_jsonl(tmp_path / "m.jsonl", records)).label["num_classes"] == 1000
    from shards.label_rules import check_class_count
    from shards.manifest import ManifestSample
    with pytest.raises(ManifestError, match="line 3: class id 5 is beyond the 4 declared classes"):
        check_class_count([ManifestSample(key="a", split="train", label=5, line=3)], 6, multilabel=False, declared=4)


def test_vectors_are_regression_and_id_lists_multilabel(tmp_path):
    vectors = read_manifest(_jsonl(tmp_path / "v.jsonl", [
        {"key": "a", "split": "train", "label": [0.1, 0.2], "text": "x"},
        {"key": "b", "split": "train", "label": [1, 0.5], "text": "y"}]))
    assert vectors.label == {"type": "regression", "dim": 2} and _labels(vectors) == [[0.1, 0.2], [1.0, 0.5]]
    multi = read_manifest(_jsonl(tmp_path / "m.jsonl", [
        {"key": "a", "split": "train", "label": [3, 1, 3], "text": "x"},
        {"key": "b", "split": "train", "label": [], "text": "y"}]))
    assert multi.label == {"type": "multilabel", "num_classes": 4, "names": None} and _labels(multi) == [[1, 3], []]
    named = read_manifest(_jsonl(tmp_path / "n.jsonl", [
        {"key": "a", "split": "train", "label": ["dog", "cat"], "text": "x"}]))
    assert named.label["names"] == ["cat", "dog"] and _labels(named) == [[0, 1]]
    forced = read_manifest(_jsonl(tmp_path / "f.jsonl", [{"key": "a", "split": "train", "label": [1, 2], "text": "x"}]),
                           label_type="regression")
    assert forced.label == {"type": "regression", "dim": 2} and _labels(forced) == [[1.0, 2.0]]


@pytest.mark.parametrize("first,bad,message", [
    (0, "happy", "label 'happy' is invalid: it is a class name, but line 1 made the labels class with an integer class id"),
    ("happy", 2, "label 2 is invalid: it is an integer class id, but line 1 made the labels class with a class name"),
    (1.5, [1.0, 2.0], "it is a list of numbers, but line 1 made the labels regression with a number"),
    ([0.5, 1.5], [0.5], "has 1 value\\(s\\), but line 1 made regression targets of dimension 2"),
    ([1, 2], 3, "label 3 is invalid: it is an integer class id, but line 1 made the labels multilabel"),
    (0, {"a": 1}, "label \\{'a': 1\\} is invalid"),
    (0, None, "label None is invalid"),
    ([1, 2], [1, "x"], "a list label holds only class ids, only class names or only numbers"),
    (0.5, float("nan"), "is not finite"),
])
def test_wrong_type_labels_name_the_line(tmp_path, first, bad, message):
    path = _jsonl(tmp_path / "m.jsonl", [{"key": "a", "split": "train", "label": first, "text": "x"},
                                         {"key": "b", "split": "train", "label": bad, "text": "y"}])
    with pytest.raises(ManifestError, match=f"line 2: .*{message}"):
        read_manifest(path)


def test_forced_label_type_rejects_other_forms(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"key": "a", "split": "train", "label": 1.5, "text": "x"}])
    with pytest.raises(ManifestError, match="line 1: label 1.5 is invalid for label type 'class'"):
        read_manifest(path, label_type="class")


def test_csv_manifest_reads_like_jsonl_with_empty_cells_as_missing(tmp_path):
    (tmp_path / "note.txt").write_text("from a file")
    csv_path = tmp_path / "m.csv"
    csv_path.write_text('key,split,label,text,note\n'
                        'a,train,happy,"hello, world",note.txt\n'
                        '\n'
                        'b,val,sad,,note.txt\n')
    manifest = read_manifest(csv_path)
    first, second = manifest.samples
    assert (first.line, second.line) == (2, 4)
    assert first.values == {"text": "hello, world", "note": tmp_path / "note.txt"}
    assert set(second.values) == {"note"} and manifest.label["names"] == ["happy", "sad"]


@pytest.mark.parametrize("cell,label", [("3", 3), ("0.25", 0.25), ("[1, 2]", [1, 2])])
def test_csv_label_cells_are_numbers_or_lists_when_they_parse(tmp_path, cell, label):
    (tmp_path / "m.csv").write_text(f'key,split,label,text\na,train,"{cell}",x\n')
    assert read_manifest(tmp_path / "m.csv").samples[0].label == label


def test_csv_rows_with_the_wrong_number_of_cells_name_the_line(tmp_path):
    (tmp_path / "m.csv").write_text("key,split,label,text\na,train,0,x\nb,train,1,x,extra\n")
    with pytest.raises(ManifestError, match="line 3: 5 cells but the header .* has 4"):
        read_manifest(tmp_path / "m.csv")


def test_label_spec_and_sample_labels_reach_the_shards(tmp_path):
    manifest = _jsonl(tmp_path / "m.jsonl", [
        {"key": "a", "split": "train", "label": [0.5, -1.0], "text": "x"},
        {"key": "b", "split": "train", "label": [2, 3], "text": "y"}])
    out = tmp_path / "out"
    dataset = build_shards(manifest, out=out, workers=1, progress=False)
    assert dataset["label"] == {"type": "regression", "dim": 2}
    samples = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)}
    assert samples["a"]["label"] == [0.5, -1.0] and samples["b"]["label"] == [2.0, 3.0]
    assert json.loads((out / "dataset.json").read_text())["label"] == dataset["label"]

"""Shipping unimodal models: export parity in every format, predict's preprocessing against the loader's
batches, the CLI, presets with teacher-only modalities (one short training run on the tiny corpus)."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from model.cotrain import TEACHER, CoTrainModel, ModalitySpec
from model.export import ExportedModel, export_model, unimodal_model
from model.presets import PRESETS, merge, modality_specs, preset
from ops.cli import main
from pipeline.dali_loader import DaliLoader, LoaderConfig
from pipeline.dataset import load_dataset_info

FORMATS = ["torchscript", "onnx", "state_dict"]


@pytest.fixture(scope="module")
def trained_run(tiny_shards, tmp_path_factory):
    """One epoch of co-training with the emotion preset, a cross-check that --students leaves text teacher-only."""
    run = tmp_path_factory.mktemp("run") / "emotion"
    config = tmp_path_factory.mktemp("cfg") / "small.json"
    config.write_text(json.dumps({"encoders": {"video": {"frame_widths": [8, 8], "temporal_widths": [8, 8, 8, 8],
                                                         "shared_stages": 3},
                                               "audio": {"widths": [8, 8, 16, 8]}},
                                  "fusion": {"dim": 16, "heads": 2}, "epochs": 3}))
    result = CliRunner().invoke(main, ["train", "--shards", str(tiny_shards), "--out", str(run), "--preset",
                                       "emotion", "--config", str(config), "--epochs", "1", "--batch-size", "4",
                                       "--metrics-port", "0", "--students", "rgb,audio"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return run


def test_preset_config_file_and_command_line_layer_in_order(trained_run):
    saved = json.loads((trained_run / "config.json").read_text())
    assert saved["epochs"] == 1  # command line beats the config file's 3
    assert saved["encoders"]["video"]["name"] == "frames2d"  # from the preset
    assert saved["encoders"]["video"]["frame_widths"] == [8, 8]  # the config file beats the preset
    assert saved["encoders"]["video"]["shared_stages"] == 3
    assert saved["fusion"]["cross_layers"] == 1 and saved["fusion"]["dim"] == 16
    assert saved["students"] == ["rgb", "audio"]
    payload = torch.load(trained_run / "model.pt", weights_only=False)
    assert {s["name"]: s["encoder_name"] for s in payload["specs"]} == {"rgb": "frames2d", "audio": "cnn1d4",
                                                                       "text": None}
    assert not any(k.startswith("students.text") for k in payload["state_dict"])
    assert any(k.startswith("teacher.rests.text") for k in payload["state_dict"])
    # eval rebuilds the run's model (students, encoders, task) from model.pt alone
    result = CliRunner().invoke(main, ["eval", "--run", str(trained_run), "--split", "test", "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    scores, _ = json.JSONDecoder().raw_decode(result.output[result.output.index("{"):])  # a warning may follow
    assert set(scores["branches"]) == {"rgb", "audio", TEACHER}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("modality", ["rgb", "audio"])
def test_export_parity_with_the_branch_inside_the_full_model(trained_run, tiny_shards, tmp_path, fmt, modality):
    out = tmp_path / f"{modality}.{fmt}"
    result = CliRunner().invoke(main, ["export", "--run", str(trained_run), "--modality", modality, "--format", fmt,
                                       "-o", str(out), "--which", "last"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    payload = torch.load(trained_run / "model.pt", weights_only=False)
    from model.export import model_from_payload

    full = model_from_payload(payload)
    full.load_state_dict(payload["state_dict"])
    full.eval()
    loader = DaliLoader(load_dataset_info(tiny_shards), "test", LoaderConfig(batch_size=4), training=False)
    batch = next(iter(loader))
    with torch.no_grad():
        expected = full(batch.inputs, batch.present)[modality]
    exported = ExportedModel(out)
    assert exported.meta["modality"] == modality and exported.meta["spec"]["kind"] in ("video", "audio")
    got = exported(batch.inputs[modality])
    # float32 summed in another order: ONNX Runtime's convolutions differed from torch's by up to 1.9e-5 on
    # logits near 1 (rgb, after the teacher's stream heads changed the trained weights); torch formats stay exact
    tolerance = 5e-5 if fmt == "onnx" else 1e-5
    assert torch.allclose(got, expected, atol=tolerance), (got - expected).abs().max()


def test_export_refuses_teacher_only_modalities_and_unknown_formats(trained_run, tmp_path):
    result = CliRunner().invoke(main, ["export", "--run", str(trained_run), "--modality", "text", "-o",
                                       str(tmp_path / "t.pt")])
    assert result.exit_code != 0 and "no unimodal branch" in result.output and "rgb, audio" in result.output
    model = CoTrainModel([ModalitySpec("a", "audio", {"in_channels": 4, "widths": (4, 4, 4)})], 2, mode="unimodal")
    with pytest.raises(ValueError, match="valid formats: torchscript, onnx, state_dict"):
        export_model(unimodal_model(model, "a"), {}, "pickle", tmp_path / "x")


@pytest.mark.parametrize("modality", ["rgb", "audio"])
def test_predict_preprocessing_matches_the_loader(trained_run, tiny_shards, synthetic_manifest, tmp_path, modality):
    """The raw file, converted as the shards were and decoded by the loader's operators, gives the same input."""
    from ops.predict import preprocess

    out = tmp_path / f"{modality}.pt"
    CliRunner().invoke(main, ["export", "--run", str(trained_run), "--modality", modality, "--format", "state_dict",
                              "-o", str(out)])
    meta = ExportedModel(out).meta
    records = {r["key"]: r for r in map(json.loads, synthetic_manifest.read_text().splitlines())}
    loader = DaliLoader(load_dataset_info(tiny_shards), "test", LoaderConfig(batch_size=4), training=False,
                        modalities=[modality])
    batch = next(iter(loader))
    key = batch.keys[0]
    source = synthetic_manifest.parent / records[key][modality]
    (x,) = preprocess(meta, str(source))
    assert x.shape == batch.inputs[modality][:1].shape
    assert torch.allclose(x, batch.inputs[modality][:1], atol=1e-4), (x - batch.inputs[modality][:1]).abs().max()


def test_predict_cli_prints_class_probabilities(trained_run, synthetic_manifest, tmp_path):
    out = tmp_path / "audio.onnx"
    CliRunner().invoke(main, ["export", "--run", str(trained_run), "--modality", "audio", "--format", "onnx",
                              "-o", str(out)])
    records = [json.loads(line) for line in synthetic_manifest.read_text().splitlines()][:2]
    files = [str(synthetic_manifest.parent / r["audio"]) for r in records]
    result = CliRunner().invoke(main, ["predict", str(out), *files, "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    answers = json.loads(result.output)
    assert [a["input"] for a in answers] == files
    for a in answers:
        assert sum(a["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert a["prediction"] in a["probabilities"]


def test_predict_reports_each_bad_input_and_still_predicts_the_others(trained_run, synthetic_manifest, tmp_path):
    out = tmp_path / "audio.onnx"
    CliRunner().invoke(main, ["export", "--run", str(trained_run), "--modality", "audio", "--format", "onnx",
                              "--out", str(out)])
    record = json.loads(synthetic_manifest.read_text().splitlines()[0])
    good = str(synthetic_manifest.parent / record["audio"])
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "cut.wav").write_bytes(Path(good).read_bytes()[:30])
    (tmp_path / "words.txt").write_text("not audio at all")
    bad = [str(tmp_path / n) for n in ("missing.wav", "empty.wav", "cut.wav", "words.txt")]
    result = CliRunner().invoke(main, ["predict", str(out), bad[0], good, *bad[1:], "--json"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    answers = {a["input"]: a for a in json.loads(result.output)}
    assert answers[good]["prediction"] in answers[good]["probabilities"]
    assert all(answers[b]["error"] and "\n" not in answers[b]["error"] for b in bad)
    assert "not found" in answers[bad[0]]["error"]
    lines = CliRunner().invoke(main, ["predict", str(out), good, bad[0], "--text", "hello"])
    assert lines.exit_code == 1 and len(lines.output.strip().splitlines()) == 3
    assert "this model reads audio" in lines.output and f"{bad[0]}: error: " in lines.output


def _random_weights(encoders: dict) -> dict:
    """A preset's encoders with random weights of the same architecture (nothing is downloaded here)."""
    return {kind: {k: v for k, v in choice.items() if k != "weights"} for kind, choice in encoders.items()}


def test_presets_are_complete_and_specs_follow_kind_then_name():
    with pytest.raises(ValueError, match="valid presets: emotion, gesture, sentiment"):
        preset("speech")
    assert set(PRESETS) == {"gesture", "emotion", "sentiment"}
    clip = {"frames": 4, "height": 112, "width": 112}
    modalities = {"rgb": {"kind": "video", **clip}, "depth": {"kind": "depth", **clip},
                  "face": {"kind": "features", "dim": 12}}
    encoders = merge(_random_weights(preset("gesture")["encoders"]),
                     {"depth": {"share_until": None, "shared_stages": 1}, "features": {"name": "tcn"}})
    specs = {s.name: s for s in modality_specs(modalities, {"rgb": {"in_channels": 3}, "depth": {"in_channels": 1}},
                                               shared_stages=1, encoders=encoders)}
    assert specs["rgb"].encoder_name == "r3d_18" and specs["rgb"].shared_stages == 3  # share_until: layer2
    assert specs["depth"].shared_stages == 1 and specs["depth"].encoder["in_channels"] == 1
    assert specs["face"].encoder == {"in_channels": 12} and specs["face"].encoder_name == "tcn"
    for name in PRESETS:  # every preset builds a model for the kinds it names (pretrained ones: random weights)
        enc = _random_weights(preset(name)["encoders"])
        mods = {k: {"kind": k, "dim": 8, **clip} for k in enc}
        shapes = {"video": {"in_channels": 3}, "depth": {"in_channels": 1}, "audio": {"in_channels": 10},
                  "text": {"vocab_size": 30}}
        model = CoTrainModel(modality_specs(mods, shapes, shared_stages=1, encoders=enc), 3)
        assert TEACHER in model.branches


SEQ_SPECS = {
    "text": ModalitySpec("words", "text", {"vocab_size": 40, "dim": 16, "layers": 2, "heads": 2, "max_len": 16}, 1,
                         "transformer"),
    "features": ModalitySpec("face", "features", {"in_channels": 5, "dim": 16, "layers": 2, "heads": 2}, 1,
                             "transformer", pool="attention"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["text", "features"])
def test_sequence_exports_keep_padding_masks(tmp_path, fmt, kind):
    torch.manual_seed(0)
    spec = SEQ_SPECS[kind]
    model = CoTrainModel([spec], 3, mode="unimodal").eval()
    source = {"max_tokens": 8} if kind == "text" else {"max_frames": 6, "dim": 5}
    meta = {"spec": vars(spec), "num_classes": 3, "task": "class", "source": source, "loader": {},
            "modality": spec.name}
    path = export_model(unimodal_model(model, spec.name), meta, fmt, tmp_path / f"m.{fmt}")
    exported = ExportedModel(path)
    if kind == "text":
        x = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0], [9, 3, 2, 8, 4, 1, 0, 0]], dtype=torch.int32)
        args, lengths = (x,), None
    else:
        lengths = torch.tensor([6, 2])
        x = torch.randn(2, 6, 5) * (torch.arange(6)[None] < lengths[:, None])[..., None]
        args = (x, lengths)
    expected = model({spec.name: x}, {spec.name: torch.ones(2, dtype=torch.bool)},
                     {spec.name: lengths} if lengths is not None else None)[spec.name]
    assert torch.allclose(exported(*args), expected, atol=1e-5)


def test_text_predict_uses_the_shards_tokenizer(tiny_shards, synthetic_manifest):
    from ops.predict import preprocess

    info = load_dataset_info(tiny_shards)
    spec = info.modalities["text"]
    meta = {"spec": {"kind": "text"}, "source": spec, "tokenizer": (tiny_shards / "tokenizer.json").read_text()}
    loader = DaliLoader(info, "test", LoaderConfig(batch_size=4), training=False, modalities=["text"])
    batch = next(iter(loader))
    record = next(r for r in map(json.loads, synthetic_manifest.read_text().splitlines()) if r["key"] == batch.keys[0])
    (ids,) = preprocess(meta, record["text"], literal=True)
    assert torch.equal(ids[0].long(), batch.inputs["text"][0].long())
    with pytest.raises(FileNotFoundError, match="nope.txt not found: give a text file; give literal text with --text"):
        preprocess(meta, "nope.txt")  # a missing file is never read as the text "nope.txt"


def test_training_with_feature_and_attention_transfer_under_deepspeed(tiny_shards, tmp_path):
    """The engine passes extras=True through; every transfer term shows up in the run's history."""
    config = tmp_path / "attn.json"
    config.write_text(json.dumps({"encoders": {"text": {"name": "transformer", "dim": 16, "layers": 2, "heads": 2},
                                               "audio": {"pool": "attention"}},
                                  "fusion": {"dim": 16, "heads": 2}}))
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--shards", str(tiny_shards), "--out", str(run), "--config",
                                       str(config), "--epochs", "1", "--batch-size", "4", "--metrics-port", "0",
                                       "--modalities", "audio,text", "--feature-weight", "0.5", "--attention-weight",
                                       "0.5", "--transfer-start", "0", "--transfer-warmup", "0",
                                       "--transfer-gate", "none"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    train_terms = json.loads((run / "history.json").read_text())[0]["train"]
    for m in ("audio", "text"):
        for term in ("transfer", "feature_transfer", "attention_transfer"):
            assert train_terms[f"{m}_{term}_loss"] > 0, (m, term, train_terms)


def test_loading_a_file_that_is_not_an_export_says_so(tmp_path):
    for name, content in [("junk.bin", b"not a model at all"), ("weights.pt", None)]:
        path = tmp_path / name
        if content is None:
            torch.save({"w": torch.zeros(2)}, path)
        else:
            path.write_bytes(content)
        with pytest.raises(ValueError, match="not a model written by `cotrain export`"):
            ExportedModel(path)


def test_config_files_with_unknown_fields_are_refused(tiny_shards, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fusion": {"dimm": 8}}))
    result = CliRunner().invoke(main, ["train", "--shards", str(tiny_shards), "--out", str(tmp_path / "r"),
                                       "--config", str(bad)])
    assert result.exit_code != 0 and "unknown config key(s) fusion.dimm" in result.output
    result = CliRunner().invoke(main, ["train", "--shards", str(tiny_shards), "--out", str(tmp_path / "r"),
                                       "--preset", "nope"])
    assert result.exit_code != 0 and ("is not one of 'emotion', 'emotion-wav2vec2', 'gesture', 'quick', 'sentiment', "
                                      "'sentiment-bert'") in result.output

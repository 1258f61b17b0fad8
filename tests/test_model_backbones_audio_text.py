"""model/backbones_audio_text.py: wav2vec2, HuBERT, BERT (transformers, random weights at tiny sizes) and the
log-mel 2D CNN build, train, split, reload, export and expose attention; the shards store a model's token ids."""
import json

import pytest
import torch

from model.cotrain import CoTrainModel, FusionConfig, ModalitySpec
from model.encoders import build_encoder
from model.export import ExportedModel, export_model, unimodal_model

transformers = pytest.importorskip("transformers")

SPEECH = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
          "conv_dim": [8, 8], "conv_stride": [5, 2], "conv_kernel": [10, 3], "num_conv_pos_embeddings": 8,
          "num_conv_pos_embedding_groups": 2}
BERT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 16}
SAMPLES, MELS, VOCAB = 400, 10, 30

# Tiny configurations, one per encoder this module registers (test_model_encoders checks none is missing).
TINY = {
    ("audio", "wav2vec2"): {"in_channels": 1, "config": SPEECH},
    ("audio", "hubert"): {"in_channels": 1, "config": SPEECH},
    ("audio", "cnn2d"): {"in_channels": MELS, "stem_width": 4, "widths": [4, 8, 8, 8]},
    ("text", "bert"): {"vocab_size": VOCAB, "config": BERT},
}
STAGE_NAMES = {
    "wav2vec2": ["feature_extractor", "feature_projection", "encoder.layers.0", "encoder.layers.1"],
    "hubert": ["feature_extractor", "feature_projection", "encoder.layers.0", "encoder.layers.1"],
    "cnn2d": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "bert": ["embeddings", "encoder.layer.0", "encoder.layer.1"],
}


def _input(kind: str, name: str):
    g = torch.Generator().manual_seed(0)
    if kind == "text":
        ids = torch.randint(1, VOCAB, (2, 8), generator=g, dtype=torch.int32)
        ids[1, 5:] = 0
        return ids, ids != 0
    if name == "cnn2d":
        return torch.randn(2, MELS, 1 + SAMPLES // 160, generator=g), None
    return torch.randn(2, SAMPLES, generator=g) * 0.1, None


@pytest.mark.parametrize("kind,name", sorted(TINY))
def test_encoder_builds_trains_and_splits_at_every_named_stage(kind, name):
    torch.manual_seed(0)
    enc = build_encoder(kind, name, **TINY[(kind, name)])
    assert enc.stage_names == STAGE_NAMES[name] and len(enc.stage_names) == len(enc.stages)
    x, valid = _input(kind, name)
    out = enc(x, valid)
    assert out.shape[:2] == (2, enc.out_channels[-1]) and torch.isfinite(out).all()
    if kind == "text":
        assert out.shape[2] == x.shape[1] and (out[1, :, 5:] == 0).all()  # one token per id, padding zeroed
    out.square().mean().backward()
    without = [n for n, p in enc.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not without, f"no finite gradient for {without}"
    enc.eval()
    with torch.no_grad():
        whole = enc(x, valid)
        for split in range(len(enc.stages) + 1):  # shared stages + the rest == the whole encoder
            rest = enc.run(enc.run(x, 0, split, valid=valid), split, valid=valid)
            assert torch.allclose(rest, whole, atol=1e-5), f"split at {split} ({enc.stage_names[split - 1]})"


def _library_model(name: str):
    if name == "bert":
        return transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, **BERT), add_pooling_layer=False)
    family = {"wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
              "hubert": (transformers.HubertConfig, transformers.HubertModel)}[name]
    return family[1](family[0](**SPEECH))


@pytest.mark.parametrize("kind,name", [("audio", "wav2vec2"), ("audio", "hubert"), ("text", "bert")])
def test_weights_saved_by_the_library_load_and_the_stages_reproduce_its_model(kind, name, tmp_path):
    torch.manual_seed(1)
    reference = _library_model(name).eval()
    reference.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    options = {k: v for k, v in TINY[(kind, name)].items() if k != "config"}
    enc = build_encoder(kind, name, weights=str(tmp_path / "hf"), **options).eval()
    x, valid = _input(kind, name)
    with torch.no_grad():
        ours = enc(x, valid).transpose(1, 2)  # (B, L, D)
        if kind == "text":
            theirs = reference(input_ids=x.long(), attention_mask=valid.long()).last_hidden_state
            ours, theirs = ours[valid], theirs[valid]
        else:  # preprocessor_config.json says the weights take the waveform as it is
            theirs = reference(x).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)

    prefix = reference.base_model_prefix  # a state-dict file whose keys carry the model's prefix loads too
    torch.save({f"{prefix}.{k}": v for k, v in reference.state_dict().items()}, tmp_path / "w.pt")
    from_file = build_encoder(kind, name, weights=str(tmp_path / "w.pt"), normalize=False, **TINY[(kind, name)]) \
        if kind == "audio" else build_encoder(kind, name, weights=str(tmp_path / "w.pt"), **TINY[(kind, name)])
    with torch.no_grad():
        assert torch.allclose(from_file.eval()(x, valid), enc(x, valid), atol=1e-6)


def test_missing_or_foreign_weights_say_how_to_fetch_them(tmp_path):
    for weights in (str(tmp_path / "nowhere"), "cotrain-tests/no-such-model"):
        with pytest.raises(ValueError, match=r"hf download .* --local-dir .*encoders.<modality>.weights"):
            build_encoder("text", "bert", vocab_size=VOCAB, config=BERT, weights=weights)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        build_encoder("text", "bert", vocab_size=VOCAB, config=BERT, weights=str(tmp_path / "empty"))
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="lacks .* not a state dict of this architecture"):
        build_encoder("text", "bert", vocab_size=VOCAB, config=BERT, weights=str(tmp_path / "other.pt"))


def test_inputs_the_backbones_cannot_read_are_explained():
    with pytest.raises(ValueError, match="loader.audio_features: waveform"):
        build_encoder("audio", "wav2vec2", in_channels=40, config=SPEECH)
    with pytest.raises(ValueError, match="--sample-rate 16000"):
        build_encoder("audio", "hubert", in_channels=1, config=SPEECH, sample_rate=22050)
    with pytest.raises(ValueError, match="loader.audio_features: logmel"):
        build_encoder("audio", "cnn2d", in_channels=1)
    with pytest.raises(ValueError, match="vocabulary of 30522 tokens.*vocab_size\\) 30.*--tokenizer"):
        build_encoder("text", "bert", vocab_size=VOCAB, config="bert-base-uncased")
    with pytest.raises(ValueError, match="pads with id 0, the shards with 3"):
        build_encoder("text", "bert", vocab_size=VOCAB, config=BERT, special_ids={"pad": 3})
    with pytest.raises(ValueError, match="config 'bert-huge' is not known; give one of bert-base-uncased"):
        build_encoder("text", "bert", vocab_size=VOCAB, config="bert-huge")
    with pytest.raises(ValueError, match="hidden_sizes is not a field of BertConfig"):
        build_encoder("text", "bert", vocab_size=VOCAB, config={**BERT, "hidden_sizes": 8})


def _unimodal(kind: str, name: str, seed: int) -> CoTrainModel:
    spec = ModalitySpec("m", kind, dict(TINY[(kind, name)]), 1, name)
    return CoTrainModel([spec], 3, mode="unimodal", init_seed=seed).eval()


def _meta(kind: str, name: str, model: CoTrainModel) -> dict:
    spec = ModalitySpec("m", kind, dict(TINY[(kind, name)]), 1, name)
    source = {"max_tokens": 8} if kind == "text" else {"samples": SAMPLES, "sample_rate": 16000}
    loader = {"audio_features": "logmel" if name == "cnn2d" else "waveform", "hop_ms": 10, "n_mels": MELS}
    return {"spec": vars(spec), "num_classes": 3, "task": "class", "source": source, "loader": loader,
            "modality": "m"}


@pytest.mark.parametrize("kind,name", sorted(TINY))
def test_weights_reload_and_every_export_format_gives_the_same_outputs(kind, name, tmp_path):
    model = _unimodal(kind, name, seed=0)
    x, _ = _input(kind, name)
    present = {"m": torch.ones(2, dtype=torch.bool)}
    with torch.no_grad():
        expected = model({"m": x}, present)["m"]
    torch.save(model.state_dict(), tmp_path / "model.pt")
    reloaded = _unimodal(kind, name, seed=1)  # other initial weights, then the saved ones
    with torch.no_grad():
        assert not torch.allclose(reloaded({"m": x}, present)["m"], expected)
        reloaded.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
        assert torch.equal(reloaded({"m": x}, present)["m"], expected)
    for fmt in ("state_dict", "torchscript", "onnx"):
        path = export_model(unimodal_model(model, "m"), _meta(kind, name, model), fmt, tmp_path / f"m.{fmt}")
        assert torch.allclose(ExportedModel(path)(x), expected, atol=1e-4), fmt


@pytest.mark.parametrize("kind,name", [("audio", "wav2vec2"), ("text", "bert")])
def test_attention_level_transfer_reads_the_backbones_attention(kind, name):
    torch.manual_seed(0)
    other = ModalitySpec("o", "audio", {"in_channels": MELS, "widths": (8, 8, 8)}, 1, "cnn1d")
    spec = ModalitySpec("m", kind, dict(TINY[(kind, name)]), 1, name)
    model = CoTrainModel([spec, other], 3, mode="cotrain").eval()
    x, valid = _input(kind, name)
    inputs = {"m": x, "o": torch.randn(2, MELS, 12)}
    present = {m: torch.ones(2, dtype=torch.bool) for m in inputs}
    _, extras = model(inputs, present, extras=True)
    attention = extras["attention"]["m"]  # the student's last layer, mean over heads and valid queries
    assert attention.shape == extras["attention"]["multimodal/m"].shape  # (B, L) over the same tokens
    assert attention.shape[0] == 2 and (kind != "text" or attention.shape[1] == x.shape[1])
    assert torch.allclose(attention.sum(dim=1), torch.ones(2), atol=1e-5)
    if kind == "text":
        assert (attention[1, 5:] == 0).all()  # no attention on padding


# ---------------------------------------------------------------------------------------------
# Shards that store a text model's own token ids, and co-training with bert on them

CLASS_WORDS = ("red", "green", "blue")
FILLER = ("the", "a", "small", "large", "thing", "moves", "here", "there", "slowly")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _write_corpus(folder, n: int = 36):
    """Three classes: a class word among filler words, and a tone at the class's pitch (0.25 s, 16 kHz)."""
    import random
    import wave

    import numpy as np

    rng = random.Random(0)
    (folder / "audio").mkdir(parents=True)
    records = []
    for i in range(n):
        label = i % 3
        words = rng.sample(FILLER, 3) + [CLASS_WORDS[label]]
        rng.shuffle(words)
        t = np.arange(4000) / 16000
        tone = 0.3 * np.sin(2 * np.pi * 300 * (label + 1) * t) + 0.05 * np.random.default_rng(i).normal(size=t.size)
        with wave.open(str(folder / "audio" / f"s{i:03d}.wav"), "wb") as out:
            out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
            out.writeframes((tone * 32767).astype("<i2").tobytes())
        records.append({"key": f"s{i:03d}", "split": "val" if i % 12 >= 9 else "train", "label": label,
                        "audio": f"audio/s{i:03d}.wav", "text": " ".join(words)})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest, [r["text"] for r in records]


def _wordpiece_vocab(folder, texts):
    """A tiny BERT-style WordPiece vocabulary (vocab.txt), trained with the tokenizers library."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=80, special_tokens=SPECIALS,
                                                                   show_progress=False))
    folder.mkdir()
    tokenizer.model.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def bert_shards(tmp_path_factory):
    from shards.build import build_shards

    root = tmp_path_factory.mktemp("bert-corpus")
    manifest, texts = _write_corpus(root / "corpus")
    vocab = _wordpiece_vocab(root / "tiny-bert", [t for t in texts])
    build_shards(manifest, out=root / "shards", tokenizer=vocab, audio_seconds=0.25, max_tokens=8, workers=1,
                 progress=False)
    return root / "shards", vocab, texts


def test_shards_store_the_text_models_own_token_ids(bert_shards):
    import tarfile

    import numpy as np

    shards, vocab_dir, texts = bert_shards
    vocab = (vocab_dir / "vocab.txt").read_text().splitlines()
    text = json.loads((shards / "dataset.json").read_text())["modalities"]["text"]
    assert text["vocab_size"] == len(vocab) and text["tokenizer_name"] == "tiny-bert"
    assert text["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert text["tokenizer_source"] == str(vocab_dir)
    with tarfile.open(next(shards.glob("train-*.tar"))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    key = next(n for n in members if n.endswith(".text.ids")).split(".")[0]
    ids = np.frombuffer(members[f"{key}.text.ids"], "<i4")
    words = members[f"{key}.text.txt"].decode().split()
    assert ids.tolist() == [2, *(vocab.index(w) for w in words), 3] + [0] * (8 - len(words) - 2)


def test_a_tokenizer_whose_id_0_is_not_padding_is_refused(tmp_path):
    from shards.build import BuildError, build_shards

    manifest, _ = _write_corpus(tmp_path / "corpus", n=3)
    (tmp_path / "vocab.txt").write_text("\n".join(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "red"]) + "\n")
    with pytest.raises(BuildError, match="id 0 is '\\[UNK\\]', not a padding token"):
        build_shards(manifest, out=tmp_path / "out", tokenizer=tmp_path / "vocab.txt", workers=1, progress=False)
    with pytest.raises(BuildError, match="neither tokenizer.json nor vocab.txt"):
        build_shards(manifest, out=tmp_path / "out", tokenizer=tmp_path / "corpus", workers=1, progress=False)
    from click.testing import CliRunner

    from ops.cli import main

    result = CliRunner().invoke(main, ["shards", "build", str(manifest), "--out", str(tmp_path / "out"),
                                       "--tokenizer", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and "nowhere not found; give a tokenizer directory" in result.output


def _run_config(shards, out, text_config, epochs: int):
    from ops.config import MetricsConfig, RunConfig
    from pipeline.config import LoaderConfig

    return RunConfig(shards=str(shards), out=str(out), epochs=epochs, seed=0, metrics=MetricsConfig(port=0),
                     cpu_threads=1, loader=LoaderConfig(batch_size=6, audio_features="waveform"),
                     encoders={"text": {"name": "bert", "config": text_config, "shared_stages": 1},
                               "audio": {"name": "wav2vec2", "shared_stages": 2,  # 80 samples a token: 50 tokens
                                         "config": {**SPEECH, "conv_stride": [10, 8], "conv_kernel": [10, 8]}}},
                     fusion=FusionConfig(dim=16, heads=2, layers=1))


# The students' task losses in the last epoch (chance is ln 3 = 1.10) and best validation accuracies (chance 3/9).
LOSS_BELOW = {"text": 0.4, "audio": 0.3}  # measured 0.28 and 0.12
VAL_ACCURACY = {"text": 6 / 9, "audio": 8 / 9}  # measured 7/9 and 9/9


def test_cotraining_with_bert_text_and_wav2vec2_audio_learns(bert_shards, tmp_path):
    """16 epochs of co-training (bert on the shards' WordPiece ids, wav2vec2 on the loader's waveform) from random
    weights on the three-class corpus above (27 train, 9 val samples): about 25 s on one thread."""
    from ops.train import train

    shards, _, _ = bert_shards
    train(_run_config(shards, tmp_path / "run", BERT, epochs=16))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    for m in ("text", "audio"):
        assert history[0]["train"][f"{m}_task_loss"] > 1.0, m  # they start at chance
        assert history[-1]["train"][f"{m}_task_loss"] < LOSS_BELOW[m], m
        assert max(h["val"][m] for h in history) >= VAL_ACCURACY[m] - 1e-9, m
    _exported_branches_predict_on_raw_media(shards, tmp_path)


def _exported_branches_predict_on_raw_media(shards, tmp_path):
    """The wav2vec2 branch, exported, classifies the val split's raw WAV files through predict's preprocessing;
    the bert branch embeds the shards' WordPiece tokenizer."""
    from model.export import export_run
    from ops.predict import preprocess

    records = [json.loads(line) for line in (shards.parent / "corpus" / "manifest.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    audio = ExportedModel(export_run(tmp_path / "run", "audio", "onnx", tmp_path / "audio.onnx"))
    right = sum(int(audio(*preprocess(audio.meta, str(shards.parent / "corpus" / r["audio"])))[0].argmax())
                == r["label"] for r in val)
    assert right >= 8, f"{right} of {len(val)}"
    text = ExportedModel(export_run(tmp_path / "run", "text", "torchscript", tmp_path / "text.pt"))
    (ids,) = preprocess(text.meta, "Red things", literal=True)
    from tokenizers import Tokenizer

    red = Tokenizer.from_str(text.meta["tokenizer"]).token_to_id("red")
    assert ids.shape == (1, 8) and ids[0, :2].tolist() == [2, red] and ids[0].tolist().count(3) == 1  # [CLS] red ... [SEP]


def test_training_refuses_a_text_encoder_of_another_vocabulary(bert_shards, tmp_path):
    from ops.train import train

    shards, _, _ = bert_shards
    with pytest.raises(ValueError, match="vocabulary of 30522 tokens, the shards' tokenizer .* --tokenizer"):
        train(_run_config(shards, tmp_path / "run", "bert-base-uncased", epochs=1))


# ---------------------------------------------------------------------------------------------
# Presets with library backbones and named weights

LIBRARY_PRESET_DATA = {
    "emotion-wav2vec2": ({"video": {"kind": "video"}, "audio": {"kind": "audio", "sample_rate": 16000}},
                         {"video": {"frame_widths": [4, 8], "temporal_widths": [8, 8, 8, 8]},
                          "audio": {"config": {**SPEECH, "num_hidden_layers": 3}, "weights": None}}),
    "sentiment-bert": ({"features": {"kind": "features", "dim": 6, "max_frames": 5},
                        "text": {"kind": "text", "vocab_size": VOCAB, "special_ids": {"pad": 0, "cls": 2}}},
                       {"features": {"dim": 16, "heads": 2},
                        "text": {"config": {**BERT, "num_hidden_layers": 4}, "weights": None}}),
}


@pytest.mark.parametrize("name", sorted(LIBRARY_PRESET_DATA))
def test_library_presets_name_their_weights_and_build_at_tiny_sizes(name):
    from model.presets import merge, modality_specs
    from ops.presets import preset_layer
    from pipeline.config import LoaderConfig
    from pipeline.dali_loader import model_inputs

    layer = preset_layer(name)
    modalities, tiny = LIBRARY_PRESET_DATA[name]
    shapes = model_inputs(modalities, LoaderConfig(**layer.get("loader", {})))  # the preset's loader: the waveform
    with pytest.raises(ValueError, match=r"not in the local Hugging Face cache; .*hf download (facebook/wav2vec2-base|"
                                         r"bert-base-uncased) --local-dir"):
        modality_specs(modalities, shapes, shared_stages=1, encoders=layer["encoders"])[-1].build_encoder()
    torch.manual_seed(0)
    specs = modality_specs(modalities, shapes, shared_stages=1, encoders=merge(layer["encoders"], tiny))
    model = CoTrainModel(specs, 3, fusion=FusionConfig(dim=16, heads=2))
    x = {"video": torch.randn(2, 3, 4, 16, 16), "audio": torch.randn(2, SAMPLES),
         "features": torch.randn(2, 5, 6), "text": _input("text", "bert")[0]}
    inputs = {m: x[m] for m in modalities}
    logits, extras = model(inputs, {m: torch.ones(2, dtype=torch.bool) for m in inputs},
                           {"features": torch.tensor([5, 3])} if "features" in inputs else None, extras=True)
    assert set(model.students) == set(modalities) and all(torch.isfinite(v).all() for v in logits.values())
    library = next(m for m in modalities if m in ("audio", "text"))
    assert library in extras["attention"]  # the library backbone's student exposes its attention


def test_specs_give_each_encoder_only_the_data_arguments_it_takes():
    from model.presets import modality_specs
    from pipeline.config import LoaderConfig
    from pipeline.dali_loader import model_inputs

    modalities = {"face": {"kind": "features", "dim": 6, "max_frames": 9},
                  "words": {"kind": "text", "vocab_size": VOCAB, "special_ids": {"pad": 0}},
                  "voice": {"kind": "audio", "sample_rate": 16000}}
    encoders = {"text": {"name": "bert", "config": BERT}, "features": {"dim": 16, "heads": 2}}
    specs = modality_specs(modalities, model_inputs(modalities, LoaderConfig()), shared_stages=1, encoders=encoders)
    options = {s.name: s.encoder for s in specs}
    assert options["face"] == {"in_channels": 6, "dim": 16, "heads": 2}  # the loader's max_frames is not its option
    assert options["words"] == {"config": BERT, "vocab_size": VOCAB, "special_ids": {"pad": 0}}
    assert options["voice"] == {"in_channels": 40}  # cnn1d takes no sample rate; wav2vec2 would
    for spec in specs:
        spec.build_encoder()

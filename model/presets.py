"""Presets matching the paper's three settings, as plain data in RunConfig's shape, and the function that
turns a dataset's modalities plus per-modality encoder choices into ModalitySpecs.

A preset is the lowest layer of a run's configuration: `cotrain train --preset NAME [--config FILE] [options]`
applies the preset, then the config file, then the command-line options. Their sizes follow the paper's
architectures at a scale a single GPU trains in minutes; they were not tuned on the paper's corpora.

`encoders` maps a modality kind (or, taking precedence, a modality name) to
`{"name": registered encoder, "shared_stages": N or "share_until": stage name, "pool": "mean"|"max"|"attention",
"freeze", "lr_mult", "check_frame_size", **encoder options}` (docs/model.md).
"""
from __future__ import annotations

import copy
import inspect

from .backbones import BACKBONES, expected_frame_size, takes_input_size
from .cotrain import ModalitySpec
from .encoders import registered_builder

__all__ = ["PRESETS", "LIBRARY_PRESETS", "preset", "merge", "modality_specs"]

PRESETS: dict[str, dict] = {
    # NVGesture / EgoGesture-style: RGB and depth clips, both through torchvision's R3D-18 pretrained on
    # Kinetics-400 (the authors fine-tune a Kinetics-pretrained 3D ResNeXt); depth's first convolution averages the
    # RGB filters. Stem to layer2 are shared. The weights want 112x112 clips (shards built with --size 112x112);
    # the file must be in torch's hub cache (the error says where), or set encoders.<kind>.weights to a local file.
    "gesture": {
        "encoders": {
            "video": {"name": "r3d_18", "weights": "KINETICS400_V1", "share_until": "layer2"},
            "depth": {"name": "r3d_18", "weights": "KINETICS400_V1", "share_until": "layer2"},
        },
        "optim": {"lr": 1e-3, "pretrained_lr_mult": 0.1},
        "fusion": {"dim": 128, "layers": 2, "heads": 4},
        "transfer": {"alpha": 1.0, "temperature": 2.0},
    },
    # RAVDESS-style (the authors' earlier branches): per-frame 2D CNN then temporal 1-D convs for the face
    # video, four 1-D conv blocks for speech; fusion after the first two blocks of each branch.
    "emotion": {
        "encoders": {
            "video": {"name": "frames2d", "shared_stages": 4, "frame_widths": [32, 64, 128],
                      "temporal_widths": [64, 64, 128, 128]},
            "audio": {"name": "cnn1d4", "shared_stages": 2, "widths": [64, 128, 256, 128]},
        },
        "fusion": {"dim": 128, "layers": 2, "heads": 4, "cross_layers": 1},
        "task": {"label_smoothing": 0.1},
        "transfer": {"alpha": 1.0, "temperature": 2.0},
    },
    # CMU-MOSEI-style: audio and video feature sequences and the transcript, all through Transformers; the
    # students' self-attention lets attention-level transfer apply.
    "sentiment": {
        "encoders": {
            "features": {"name": "transformer", "shared_stages": 1, "dim": 64, "layers": 3, "heads": 4},
            "text": {"name": "transformer", "shared_stages": 1, "dim": 64, "layers": 3, "heads": 4},
            "audio": {"name": "cnn1d4", "shared_stages": 2},
            "video": {"name": "frames2d", "shared_stages": 4},
        },
        # learned late-fusion weights: on the synthetic sentiment corpus they put the teacher ahead of text on
        # validation (0.729 against 0.742 MAE with equal weights; docs/results-late-weights.md)
        "fusion": {"dim": 64, "layers": 2, "heads": 4, "late_fusion_weights": "learned"},
        "task": {"regression_loss": "l1", "ccc_weight": 0.5},
        "transfer": {"alpha": 1.0, "temperature": 2.0, "feature": 0.5, "attention": 0.5},
    },
}


def preset(name: str) -> dict:
    """A copy of the named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def merge(base: dict, override: dict) -> dict:
    """Deep merge: nested dicts are merged key by key, anything else in `override` replaces `base`."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else \
            copy.deepcopy(value)
    return out


def _with_encoders(base: str, encoders: dict, **sections) -> dict:
    """Preset `base` with some encoders replaced whole (not merged: a backbone takes none of the old one's
    options) and other sections merged in."""
    out = merge(PRESETS[base], sections)
    out["encoders"].update(copy.deepcopy(encoders))
    return out


LIBRARY_PRESETS: dict[str, dict] = {
    # The emotion and sentiment settings with backbones from transformers and their pretrained weights named
    # (model/backbones_audio_text.py). Weights are read from a local directory or the local Hugging Face cache,
    # never downloaded: fetch them once (`hf download NAME --local-dir DIR`) and point encoders.<kind>.weights at
    # DIR where the cache is not used. Their test builds them at tiny sizes with random weights.
    #
    # RAVDESS-style face video + voice: the emotion preset with wav2vec 2.0 base on the 16 kHz waveform (shards
    # built with --sample-rate 16000), its conv feature extractor, projection and first two Transformer layers shared.
    "emotion-wav2vec2": _with_encoders("emotion", {
        "audio": {"name": "wav2vec2", "shared_stages": 4, "config": "facebook/wav2vec2-base",
                  "weights": "facebook/wav2vec2-base"}}, loader={"audio_features": "waveform"}),
    # CMU-MOSEI-style feature sequences + transcript: the sentiment preset with the transcript through BERT base
    # (uncased) on its own WordPiece ids (shards built with --tokenizer DIR/bert-base-uncased), embeddings and first
    # three layers shared; both sides expose attention, so attention-level transfer applies.
    "sentiment-bert": _with_encoders("sentiment", {
        "text": {"name": "bert", "shared_stages": 4, "config": "bert-base-uncased", "weights": "bert-base-uncased"}}),
}


SPEC_KEYS = ("name", "shared_stages", "pool", "share_until", "freeze", "lr_mult", "check_frame_size")
"""Keys of an encoders entry that are about the branch, not options of the encoder's builder."""


def modality_specs(modalities: dict[str, dict], shapes: dict[str, dict], *, shared_stages: int,
                   encoders: dict[str, dict] | None = None, video_frames: int = 0) -> list[ModalitySpec]:
    """One ModalitySpec per dataset modality. Encoder choices come from `encoders` by kind then by name;
    the input shape (in_channels, vocab_size) always comes from the data. `video_frames` is the loader's
    (0 = every stored frame): backbones built for one input size (mvit_v2_s) get the clips' size from it."""
    encoders = encoders or {}
    specs = []
    for name, modality in modalities.items():
        kind = modality["kind"]
        choice = merge(encoders.get(kind, {}), encoders.get(name, {}))
        options = {k: v for k, v in choice.items() if k not in SPEC_KEYS}
        taken = _builder_parameters(kind, choice.get("name"))
        # the loader's shape arguments and dataset.json's DATA_ARGUMENTS that the chosen encoder takes (features
        # encoders have no use for the loader's max_frames, bert none for in_channels)
        options.update(_known(_input_shape(modality, shapes.get(name, {})), taken))
        options.update(_known(_data_arguments(modality), taken))
        if kind in ("video", "depth") and choice.get("name") in BACKBONES:
            _fit_backbone(name, modality, choice, options, video_frames)
        specs.append(ModalitySpec(name, kind, options, int(choice.get("shared_stages", shared_stages)),
                                  choice.get("name"), choice.get("pool"), choice.get("share_until"),
                                  choice.get("freeze"), choice.get("lr_mult")))
    return specs


DATA_ARGUMENTS = {"sample_rate": int, "special_ids": dict}
"""dataset.json fields an encoder takes when its builder names them: the audio's sample rate (wav2vec2 and HuBERT
check it is 16 kHz) and the text tokenizer's special ids (bert checks they are its own)."""


def _builder_parameters(kind: str, name: str | None) -> set[str] | None:
    """The keyword arguments of the chosen encoder's builder; None for an unknown kind or name (build_encoder
    then names the valid ones)."""
    builder = registered_builder(kind, name)
    if builder is None:
        return None
    parameters = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None  # a builder that takes any option gets them all
    return set(parameters)


def _known(arguments: dict, taken: set[str] | None) -> dict:
    return arguments if taken is None else {k: v for k, v in arguments.items() if k in taken}


def _data_arguments(modality: dict) -> dict:
    """The modality's DATA_ARGUMENTS from its dataset.json entry."""
    return {key: convert(modality[key]) for key, convert in DATA_ARGUMENTS.items() if key in modality}


def _fit_backbone(name: str, modality: dict, choice: dict, options: dict, video_frames: int) -> None:
    """A torchvision backbone against the clips the shards hold: the frame size its weights were trained at must
    be the stored one (unless check_frame_size is false), and a backbone built for one input size gets it."""
    height, width = int(modality["height"]), int(modality["width"])
    frames = int(modality["frames"]) if video_frames == 0 else min(video_frames, int(modality["frames"]))
    expected = expected_frame_size(choice["name"], options.get("weights"))
    if expected is not None and expected != (height, width) and choice.get("check_frame_size", True):
        raise ValueError(
            f"encoders.{name}: {choice['name']} weights {options['weights']} were trained on {expected[0]}x"
            f"{expected[1]} frames, but the shards store {name} at {height}x{width}: rebuild the shards at that "
            f"size (cotrain shards build MANIFEST --out DIR --size {expected[0]}x{expected[1]}), or set "
            f"encoders.{name}.check_frame_size: false to fine-tune at {height}x{width}")
    if takes_input_size(choice["name"]) and "input_size" not in options:
        options["input_size"] = [frames, height, width]


def _input_shape(modality: dict, shape: dict) -> dict:
    """The loader's shape arguments; features take their width from the dataset spec ("dim")."""
    if modality["kind"] == "features" and "in_channels" not in shape:
        if "dim" not in modality:
            raise ValueError(f"features modality spec {modality} has no 'dim': rebuild the shards "
                             "(`cotrain shards build`) so dataset.json records the feature width")
        return {"in_channels": int(modality["dim"])}
    return dict(shape)

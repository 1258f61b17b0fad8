"""model/encoders.py: every registered encoder runs, keeps its shape contract, and splits cleanly."""
import pytest
import torch

from model.backbones import BACKBONES
from model.encoders import ENCODERS, TransformerStage, build_encoder

# Tiny configurations, one per registered encoder (the test below fails if an encoder is added without one).
TINY = {
    ("video", "cnn3d"): {"widths": (4, 8, 8)},
    ("video", "resnet3d"): {"stem_width": 4, "widths": (4, 8, 8, 8)},
    ("video", "frames2d"): {"frame_widths": (4, 8), "temporal_widths": (8, 8, 8, 8)},
    ("depth", "cnn3d"): {"in_channels": 1, "widths": (4, 8, 8)},
    ("depth", "resnet3d"): {"in_channels": 1, "stem_width": 4, "widths": (4, 8, 8, 8), "depths": (2, 1, 1, 1)},
    ("depth", "frames2d"): {"in_channels": 1, "frame_widths": (4, 8), "temporal_widths": (8, 8)},
    ("audio", "cnn1d"): {"in_channels": 10, "widths": (8, 8, 8)},
    ("audio", "cnn1d4"): {"in_channels": 10, "widths": (8, 8, 16, 8), "features": "mfcc"},
    ("text", "cnn"): {"vocab_size": 30, "widths": (8, 8, 8)},
    ("text", "transformer"): {"vocab_size": 30, "dim": 16, "layers": 3, "heads": 2, "dropout": 0.0},
    ("features", "transformer"): {"in_channels": 6, "dim": 16, "layers": 2, "heads": 2, "dropout": 0.0},
    ("features", "tcn"): {"in_channels": 6, "widths": (8, 8)},
}


def _input(kind: str, cfg: dict):
    g = torch.Generator().manual_seed(0)
    if kind in ("video", "depth"):
        return torch.randn(2, cfg.get("in_channels", 3), 4, 16, 16, generator=g), None
    if kind == "audio":
        return torch.randn(2, cfg["in_channels"], 20, generator=g), None
    if kind == "text":
        ids = torch.randint(1, 30, (2, 7), generator=g)
        ids[1, 4:] = 0
        return ids, ids != 0
    x = torch.randn(2, 9, cfg["in_channels"], generator=g)
    valid = torch.arange(9)[None] < torch.tensor([[9], [5]])
    return x * valid[..., None], valid


def test_every_registered_encoder_has_a_tiny_config():
    from test_model_backbones_audio_text import TINY as AUDIO_TEXT_TINY  # library backbones, tested there

    # the torchvision backbones have theirs in tests/test_model_backbones.py
    torchvision = {(k, n) for k in ("video", "depth") for n in BACKBONES}
    assert {(k, n) for k, names in ENCODERS.items() for n in names} == set(TINY) | set(AUDIO_TEXT_TINY) | torchvision


@pytest.mark.parametrize("kind,name", sorted(TINY))
def test_encoder_forward_shape_finite_and_split_consistency(kind, name):
    torch.manual_seed(0)
    cfg = TINY[(kind, name)]
    enc = build_encoder(kind, name, **cfg).eval()
    assert enc.kind == kind
    x, valid = _input(kind, cfg)
    out = enc(x, valid)
    assert out.shape[:2] == (2, enc.out_channels[-1])
    assert torch.isfinite(out).all()
    if kind in ("text", "features"):
        assert out.shape[2] == x.shape[1]  # one token per step, so padding masks stay valid
    for split in range(len(enc.stages) + 1):  # 0 = share nothing
        shared = enc.run(x, 0, split, valid=valid)
        assert torch.allclose(enc.run(shared, split, valid=valid), out, atol=1e-6), f"split at {split}"


@pytest.mark.parametrize("kind,name", [("text", "transformer"), ("features", "transformer"), ("features", "tcn")])
def test_padding_does_not_change_valid_outputs(kind, name):
    cfg = TINY[(kind, name)]
    enc = build_encoder(kind, name, **cfg).eval()
    x, valid = _input(kind, cfg)
    ref = enc(x, valid)
    if kind == "text":
        longer = torch.cat([x, torch.zeros(2, 3, dtype=x.dtype)], 1)
    else:
        longer = torch.cat([x, torch.randn(2, 3, x.shape[2]) * 50], 1)  # garbage after the end
    valid2 = torch.cat([valid, torch.zeros(2, 3, dtype=torch.bool)], 1)
    out = enc(longer, valid2)
    assert torch.allclose(out[1, :, :5], ref[1, :, :5], atol=1e-5)


def test_transformer_stage_records_head_averaged_attention():
    stage = TransformerStage(8, 2, 0.0)
    stage.record_attention = True
    valid = torch.tensor([[True, True, False]])
    stage(torch.randn(1, 8, 3), valid)
    assert stage.attention.shape == (1, 3, 3)
    assert torch.allclose(stage.attention.sum(-1), torch.ones(1, 3))
    assert torch.all(stage.attention[..., 2] == 0)  # padding gets no attention


def test_unknown_names_and_bad_options_are_explained():
    with pytest.raises(ValueError, match="valid names: cnn3d, frames2d, .*r3d_18, resnet3d, s3d"):
        build_encoder("video", "resnet999")
    with pytest.raises(ValueError, match="valid kinds: audio, depth, features, text, video"):
        build_encoder("smell")
    with pytest.raises(ValueError, match="resnet3d.*widht"):
        build_encoder("video", "resnet3d", widht=3)
    with pytest.raises(ValueError, match="four stage widths"):
        build_encoder("video", "resnet3d", widths=(4, 4))
    with pytest.raises(ValueError, match="'logmel' or 'mfcc'"):
        build_encoder("audio", "cnn1d4", features="wav")


@pytest.mark.parametrize("kind,options", [("depth", {}), ("video", {"centre": True})])
def test_centred_encoders_ignore_a_constant_offset_of_the_clip(kind, options):
    """Depth (by default) and video with centre=True see each clip minus its mean: a far wall's offset must
    not change what the encoder computes, while the uncentred video encoder does change."""
    torch.manual_seed(0)
    channels = 1 if kind == "depth" else 3
    centred = build_encoder(kind, None, in_channels=channels, widths=(4, 8, 8), **options).eval()
    plain = build_encoder(kind, None, in_channels=channels, widths=(4, 8, 8), centre=False).eval()
    plain.load_state_dict({k.replace("stages.0.stage.", "stages.0."): v for k, v in centred.state_dict().items()})
    clip = torch.randn(2, channels, 4, 16, 16)
    with torch.no_grad():
        assert torch.allclose(centred(clip), centred(clip - 0.8), atol=1e-5)
        assert not torch.allclose(plain(clip), plain(clip - 0.8), atol=1e-3)


def test_centre_is_refused_for_non_video_encoders():
    with pytest.raises(ValueError, match="centre applies to video and depth"):
        build_encoder("audio", None, centre=True)

"""Per-modality encoders, each an ordered list of stages so that the first few can be shared.

Every encoder takes its modality's batch tensor and returns a feature map whose last
stage can be read two ways: pooled to one vector (the unimodal branch) or flattened to
a token sequence (the multimodal Transformer).

    video (B, 3, T, H, W) ─ stage 1 ─ stage 2 ─ ... ─ (B, C, T', H', W') ─┬─ pool ─> (B, C)
    audio (B, F, T)       ─ stage 1 ─ ...           ─ (B, C, T')          ├─ tokens ─> (B, L, C)
    text  (B, L) ids      ─ stage 1 ─ ...           ─ (B, C, L)           ┘
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import nn

__all__ = ["StagedEncoder", "Stages", "run_stages", "build_encoder", "ENCODERS", "tokens_of", "masked_mean",
           "masked_max", "pool_tokens", "TransformerStage", "default_pool", "registered_builder"]


def _groups(channels: int) -> int:
    # GroupNorm instead of BatchNorm: no running buffers that drift apart across data-parallel
    # ranks, and no train/eval gap on the small batches multimodal corpora come in.
    return 8 if channels % 8 == 0 else 1


class StagedEncoder(nn.Module):
    """An encoder as `stages`; `out_channels[i]` is the width after stage i. `stage_names[i]`, when given, names
    stage i (a backbone's own module names: stem, layer1...), so a config can split or freeze by name
    (encoders.<m>.share_until, .freeze). `pretrained_stages`: how many first stages hold pretrained weights."""

    def __init__(self, stages: list[nn.Module], out_channels: list[int], kind: str,
                 stage_names: list[str] | None = None):
        super().__init__()
        if stage_names is not None and (len(stage_names) != len(stages) or len(set(stage_names)) != len(stages)):
            raise ValueError(f"stage_names must name each of the {len(stages)} stages once, got {stage_names}")
        self.stages = nn.ModuleList(stages)
        self.out_channels = list(out_channels)
        self.kind = kind
        if stage_names is not None and len(stage_names) != len(stages):
            raise AssertionError(f"{len(stage_names)} stage names for {len(stages)} stages")
        if stage_names is not None and len(set(stage_names)) != len(stage_names):
            raise AssertionError(f"stage names must be unique: {list(stage_names)}")
        self.stage_names = list(stage_names) if stage_names is not None else None
        self.pretrained_stages = 0

    def run(self, x: torch.Tensor, start: int = 0, end: int | None = None,
            valid: torch.Tensor | None = None) -> torch.Tensor:
        """Apply stages[start:end] to x; `valid` (B, L) marks real tokens for stages that mask padding."""
        return run_stages(self.stages[start:end], x, valid)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(x, valid=valid)


def run_stages(stages, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Apply each stage in turn, giving the padding mask to those that declare `takes_mask`."""
    for stage in stages:
        x = stage(x, valid) if getattr(stage, "takes_mask", False) else stage(x)
    return x


class Stages(nn.ModuleList):
    """A run of stages (the shared part or a branch's rest); indexed like nn.Sequential, so state-dict
    keys are the same as before masks existed."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return run_stages(self, x, valid)


def _conv3d_block(c_in: int, c_out: int, stride: tuple[int, int, int]) -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(_groups(c_out), c_out),
        nn.ReLU(inplace=True),
    )


def _conv1d_block(c_in: int, c_out: int, pool: int) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv1d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(_groups(c_out), c_out),
        nn.ReLU(inplace=True),
    ]
    if pool > 1:
        layers.append(nn.MaxPool1d(pool, ceil_mode=True))
    return nn.Sequential(*layers)


def build_video_cnn3d(*, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64)) -> StagedEncoder:
    """A small 3D CNN: the first stage halves space only, later stages halve time and space."""
    stages, c_in = [], in_channels
    for i, width in enumerate(widths):
        stride = (1, 2, 2) if i == 0 else (2, 2, 2)
        stages.append(_conv3d_block(c_in, width, stride))
        c_in = width
    return StagedEncoder(stages, list(widths), kind="video")


# Pooled by max by default (ModalitySpec.pool): a small object (a hand, a moving blob) covers few of the
# feature map's positions, so a mean over all of them dilutes both its evidence and its gradient; trained from
# scratch the branch then sat at chance for 4 to 15 epochs on 2 of 3 seeds (dev-5 of experiments/protocol.yaml),
# and with max pooling it left chance within 3 epochs on every seed (docs/results-protocol.md).
build_video_cnn3d.default_pool = "max"


def build_audio_cnn1d(*, in_channels: int = 40, widths: tuple[int, ...] = (64, 128, 128)) -> StagedEncoder:
    """A 1-D CNN over (B, F, T) log-mel features, halving time at every stage."""
    stages, c_in = [], in_channels
    for width in widths:
        stages.append(_conv1d_block(c_in, width, pool=2))
        c_in = width
    return StagedEncoder(stages, list(widths), kind="audio")


class _TokenEmbedding(nn.Module):
    """(B, L) int ids -> (B, D, L) channels-first embeddings, id 0 is padding."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids.long()).transpose(1, 2)


def build_text_cnn(*, vocab_size: int, widths: tuple[int, ...] = (64, 128, 128)) -> StagedEncoder:
    """Token embedding then 1-D convolutions that keep the sequence length (so pad masks stay valid)."""
    first = nn.Sequential(_TokenEmbedding(vocab_size, widths[0]), _conv1d_block(widths[0], widths[0], pool=1))
    stages, c_in = [first], widths[0]
    for width in widths[1:]:
        stages.append(_conv1d_block(c_in, width, pool=1))
        c_in = width
    return StagedEncoder(stages, list(widths), kind="text")


# ---------------------------------------------------------------------------------------------
# ResNet-3D (video, depth): a stem and four stages of residual blocks.

class _BasicBlock3d(nn.Module):
    """Two 3x3x3 convolutions with a residual connection (a 1x1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int, int]):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(_groups(c_out), c_out),
            nn.ReLU(inplace=True),
            nn.Conv3d(c_out, c_out, 3, padding=1, bias=False), nn.GroupNorm(_groups(c_out), c_out),
        )
        self.skip = nn.Identity() if c_in == c_out and stride == (1, 1, 1) else nn.Sequential(
            nn.Conv3d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(_groups(c_out), c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        return torch.relu(self.body(x) + self.skip(x))


def build_resnet3d(*, in_channels: int = 3, stem_width: int = 16, widths: tuple[int, ...] = (16, 32, 64, 128),
                   depths: tuple[int, ...] = (1, 1, 1, 1)) -> StagedEncoder:
    """ResNet-3D style: a stem (halves space), then four stages; stages 2-4 halve time and space.
    Five stages in all, so shared_stages may be 0..4."""
    if len(widths) != 4 or len(depths) != 4:
        raise ValueError(f"resnet3d takes four stage widths and depths, got widths={widths}, depths={depths}")
    stem = nn.Sequential(nn.Conv3d(in_channels, stem_width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3),
                                   bias=False), nn.GroupNorm(_groups(stem_width), stem_width), nn.ReLU(inplace=True))
    stages, c_in = [stem], stem_width
    for i, (width, depth) in enumerate(zip(widths, depths)):
        stride = (1, 1, 1) if i == 0 else (2, 2, 2)
        blocks = [_BasicBlock3d(c_in if j == 0 else width, width, stride if j == 0 else (1, 1, 1))
                  for j in range(depth)]
        stages.append(nn.Sequential(*blocks))
        c_in = width
    return StagedEncoder(stages, [stem_width, *widths], kind="video",
                         stage_names=["stem", "layer1", "layer2", "layer3", "layer4"])


# ---------------------------------------------------------------------------------------------
# Per-frame 2D CNN then temporal 1-D convolutions (the authors' visual branch).

class _FrameConv(nn.Module):
    """A 2D conv block applied to every frame: (B, C, T, H, W) -> (B, C', T, H/2, W/2); with
    `pool_space` the result is averaged over space to (B, C', T)."""

    def __init__(self, c_in: int, c_out: int, pool_space: bool):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                                   nn.GroupNorm(_groups(c_out), c_out), nn.ReLU(inplace=True))
        self.pool_space = pool_space

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.block(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B*T, C', H', W')
        y = y.reshape(b, t, *y.shape[1:]).transpose(1, 2)  # (B, C', T, H', W')
        return y.mean(dim=(3, 4)) if self.pool_space else y


def build_frames2d_temporal(*, in_channels: int = 3, frame_widths: tuple[int, ...] = (16, 32, 64),
                            temporal_widths: tuple[int, ...] = (64, 64, 128, 128)) -> StagedEncoder:
    """Frame stages (2D convs, the last one pools space) then temporal 1-D conv stages over (B, C, T)."""
    stages, c_in = [], in_channels
    for i, width in enumerate(frame_widths):
        stages.append(_FrameConv(c_in, width, pool_space=i == len(frame_widths) - 1))
        c_in = width
    for width in temporal_widths:
        stages.append(_conv1d_block(c_in, width, pool=1))
        c_in = width
    return StagedEncoder(stages, [*frame_widths, *temporal_widths], kind="video")


def build_audio_cnn1d_blocks4(*, in_channels: int = 40, widths: tuple[int, ...] = (64, 128, 256, 128),
                              features: str = "logmel") -> StagedEncoder:
    """The authors' audio branch: four 1-D conv blocks over (B, F, T) log-mel or MFCC frames (F = in_channels)."""
    if features not in ("logmel", "mfcc"):
        raise ValueError(f"audio features must be 'logmel' or 'mfcc', got {features!r}")
    if len(widths) != 4:
        raise ValueError(f"the four-block audio CNN takes four widths, got {widths}")
    encoder = build_audio_cnn1d(in_channels=in_channels, widths=widths)
    encoder.input_features = features
    return encoder


# ---------------------------------------------------------------------------------------------
# Transformers (text, features) and a masked temporal CNN (features): sequence length is kept.

def _fix_empty(valid: torch.Tensor | None) -> torch.Tensor | None:
    """A row with no valid token would make attention NaN: let it attend to its first token."""
    if valid is None:
        return None
    first = valid[:, :1] | ~valid.any(dim=1, keepdim=True)  # out of place: ONNX has no in-place or
    return torch.cat([first, valid[:, 1:]], dim=1)


class TransformerStage(nn.Module):
    """One pre-norm Transformer block over channels-first (B, D, L) tokens. With `record_attention`
    set, the last forward's attention (B, L, L), averaged over heads, is kept in `attention`."""

    takes_mask = True
    exposes_attention = True
    """Modules that set `exposes_attention` keep the last forward's (B, L, L) head-averaged attention in
    `attention` while `record_attention` is set: what attention-level transfer reads (model/cotrain.py)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)
        self.record_attention = False
        self.attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        x = x.transpose(1, 2)  # (B, L, D)
        valid = _fix_empty(valid)
        h = self.norm1(x)
        out, weights = self.attn(h, h, h, key_padding_mask=None if valid is None else ~valid,
                                 need_weights=self.record_attention, average_attn_weights=True)
        self.attention = weights
        x = x + self.drop(out)
        x = x + self.drop(self.mlp(self.norm2(x)))
        if valid is not None:
            x = x * valid[..., None]
        return x.transpose(1, 2)


class _SequenceInput(nn.Module):
    """Token ids (B, L) or features (B, L, F) -> (B, D, L) with learned positions."""

    def __init__(self, dim: int, max_len: int, *, vocab_size: int | None = None, in_features: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0) if vocab_size else nn.Linear(in_features, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.ids = vocab_size is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length > self.pos.shape[0]:
            raise ValueError(f"sequence of {length} steps exceeds the encoder's max_len={self.pos.shape[0]}; "
                             f"raise max_len in the encoder config")
        h = self.embed(x.long() if self.ids else x) + self.pos[:length]
        return h.transpose(1, 2)  # (B, D, L)


class _InputThenBlock(nn.Module):
    takes_mask = True

    def __init__(self, first: nn.Module, block: TransformerStage):
        super().__init__()
        self.input, self.block = first, block

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.block(self.input(x), valid)


def _transformer(first: nn.Module, dim: int, layers: int, heads: int, dropout: float, kind: str) -> StagedEncoder:
    if layers < 1:
        raise ValueError(f"a {kind} Transformer needs layers >= 1, got {layers}")
    blocks = [TransformerStage(dim, heads, dropout) for _ in range(layers)]
    stages = [_InputThenBlock(first, blocks[0]), *blocks[1:]]
    return StagedEncoder(stages, [dim] * layers, kind=kind)


def build_text_transformer(*, vocab_size: int, dim: int = 64, layers: int = 2, heads: int = 4, max_len: int = 512,
                           dropout: float = 0.1) -> StagedEncoder:
    """Token embedding with positions, then `layers` Transformer blocks (one stage each); id 0 is padding."""
    return _transformer(_SequenceInput(dim, max_len, vocab_size=vocab_size), dim, layers, heads, dropout, "text")


def build_features_transformer(*, in_channels: int, dim: int = 64, layers: int = 2, heads: int = 4,
                               max_len: int = 512, dropout: float = 0.1) -> StagedEncoder:
    """(B, T, F) feature sequences projected to `dim`, then `layers` Transformer blocks masked by length."""
    return _transformer(_SequenceInput(dim, max_len, in_features=in_channels), dim, layers, heads, dropout,
                        "features")


class _MaskedConv1d(nn.Module):
    """A 1-D conv block that keeps length and zeroes padded steps before and after (so padding never leaks)."""

    takes_mask = True

    def __init__(self, c_in: int, c_out: int, channels_last_input: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size=3, padding=1, bias=False)
        # LayerNorm per step, not GroupNorm over time: statistics over time would include the padding
        self.norm = nn.LayerNorm(c_out)
        self.channels_last_input = channels_last_input

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.channels_last_input:
            x = x.transpose(1, 2)  # (B, T, F) -> (B, F, T)
        if valid is not None:
            x = x * valid[:, None, :].to(x.dtype)
        y = torch.relu(self.norm(self.conv(x).transpose(1, 2)).transpose(1, 2))  # (B, C, T)
        return y * valid[:, None, :].to(y.dtype) if valid is not None else y


def build_features_tcn(*, in_channels: int, widths: tuple[int, ...] = (64, 128, 128)) -> StagedEncoder:
    """A temporal CNN over (B, T, F) feature sequences, length kept and padding masked."""
    stages, c_in = [], in_channels
    for i, width in enumerate(widths):
        stages.append(_MaskedConv1d(c_in, width, channels_last_input=i == 0))
        c_in = width
    return StagedEncoder(stages, list(widths), kind="features")


ENCODERS: dict[str, dict[str, Callable[..., StagedEncoder]]] = {
    # the first name of each kind is its default (the demo's models)
    "video": {"cnn3d": build_video_cnn3d, "resnet3d": build_resnet3d, "frames2d": build_frames2d_temporal},
    "depth": {"cnn3d": build_video_cnn3d, "resnet3d": build_resnet3d, "frames2d": build_frames2d_temporal},
    "audio": {"cnn1d": build_audio_cnn1d, "cnn1d4": build_audio_cnn1d_blocks4},
    "text": {"cnn": build_text_cnn, "transformer": build_text_transformer},
    "features": {"transformer": build_features_transformer, "tcn": build_features_tcn},
}


# backbones from transformers (their module imports transformers only when one of them is built); they read
# their `weights` themselves, the architecture included, so they take them whether or not load_weights is set
from .backbones_audio_text import AUDIO_ENCODERS, TEXT_ENCODERS  # noqa: E402  (they build on StagedEncoder)


def _reads_own_weights(builder: Callable) -> Callable:
    @functools.wraps(builder)  # the builder's own signature (model/presets.py passes the options it names)
    def build(*, load_weights: bool = True, **cfg):
        return builder(**cfg)
    build.takes_weights = True
    return build


for _kind, _builders in (("audio", AUDIO_ENCODERS), ("text", TEXT_ENCODERS)):
    ENCODERS[_kind].update({name: _reads_own_weights(b) if "weights" in inspect.signature(b).parameters else b
                            for name, b in _builders.items()})


def registered_builder(kind: str, name: str | None = None) -> Callable[..., StagedEncoder] | None:
    """The builder `build_encoder(kind, name)` would call (name None: the kind's default); None for an unknown
    kind or name (build_encoder then names the valid ones)."""
    names = ENCODERS.get(kind, {})
    return names.get(name or next(iter(names), ""))


def default_pool(kind: str, name: str | None = None) -> str:
    """How a unimodal branch pools this encoder's tokens unless its config says otherwise: the builder's
    `default_pool`, else 'mean' (what pretrained backbones were trained with)."""
    return getattr(registered_builder(kind, name), "default_pool", "mean")


def build_encoder(kind: str, name: str | None = None, *, load_weights: bool = True, **cfg) -> StagedEncoder:
    """Build a registered encoder; `name` defaults to the kind's first registered one. Encoders that take
    pretrained weights (option `weights`) read them unless `load_weights` is False (a model whose state dict is
    loaded next: export, evaluation)."""
    if kind not in ENCODERS:
        raise ValueError(f"unknown modality kind {kind!r}; valid kinds: {', '.join(sorted(ENCODERS))}")
    names = ENCODERS[kind]
    name = name or next(iter(names))
    centre = bool(cfg.pop("centre", kind == "depth"))
    if name not in names:
        raise ValueError(f"unknown {kind} encoder {name!r}; valid names: {', '.join(sorted(names))}")
    builder = names[name]
    if getattr(builder, "takes_weights", False):
        cfg["load_weights"] = load_weights
    elif cfg.pop("weights", None) is not None:  # weights: null (clearing a preset's) means none
        takes = [n for n, b in names.items() if getattr(b, "takes_weights", False)]
        raise ValueError(f"{kind} encoder {name!r} takes no pretrained weights; encoders that do: "
                         f"{', '.join(takes) or 'none'}")
    try:
        encoder = builder(**cfg)
    except TypeError as err:  # a misspelt or missing option: name the encoder and what it takes
        raise ValueError(f"{kind} encoder {name!r}: {err}; see {builder.__name__}'s signature in "
                         f"model/encoders.py or model/backbones.py") from err
    encoder.kind = kind
    if centre:  # option `centre` (video and depth encoders): on by default for depth, see CentredInput
        if kind not in ("video", "depth"):
            raise ValueError(f"encoder option centre applies to video and depth encoders, not {kind!r}")
        encoder.stages[0] = CentredInput(encoder.stages[0])
    return encoder


class CentredInput(nn.Module):
    """Subtract each clip's mean before `stage`. A depth clip is mostly far wall, so in [-1, 1] it sits far
    from 0 (mean -0.77 on the gesture corpus); a bias-free conv then GroupNorm turns that offset into
    channel-wide constants and zero-padding edges that drown a small hand: a depth-only CNN stayed at
    chance for 12 epochs, and the same CNN on centred clips fit 4 batches in 60 steps (loss 1.67 -> 0.84).
    Changes over time (a hand coming closer) survive: one mean per clip, not per frame."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x - x.mean(dim=(1, 2, 3, 4), keepdim=True))


def tokens_of(features: torch.Tensor) -> torch.Tensor:
    """(B, C, *positions) feature map -> (B, L, C) tokens, L = product of positions."""
    return features.flatten(2).transpose(1, 2)


def masked_mean(tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over L of (B, L, C) tokens, counting only valid (B, L) positions."""
    if valid is None:
        return tokens.mean(dim=1)
    weights = valid.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def pool_tokens(tokens: torch.Tensor, valid: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, L, C) tokens -> (B, C) by 'max' or 'mean' over the valid positions."""
    return masked_max(tokens, valid) if how == "max" else masked_mean(tokens, valid)


def masked_max(tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Max over L of (B, L, C) tokens, over valid (B, L) positions only (a row with none gives zeros)."""
    if valid is None:
        return tokens.amax(dim=1)
    lowest = torch.finfo(tokens.dtype).min
    pooled = tokens.masked_fill(~valid.unsqueeze(-1), lowest).amax(dim=1)
    return torch.where(valid.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))


from . import backbones  # noqa: E402,F401 -- registers the torchvision backbones for video and depth

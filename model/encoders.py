"""Per-modality encoders, each an ordered list of stages so that the first few can be shared.

Every encoder takes its modality's batch tensor and returns a feature map whose last
stage can be read two ways: pooled to one vector (the unimodal branch) or flattened to
a token sequence (the multimodal Transformer).

    video (B, 3, T, H, W) ─ stage 1 ─ stage 2 ─ ... ─ (B, C, T', H', W') ─┬─ pool ─> (B, C)
    audio (B, F, T)       ─ stage 1 ─ ...           ─ (B, C, T')          ├─ tokens ─> (B, L, C)
    text  (B, L) ids      ─ stage 1 ─ ...           ─ (B, C, L)           ┘
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["StagedEncoder", "build_encoder", "ENCODERS", "tokens_of", "masked_mean"]


def _groups(channels: int) -> int:
    # GroupNorm instead of BatchNorm: no running buffers that drift apart across data-parallel
    # ranks, and no train/eval gap on the small batches multimodal corpora come in.
    return 8 if channels % 8 == 0 else 1


class StagedEncoder(nn.Module):
    """An encoder as `stages`; `out_channels[i]` is the width after stage i."""

    def __init__(self, stages: list[nn.Module], out_channels: list[int], kind: str):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.out_channels = list(out_channels)
        self.kind = kind

    def run(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Apply stages[start:end] to x."""
        for stage in self.stages[start:end]:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


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


ENCODERS: dict[str, dict[str, Callable[..., StagedEncoder]]] = {
    "video": {"cnn3d": build_video_cnn3d},
    "depth": {"cnn3d": build_video_cnn3d},
    "audio": {"cnn1d": build_audio_cnn1d},
    "text": {"cnn": build_text_cnn},
}


def build_encoder(kind: str, name: str | None = None, **cfg) -> StagedEncoder:
    """Build a registered encoder; `name` defaults to the kind's first registered one."""
    if kind not in ENCODERS:
        raise ValueError(f"unknown modality kind {kind!r}; valid kinds: {', '.join(sorted(ENCODERS))}")
    names = ENCODERS[kind]
    name = name or next(iter(names))
    if name not in names:
        raise ValueError(f"unknown {kind} encoder {name!r}; valid names: {', '.join(sorted(names))}")
    return names[name](**cfg)


def tokens_of(features: torch.Tensor) -> torch.Tensor:
    """(B, C, *positions) feature map -> (B, L, C) tokens, L = product of positions."""
    return features.flatten(2).transpose(1, 2)


def masked_mean(tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over L of (B, L, C) tokens, counting only valid (B, L) positions."""
    if valid is None:
        return tokens.mean(dim=1)
    weights = valid.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

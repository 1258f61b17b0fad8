"""Standard video backbones from torchvision as StagedEncoders, with their published weights.

    name                     stages (stage_names, the backbone's own module names)
    r3d_18, r2plus1d_18,     stem, layer1, layer2, layer3, layer4
    mc3_18
    s3d                      features.0 ... features.15
    mvit_v2_s                conv_proj, blocks.0 ... blocks.15 (a fixed input size: option input_size)
    swin3d_t                 patch_embed, features.0 ... features.6
    frames_resnet18          stem, layer1 ... layer4, then temporal1, temporal2 ...   (2D backbone on every
    frames_efficientnet_b0   features.0 ... features.8, temporal1 ...                  frame, then a temporal
    frames_mobilenet_v3_small features.0 ... features.12, temporal1 ...                stage over (B, C, T))

Every stage passes a channels-first map: (B, C, T, H, W) for CNNs and Swin, (B, C, 1 + T*H*W) tokens for MViT
(its class token first), (B, C, T) after a temporal stage; the last one is pooled or read as tokens like any
encoder's. The classifier of each backbone is dropped.

Weights (option `weights`): a torchvision weights name (KINETICS400_V1, IMAGENET1K_V1, DEFAULT) read from torch's
hub cache (never downloaded: a missing file is an error that says where to put it), or a local state-dict file of
the torchvision model. With fewer input channels (depth: 1) the first convolution's RGB filters are averaged. The
weights' input normalisation becomes the encoder's first operation (InputNormalization), so it travels with the
weights into every exported model; the frame size they were trained at is checked against the shards'
(check_frame_size).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from .encoders import ENCODERS, StagedEncoder, TransformerStage

__all__ = ["BACKBONES", "Backbone", "build_backbone", "TORCHVISION_ENCODERS", "InputNormalization",
           "LOADER_NORMALIZATION", "WeightsUnavailable", "expected_frame_size", "hub_checkpoint_path",
           "takes_input_size"]

LOADER_NORMALIZATION = {3: (0.45, 0.225), 1: (0.5, 0.5)}
"""What the loaders give, by input channels (3: video, 1: depth): x = (pixel in [0, 1] - mean) / std
(pipeline/decode.py: VIDEO_MEAN, VIDEO_STD in 8-bit levels; DEPTH_MEAN, DEPTH_STD)."""


class WeightsUnavailable(FileNotFoundError):
    """A named torchvision weights file that is not in torch's hub cache (nothing is downloaded)."""


# ---------------------------------------------------------------------------------------------
# Stage wrappers: each takes and returns a channels-first tensor.

class PerFrame(nn.Module):
    """A 2D module applied to every frame: (B, C, T, H, W) -> (B, C', T, H', W')."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.module(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B*T, C', H', W')
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class ChannelsLast(nn.Module):
    """A module that works channels-last (Swin): (B, C, T, H, W) -> permute -> module -> permute back.
    `takes_channels_first` marks Swin's patch embedding, which reads channels-first itself."""

    def __init__(self, module: nn.Module, takes_channels_first: bool = False):
        super().__init__()
        self.module = module
        self.takes_channels_first = takes_channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x if self.takes_channels_first else x.permute(0, 2, 3, 4, 1))  # (B, T, H, W, C)
        return y.permute(0, 4, 1, 2, 3)


class MViTPatchify(nn.Module):
    """MViT's patch embedding and class token: (B, 3, T, H, W) -> (B, C, 1 + T'*H'*W'). Between stages MViT's
    tokens are a flat sequence, so every block is told its token grid when the encoder is built (option
    input_size); a clip of another size is refused with the fix. (torchvision interpolates MViT's relative
    position tables to the grid, so any input size works once it is declared.)"""

    def __init__(self, conv: nn.Conv3d, pos_encoding: nn.Module, input_size: tuple[int, int, int]):
        super().__init__()
        self.conv, self.pos_encoding = conv, pos_encoding
        self.input_size = tuple(input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"mvit_v2_s was built for clips of (frames, height, width) = {self.input_size}, got "
                             f"{tuple(x.shape[2:])}: set encoders.<modality>.input_size to "
                             f"{list(x.shape[2:])} (the training config fills it from the shards and "
                             "loader.video_frames when it is not set)")
        tokens = self.conv(x).flatten(2).transpose(1, 2)  # (B, T'H'W', C)
        return self.pos_encoding(tokens).transpose(1, 2)  # class token first: (B, C, 1 + T'H'W')


class MViTBlock(nn.Module):
    """One MViT block over (B, C, 1 + T*H*W) tokens whose grid `thw` is fixed by the input size."""

    def __init__(self, block: nn.Module, thw: tuple[int, int, int], norm: nn.Module | None = None):
        super().__init__()
        self.block, self.norm = block, norm
        self.thw = tuple(thw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.block(x.transpose(1, 2), self.thw)  # (B, L, C)
        if self.norm is not None:
            y = self.norm(y)
        return y.transpose(1, 2)


class TemporalConv(nn.Module):
    """A temporal stage over per-frame features: 1-D conv, GroupNorm, ReLU over (B, C, T); the first one
    averages space away first ((B, C, T, H, W) -> (B, C, T))."""

    def __init__(self, c_in: int, c_out: int, pool_space: bool):
        super().__init__()
        self.pool_space = pool_space
        self.block = nn.Sequential(nn.Conv1d(c_in, c_out, 3, padding=1, bias=False),
                                   nn.GroupNorm(8 if c_out % 8 == 0 else 1, c_out), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.mean(dim=(3, 4)) if self.pool_space else x)


class TemporalProjection(nn.Module):
    """The first temporal Transformer stage: average space away, project to `dim`, add learned frame positions,
    then a Transformer block (which exposes its attention to attention-level transfer)."""

    takes_mask = True

    def __init__(self, c_in: int, dim: int, heads: int, max_frames: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(c_in, dim)
        self.pos = nn.Parameter(torch.randn(max_frames, dim) * 0.02)
        self.block = TransformerStage(dim, heads, dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        frames = x.mean(dim=(3, 4)).transpose(1, 2)  # (B, T, C)
        if frames.shape[1] > self.pos.shape[0]:
            raise ValueError(f"{frames.shape[1]} frames exceed the temporal Transformer's max_frames="
                             f"{self.pos.shape[0]}; raise encoders.<modality>.max_frames")
        h = self.proj(frames) + self.pos[:frames.shape[1]]
        return self.block(h.transpose(1, 2), valid)  # (B, D, T)


class InputNormalization(nn.Module):
    """The loader's normalisation turned into the one the weights were trained with, before `stage`:
    x_weights = ((x * loader_std + loader_mean) - mean) / std per channel (depth: the RGB means averaged).
    Constants, not parameters: they travel in every export and `predict` needs no extra step."""

    def __init__(self, stage: nn.Module, mean: list[float], std: list[float], in_channels: int):
        super().__init__()
        self.stage = stage
        loader_mean, loader_std = LOADER_NORMALIZATION[in_channels]
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if in_channels != len(mean):
            mean_t, std_t = mean_t.mean().reshape(1), std_t.mean().reshape(1)
        shape = (1, in_channels, 1, 1, 1)
        self.register_buffer("scale", (loader_std / std_t).reshape(shape), persistent=False)
        self.register_buffer("shift", ((loader_mean - mean_t) / std_t).reshape(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x * self.scale.to(x.dtype) + self.shift.to(x.dtype))


# ---------------------------------------------------------------------------------------------
# The backbones: how to cut each torchvision model into named stages.

Stage = tuple[str, nn.Module, int]  # (torchvision module name, module, output channels)


def _video_resnet_stages(model: nn.Module, _options: dict) -> list[Stage]:
    return [("stem", model.stem, 64), ("layer1", model.layer1, 64), ("layer2", model.layer2, 128),
            ("layer3", model.layer3, 256), ("layer4", model.layer4, 512)]


S3D_WIDTHS = (64, 64, 64, 192, 192, 256, 480, 480, 512, 512, 512, 528, 832, 832, 832, 1024)


def _s3d_stages(model: nn.Module, _options: dict) -> list[Stage]:
    return [(f"features.{i}", module, width) for i, (module, width) in enumerate(zip(model.features, S3D_WIDTHS))]


SWIN3D_T_WIDTHS = (96, 96, 192, 192, 384, 384, 768, 768)


def _swin3d_stages(model: nn.Module, _options: dict) -> list[Stage]:
    stages = [("patch_embed", ChannelsLast(nn.Sequential(model.patch_embed, model.pos_drop), True),
               SWIN3D_T_WIDTHS[0])]
    last = len(model.features) - 1
    for i, module in enumerate(model.features):
        body = nn.Sequential(module, model.norm) if i == last else module  # the final norm ends the last stage
        stages.append((f"features.{i}", ChannelsLast(body), SWIN3D_T_WIDTHS[i + 1]))
    return stages


def _pooled(size: int, conv: nn.Conv3d, axis: int) -> int:
    return (size + 2 * conv.padding[axis] - conv.kernel_size[axis]) // conv.stride[axis] + 1


def _mvit_stages(model: nn.Module, options: dict) -> list[Stage]:
    input_size = tuple(options["input_size"])
    thw = tuple(_pooled(n, model.conv_proj, a) for a, n in enumerate(input_size))
    stages = [("conv_proj", MViTPatchify(model.conv_proj, model.pos_encoding, input_size),
               model.conv_proj.out_channels)]
    for i, block in enumerate(model.blocks):
        norm = model.norm if i == len(model.blocks) - 1 else None
        stages.append((f"blocks.{i}", MViTBlock(block, thw, norm), block.mlp[3].out_features))
        if block.attn.pool_q is not None:  # query pooling shrinks the grid the next block sees
            conv = block.attn.pool_q.pool
            thw = tuple(_pooled(n, conv, a) for a, n in enumerate(thw))
    return stages


def _resnet2d_stages(model: nn.Module, _options: dict) -> list[Stage]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    widths = [model.layer1[-1].bn2.num_features, model.layer2[-1].bn2.num_features,
              model.layer3[-1].bn2.num_features, model.layer4[-1].bn2.num_features]
    return [("stem", PerFrame(stem), model.bn1.num_features),
            *[(f"layer{i + 1}", PerFrame(getattr(model, f"layer{i + 1}")), w) for i, w in enumerate(widths)]]


def _features2d_stages(model: nn.Module, _options: dict) -> list[Stage]:
    stages = []
    for i, module in enumerate(model.features):
        norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        stages.append((f"features.{i}", PerFrame(module), norms[-1].num_features))
    return stages


@dataclass(frozen=True)
class Backbone:
    """One torchvision model as an encoder."""

    constructor: str
    """torchvision.models builder (and the name of its weights enum, torchvision.models.get_model_weights)."""
    first_conv: str
    """Module path of the first convolution: rebuilt for other input channels, its RGB weights averaged."""
    head: tuple[str, ...]
    """State-dict prefixes of the classifier, which the encoder drops."""
    stages: Callable[[nn.Module, dict], list[Stage]]
    per_frame: bool = False
    """A 2D image model applied to every frame, followed by temporal stages."""


BACKBONES: dict[str, Backbone] = {
    "r3d_18": Backbone("r3d_18", "stem.0", ("fc.",), _video_resnet_stages),
    "r2plus1d_18": Backbone("r2plus1d_18", "stem.0", ("fc.",), _video_resnet_stages),
    "mc3_18": Backbone("mc3_18", "stem.0", ("fc.",), _video_resnet_stages),
    "s3d": Backbone("s3d", "features.0.0.0", ("classifier.",), _s3d_stages),
    "mvit_v2_s": Backbone("mvit_v2_s", "conv_proj", ("head.",), _mvit_stages),
    "swin3d_t": Backbone("swin3d_t", "patch_embed.proj", ("head.",), _swin3d_stages),
    "frames_resnet18": Backbone("resnet18", "conv1", ("fc.",), _resnet2d_stages, per_frame=True),
    "frames_efficientnet_b0": Backbone("efficientnet_b0", "features.0.0", ("classifier.",), _features2d_stages,
                                       per_frame=True),
    "frames_mobilenet_v3_small": Backbone("mobilenet_v3_small", "features.0.0", ("classifier.",),
                                          _features2d_stages, per_frame=True),
}

MVIT_DEFAULT_INPUT = (16, 224, 224)


def takes_input_size(name: str) -> bool:
    """Whether the backbone is built for one declared input size (option input_size = [frames, height, width])."""
    return name == "mvit_v2_s"


# ---------------------------------------------------------------------------------------------
# Weights: a torchvision weights name from the hub cache, or a local file.

def _is_file_reference(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.endswith((".pt", ".pth", ".bin", ".ckpt")) \
        or Path(weights).exists()


def _weights_enum(name: str, weights: str):
    """torchvision's weights entry `weights` (e.g. KINETICS400_V1, DEFAULT) of backbone `name`."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(BACKBONES[name].constructor)
    member = weights.rsplit(".", 1)[-1]  # "R3D_18_Weights.KINETICS400_V1" works as well
    if member not in enum.__members__:
        raise ValueError(f"unknown weights {weights!r} for {name}; valid: {', '.join(enum.__members__)} "
                         "(torchvision's names), or the path of a local state-dict file")
    return enum[member]


def hub_checkpoint_path(entry) -> Path:
    """Where torch.hub keeps (and torchvision looks for) the file of a weights entry."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(entry.url).path)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common checkpoint wrappers around the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} holds no state dict; save one with "
                         "torch.save(model.state_dict(), path)")
    return state


def _weights_file(name: str, weights: str, entry) -> Path:
    """The file to load: the local file `weights`, or torchvision weights `entry`'s file in the hub cache."""
    if entry is None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} (encoder {name}) not found; give an existing state-dict "
                                    f"file or a torchvision weights name such as KINETICS400_V1")
        return path
    path = hub_checkpoint_path(entry)
    if not path.is_file():
        raise WeightsUnavailable(
            f"{name} weights {weights} are not in torch's hub cache and nothing is downloaded here: fetch "
            f"{entry.url} on a machine with network access and put it at {path} (torch.hub.get_dir() is "
            f"{torch.hub.get_dir()}; set TORCH_HOME to use another cache), or set the encoder's weights to a local "
            "file")
    return path


def _adapt_first_conv(state: dict, key: str, in_channels: int) -> dict:
    """RGB filters averaged into `in_channels` (1: depth) input channels, so a gray input of the right level
    gives the RGB filters' mean response."""
    weight = state.get(key)
    if weight is not None and weight.shape[1] != in_channels and weight.shape[1] == 3:
        state = dict(state)
        state[key] = weight.mean(dim=1, keepdim=True).repeat(1, in_channels, *[1] * (weight.dim() - 2))
    return state


def _load_weights(model: nn.Module, spec: Backbone, name: str, path: Path, in_channels: int) -> None:
    state = _adapt_first_conv(_read_state(path), f"{spec.first_conv}.weight", in_channels)
    state = {k: v for k, v in state.items() if not k.startswith(spec.head)}
    expected = {k for k in model.state_dict() if not k.startswith(spec.head)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"weights file {path} does not fit {name} (torchvision.models.{spec.constructor}): "
                         f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:5]}; it must be a state dict of that model (torch.save(model.state_dict()))")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same keys, other shapes (another variant of the architecture)
        raise ValueError(f"weights file {path} does not fit {name}: {err}") from err


def _normalization(entry, options: dict) -> tuple[list[float], list[float]] | None:
    """(mean, std) the weights expect: options mean/std, else the torchvision weights' transforms."""
    if "mean" in options or "std" in options:
        if "mean" not in options or "std" not in options:
            raise ValueError("give both mean and std of the weights' input normalisation (per RGB channel)")
        return [float(v) for v in options["mean"]], [float(v) for v in options["std"]]
    if entry is None:
        return None
    transforms = entry.transforms()
    return list(transforms.mean), list(transforms.std)


def expected_frame_size(name: str, weights: str | None) -> tuple[int, int] | None:
    """(height, width) the torchvision weights were trained and evaluated at (their transforms' crop); None
    when nothing says (random weights or a local file)."""
    if name in BACKBONES and weights and not _is_file_reference(weights):
        crop = _weights_enum(name, weights).transforms().crop_size
        return int(crop[0]), int(crop[-1])
    return None


# ---------------------------------------------------------------------------------------------
# Building.

def _replace_first_conv(model: nn.Module, path: str, in_channels: int) -> None:
    conv = model.get_submodule(path)
    if not isinstance(conv, (nn.Conv2d, nn.Conv3d)):
        raise AssertionError(f"{path} of {type(model).__name__} is a {type(conv).__name__}, not a convolution")
    if conv.in_channels == in_channels:
        return
    new = type(conv)(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _temporal_stages(c_in: int, temporal: str, widths: tuple[int, ...], heads: int, max_frames: int,
                     dropout: float) -> list[Stage]:
    if temporal not in ("conv", "transformer"):
        raise ValueError(f"temporal must be 'conv' or 'transformer', got {temporal!r}")
    if not widths:
        raise ValueError("temporal_widths needs at least one width (one temporal stage)")
    stages = []
    for i, width in enumerate(widths):
        if temporal == "conv":
            module: nn.Module = TemporalConv(c_in, width, pool_space=i == 0)
        elif i == 0:
            module = TemporalProjection(c_in, width, heads, max_frames, dropout)
        elif width != widths[0]:
            raise ValueError(f"a temporal Transformer keeps one width; got temporal_widths={list(widths)}")
        else:
            module = TransformerStage(width, heads, dropout)
        stages.append((f"temporal{i + 1}", module, width))
        c_in = width
    return stages


def build_backbone(name: str, *, in_channels: int = 3, weights: str | None = None, load_weights: bool = True,
                   input_size: tuple[int, int, int] | list[int] | None = None,
                   mean: list[float] | None = None, std: list[float] | None = None,
                   temporal: str = "conv", temporal_widths: tuple[int, ...] | list[int] = (256, 256),
                   heads: int = 4, max_frames: int = 64, dropout: float = 0.1) -> StagedEncoder:
    """The torchvision backbone `name` as a StagedEncoder (see the module docstring). `load_weights=False`
    builds the architecture and its normalisation without reading the weights file (a model whose state dict
    is loaded next); builds on the meta device never read it."""
    if name not in BACKBONES:
        raise ValueError(f"unknown torchvision backbone {name!r}; valid: {', '.join(BACKBONES)}")
    if in_channels not in LOADER_NORMALIZATION:
        raise ValueError(f"{name} takes 3 (video) or 1 (depth) input channels, got {in_channels}")
    import torchvision.models as tv

    spec = BACKBONES[name]
    options = {"input_size": tuple(input_size or MVIT_DEFAULT_INPUT)}
    if mean is not None or std is not None:
        options.update(mean=mean, std=std)
    model = tv.get_model(spec.constructor, weights=None)
    _replace_first_conv(model, spec.first_conv, in_channels)
    entry = _weights_enum(name, weights) if weights and not _is_file_reference(weights) else None
    if weights and load_weights and not next(model.parameters()).is_meta:
        _load_weights(model, spec, name, _weights_file(name, weights, entry), in_channels)
    stages = spec.stages(model, options)
    pretrained = len(stages) if weights else 0
    if spec.per_frame:
        stages += _temporal_stages(stages[-1][2], temporal, tuple(temporal_widths), heads, max_frames, dropout)
    encoder = StagedEncoder([s[1] for s in stages], [s[2] for s in stages], kind="video",
                            stage_names=[s[0] for s in stages])
    encoder.pretrained_stages = pretrained
    normalization = _normalization(entry, options)
    if normalization is not None:
        encoder.stages[0] = InputNormalization(encoder.stages[0], *normalization, in_channels=in_channels)
    encoder.input_normalization = None if normalization is None else \
        {"mean": normalization[0], "std": normalization[1]}
    return encoder


def _registered(name: str) -> Callable[..., StagedEncoder]:
    def build(**options) -> StagedEncoder:
        return build_backbone(name, **options)

    build.__name__ = f"build_backbone('{name}')"
    build.takes_weights = True
    return build


TORCHVISION_ENCODERS: dict[str, Callable[..., StagedEncoder]] = {name: _registered(name) for name in BACKBONES}
"""Registered for video and depth in model/encoders.py's ENCODERS (below)."""

for _kind in ("video", "depth"):
    ENCODERS[_kind].update(TORCHVISION_ENCODERS)

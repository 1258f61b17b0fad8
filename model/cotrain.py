"""The co-trained model: shared early stages per modality, unimodal student branches, and a
multimodal Transformer teacher that fuses the tokens of every modality.

                       ┌─ student rest ─ pool ─ head ──────────────> logits[m]      (deployed alone)
    x[m] ─ shared[m] ──┤
                       └─ teacher rest[m] ─ proj + modality/pos emb ─┐
                                       (tokens of every modality) ───┴─ Transformer ─ pool ─ head ─> logits["multimodal"]

The teacher owns per-modality stages after the shared ones (as deep as the student's rest):
a fusion Transformer fed straight from shallow shared features is easily weaker than a
unimodal CNN, and transfer from a weaker teacher makes students worse (shared/NOTES.md).
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .encoders import StagedEncoder, build_encoder, masked_mean, tokens_of

__all__ = ["seeded", "ModalitySpec", "FusionConfig", "CoTrainModel", "StudentBranch", "MultimodalBranch", "MODES",
           "build_model"]

MODES = ("cotrain", "unimodal", "multimodal")
TEACHER = "multimodal"


@dataclass
class ModalitySpec:
    """One modality as the model sees it."""

    name: str
    kind: str
    encoder: dict = field(default_factory=dict)
    """Keyword arguments of the registered encoder (widths, vocab_size, in_channels...)."""
    shared_stages: int = 1
    """How many of the encoder's first stages the unimodal and multimodal branches share."""


@dataclass
class FusionConfig:
    """The multimodal Transformer teacher."""

    dim: int = 64
    """Token width inside the Transformer."""
    layers: int = 2
    """Number of Transformer encoder blocks over the tokens of all modalities."""
    heads: int = 4
    """Attention heads per block."""
    dropout: float = 0.1
    """Dropout inside the Transformer blocks."""
    max_tokens: int = 256
    """Size of the learned position table (per modality)."""
    stream_loss: bool = True
    """Give each of the teacher's per-modality streams a head and a task loss of its own (beyond the paper).
    Trained jointly, a fusion model fits the easiest modality first and leaves the others under-trained
    (modality competition); a loss per stream makes every stream learn its modality, so the teacher
    can be stronger than each student."""
    stream_label_smoothing: float = 0.2
    """Label smoothing of the stream losses. Experts trained on noisy labels memorise them and grow
    overconfident, and a product of overconfident experts is only as good as the loudest one; smoothed
    targets keep their probabilities honest so the product votes."""
    late_fusion: bool = True
    """Add the product of the per-modality streams' (detached) predictions to the Transformer's output
    (beyond the paper). Streams trained by their own losses are unimodal experts; their product is a strong
    fusion baseline that the Transformer only has to correct, so the teacher does not end up weaker than
    a student when the Transformer overfits the modality it fits first. Needs stream_loss."""
    detach_streams: bool = True
    """Feed the Transformer a stop-gradient copy of each stream's tokens, so the streams are trained by
    their own losses alone and the fusion cannot pull a slow modality's stream off course."""
    modality_dropout: float = 0.0
    """In training, the probability of hiding each modality from the teacher per sample (one always stays).
    It keeps the teacher from leaning on the modality it fits first, so it stays stronger than every student."""


def _split(encoder: StagedEncoder, shared_stages: int) -> tuple[nn.Sequential, nn.Sequential]:
    if not 0 <= shared_stages < len(encoder.stages):
        raise ValueError(
            f"shared_stages={shared_stages} for a {encoder.kind} encoder with {len(encoder.stages)} stages; "
            f"choose 0..{len(encoder.stages) - 1} so every branch keeps at least one stage of its own"
        )
    return nn.Sequential(*encoder.stages[:shared_stages]), nn.Sequential(*encoder.stages[shared_stages:])


class StudentBranch(nn.Module):
    """The unimodal branch after the shared stages: its own stages, mean pooling, a linear head."""

    def __init__(self, rest: nn.Module, width: int, num_classes: int):
        super().__init__()
        self.rest = rest
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, shared: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        pooled = masked_mean(tokens_of(self.rest(shared)), valid)  # (B, C)
        return self.head(self.norm(pooled))


class MultimodalBranch(nn.Module):
    """Per-modality stages of its own, then one Transformer over the tokens of all modalities."""

    def __init__(self, rests: dict[str, nn.Module], widths: dict[str, int], num_classes: int, cfg: FusionConfig):
        super().__init__()
        self.order = list(rests)
        self.rests = nn.ModuleDict(rests)
        self.proj = nn.ModuleDict({m: nn.Linear(widths[m], cfg.dim) for m in self.order})
        self.modality_embed = nn.Parameter(torch.randn(len(self.order), cfg.dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(cfg.max_tokens, cfg.dim) * 0.02)
        block = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, dim_feedforward=2 * cfg.dim, dropout=cfg.dropout, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_classes)
        self.modality_dropout = cfg.modality_dropout
        self.stream_heads = nn.ModuleDict({m: nn.Linear(widths[m], num_classes) for m in self.order}) \
            if cfg.stream_loss else None
        if cfg.late_fusion and not cfg.stream_loss:
            raise ValueError("fusion.late_fusion needs fusion.stream_loss: the streams' own losses train the experts")
        self.late_fusion = cfg.late_fusion
        self.detach_streams = cfg.detach_streams

    def _drop_modalities(self, present: dict) -> dict:
        """Hide each present modality with probability p, keeping at least one per sample."""
        names = list(present)
        mask = torch.stack([present[m] for m in names], dim=1)  # (B, M)
        kept = mask & (torch.rand(mask.shape, device=mask.device) >= self.modality_dropout)
        # samples that lost everything keep one of their present modalities, chosen at random
        lost = ~kept.any(dim=1)
        if lost.any():
            scores = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)
            rescue = torch.zeros_like(mask).scatter_(1, scores.argmax(dim=1, keepdim=True), True)
            kept = kept | (rescue & lost[:, None])
        return {m: kept[:, i] for i, m in enumerate(names)}

    def _stream(self, i: int, m: str, shared: torch.Tensor, valid: torch.Tensor | None):
        """(B, L_m, D) embedded tokens of modality m, and its stream logits (or None)."""
        tokens = tokens_of(self.rests[m](shared))  # (B, L_m, C_m)
        length = tokens.shape[1]
        if length > self.pos_embed.shape[0]:
            raise ValueError(f"modality {m!r} yields {length} tokens; raise fusion.max_tokens to at least {length}")
        stream = self.stream_heads[m](masked_mean(tokens, valid)) if self.stream_heads is not None else None
        fused_in = tokens.detach() if self.detach_streams else tokens
        return self.proj[m](fused_in) + self.modality_embed[i] + self.pos_embed[:length], stream

    def forward(self, shared: dict, valid: dict, present: dict) -> dict[str, torch.Tensor]:
        """{"multimodal": fused logits, "multimodal/<m>": stream logits per modality (when enabled)}."""
        if self.training and self.modality_dropout > 0:
            present = self._drop_modalities(present)
        tokens, keep, out = [], [], {}
        for i, m in enumerate(self.order):
            t, stream = self._stream(i, m, shared[m], valid[m])
            if stream is not None:
                out[f"{TEACHER}/{m}"] = stream
            k = present[m][:, None].expand(-1, t.shape[1])
            tokens.append(t)
            keep.append(k & valid[m] if valid[m] is not None else k)
        x, keep_all = torch.cat(tokens, dim=1), torch.cat(keep, dim=1)  # (B, L, D), (B, L)
        # A sample with no modality at all would make attention NaN; let it attend to its first token.
        keep_all = keep_all.clone()
        keep_all[:, 0] |= ~keep_all.any(dim=1)
        x = self.blocks(x, src_key_padding_mask=~keep_all)
        out[TEACHER] = self.head(self.norm(masked_mean(x, keep_all)))
        if self.late_fusion:
            out[TEACHER] = out[TEACHER] + self._product_of_experts(out, present)
        return out

    def _product_of_experts(self, out: dict, present: dict) -> torch.Tensor:
        """Sum over present modalities of the detached stream log-probabilities, (B, num_classes)."""
        experts = [torch.log_softmax(out[f"{TEACHER}/{m}"].detach(), dim=-1) * present[m][:, None]
                   for m in self.order]
        return torch.stack(experts).sum(dim=0)


class CoTrainModel(nn.Module):
    """Shared stages per modality, students for `students`, and the teacher unless mode is unimodal."""

    def __init__(self, specs: list[ModalitySpec], num_classes: int, *, mode: str = "cotrain",
                 students: list[str] | None = None, fusion: FusionConfig | None = None, init_seed: int = 0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode, self.kinds = mode, {s.name: s.kind for s in specs}
        self.students_of = [] if mode == "multimodal" else (students or [s.name for s in specs])
        if mode == "unimodal" and len(specs) != 1:
            raise ValueError(f"mode 'unimodal' trains one modality; got {[s.name for s in specs]}")
        self.shared = nn.ModuleDict()
        self.students = nn.ModuleDict()
        teacher_rests, widths = {}, {}
        # Each part draws its initial weights from its own seed, so a branch starts from the same weights
        # in every mode: co-trained and baseline runs of one seed are paired, not just equally random.
        for spec in specs:
            with seeded(init_seed, f"encoder/{spec.name}"):
                encoder = build_encoder(spec.kind, **spec.encoder)
            shared, rest = _split(encoder, spec.shared_stages)
            width = encoder.out_channels[-1]
            self.shared[spec.name] = shared
            if spec.name in self.students_of:
                with seeded(init_seed, f"student/{spec.name}"):
                    self.students[spec.name] = StudentBranch(rest, width, num_classes)
            if mode != "unimodal":
                with seeded(init_seed, f"teacher/{spec.name}"):
                    _, teacher_rests[spec.name] = _split(build_encoder(spec.kind, **spec.encoder), spec.shared_stages)
                widths[spec.name] = width
        self.teacher = None
        if mode != "unimodal":
            with seeded(init_seed, "teacher/fusion"):
                self.teacher = MultimodalBranch(teacher_rests, widths, num_classes, fusion or FusionConfig())

    @property
    def branches(self) -> list[str]:
        """Names of the branches whose logits forward() returns."""
        return list(self.students) + ([TEACHER] if self.teacher is not None else [])

    def forward(self, inputs: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits (B, num_classes) per branch: one per student modality and 'multimodal', plus the teacher's
        training-only stream heads as 'multimodal/<m>'."""
        shared = {m: self.shared[m](inputs[m]) for m in self.shared}
        valid = {m: (inputs[m] != 0) if self.kinds[m] == "text" else None for m in self.shared}
        logits = {m: branch(shared[m], valid[m]) for m, branch in self.students.items()}
        if self.teacher is not None:
            logits.update(self.teacher(shared, valid, present))
        return logits


def build_model(specs: list[ModalitySpec], num_classes: int, *, mode: str, fusion: FusionConfig | None = None,
                students: list[str] | None = None, init_seed: int = 0) -> CoTrainModel:
    """The model for one training mode; unimodal mode takes the single spec given."""
    return CoTrainModel(specs, num_classes, mode=mode, students=students, fusion=fusion, init_seed=init_seed)


@contextmanager
def seeded(seed: int, part: str):
    """Run the block with the global torch RNG seeded from (seed, part), then restore the RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}/{part}".encode()))
        yield

"""The co-trained model: shared early stages per modality, unimodal student branches, and a
multimodal Transformer teacher that fuses the tokens of every modality.

                       ┌─ student rest ─ pool ─ head ──────────────> logits[m]      (deployed alone)
    x[m] ─ shared[m] ──┤
                       └─ teacher rest[m] ─┬─ pool ─ stream head ──────────> logits["multimodal/<m>"]
                                           └─ proj + modality/pos emb ─┐
                                       (tokens of every modality) ─────┴─ Transformer ─ pool ─ head ─> "multimodal/transformer"

    logits["multimodal"] = late fusion of the streams + w * log_softmax(Transformer)   (w chosen on validation)

The teacher owns per-modality stages after the shared ones (as deep as the student's rest):
a fusion Transformer fed straight from shallow shared features is easily weaker than a
unimodal CNN, and transfer from a weaker teacher makes students worse. Each stream is trained like a
unimodal baseline, so their late fusion is the bar the teacher starts from; the Transformer's weight w is
chosen on each validation from fusion.transformer_weights (0 included), so on validation the teacher is
never below its own streams' late fusion.
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .encoders import (StagedEncoder, Stages, TransformerStage, build_encoder, default_pool, masked_mean, pool_tokens,
                       tokens_of)
from .tasks import TASKS, late_fusion

__all__ = ["seeded", "ModalitySpec", "split_index", "StageLayout", "FusionConfig", "CoTrainModel", "StudentBranch",
           "MultimodalBranch", "MODES", "TASKS", "TEACHER", "TRANSFORMER", "LATE_FUSION", "build_model", "encoder_width", "combine_teacher"]

MODES = ("cotrain", "unimodal", "multimodal")
TEACHER = "multimodal"
TRANSFORMER = f"{TEACHER}/transformer"
"""The fusion Transformer's own output (with fusion.late_fusion), trained by its own task loss."""
LATE_FUSION = f"{TEACHER}/late_fusion"
"""The late fusion of the teacher's streams (with fusion.late_fusion); trained only where its gates are learned."""
POOLINGS = ("mean", "cls")
POOLS = ("mean", "max", "attention")
"""How a unimodal branch pools its tokens (ModalitySpec.pool)."""
LATE_FUSION_WEIGHTS = ("equal", "learned")


@dataclass
class ModalitySpec:
    """One modality as the model sees it."""

    name: str
    kind: str
    encoder: dict = field(default_factory=dict)
    """Keyword arguments of the registered encoder (widths, vocab_size, in_channels...)."""
    shared_stages: int = 1
    """How many of the encoder's first stages the unimodal and multimodal branches share (0 = none: the
    branches meet only through knowledge transfer)."""
    encoder_name: str | None = None
    """Registered encoder of this kind (model/encoders.py ENCODERS); None = the kind's default."""
    pool: str | None = None
    """How the unimodal branch pools its tokens: 'mean', 'max' or 'attention' (a learned softmax over tokens,
    which attention-level transfer can then align with the teacher's); None = the encoder's default
    (model/encoders.py default_pool: max for the from-scratch cnn3d, mean otherwise). The teacher's stream of
    this modality pools the same way ('attention' streams by mean)."""
    share_until: str | None = None
    """Share the encoder's stages up to and including the one of this name (its `stage_names`, e.g. layer2);
    set, it decides shared_stages (resolved when the spec is made)."""
    freeze: str | int | list | None = None
    """Stages that do not train: a stage name or count (that stage and every one before it), or a list of
    stage names. Applied to the optimizer's parameter groups (ops/train.py)."""
    lr_mult: float | None = None
    """Learning-rate multiplier of this encoder's pretrained stages; None = optim.pretrained_lr_mult."""

    def __post_init__(self):
        if self.pool is None:
            self.pool = default_pool(self.kind, self.encoder_name)
        if self.share_until is not None:
            self.shared_stages = split_index(self, self._stage_names())

    def _stage_names(self) -> list[str] | None:
        with torch.device("meta"):  # only the names: no memory, no weights read, no RNG drawn
            return self.build_encoder(load_weights=False).stage_names

    def build_encoder(self, load_weights: bool = True) -> StagedEncoder:
        """The encoder; `load_weights=False` skips reading pretrained weights (a state dict is loaded next)."""
        return build_encoder(self.kind, self.encoder_name, load_weights=load_weights, **self.encoder)


def split_index(spec: ModalitySpec, stage_names: list[str] | None) -> int:
    """How many stages `spec.share_until` shares: the named stage and every one before it."""
    where = f"encoders.{spec.name}.share_until={spec.share_until!r}"
    if not stage_names:
        raise ValueError(f"{where}: the {spec.kind} encoder {spec.encoder_name or '(default)'} has no stage names; "
                         "give shared_stages (a count) instead, or choose an encoder with named stages")
    if spec.share_until not in stage_names:
        raise ValueError(f"{where} is not a stage of the {spec.kind} encoder {spec.encoder_name or '(default)'}; "
                         f"valid names: {', '.join(stage_names)}")
    return stage_names.index(spec.share_until) + 1


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
    stream_label_smoothing: float = 0.0
    """Label smoothing of the stream losses. 0 trains each stream as its unimodal baseline is trained. A trade-off
    measured in docs/results-protocol.md: 0.2 makes the teacher stronger where a modality can show another class
    outright (the demo corpus, seed 0: multimodal from scratch 84.4% val against 74.4%) and on eval-8 (co-trained
    teacher 88.9 against 86.4), but its softer targets cost the students there (eval-8 video +2.9 against +8.4,
    audio -1.1 against +0.9, one seed -9.3); 0 is what the protocol's evaluation corpora were measured with."""
    late_fusion: bool = True
    """Combine the Transformer with the product of the per-modality streams' (detached) predictions (beyond the
    paper): teacher = late fusion + w * Transformer, with w chosen from transformer_weights on validation.
    Streams trained by their own losses are unimodal experts, and their product is the baseline every
    multimodal model must beat; a fusion Transformer alone overfits (on a 10-class video + audio corpus it
    scored 8 points below late fusion of the unimodal baselines), and with w = 0 on the menu the teacher is
    never worse on validation than its own streams' late fusion. Needs stream_loss."""
    transformer_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 8.0)
    """With late_fusion: the weights w of the Transformer's log-probabilities (its logits for independent
    labels, its prediction for regression, where the result is (late fusion + w * Transformer) / (1 + w))
    that each validation chooses from, by the teacher's validation score (ties: the first). The Transformer is
    trained by its own task loss whatever w is. Until the first validation w is the first value
    (0: the streams' late fusion alone, no Transformer). One value fixes w."""
    detach_streams: bool = True
    """Feed the Transformer a stop-gradient copy of each stream's tokens, so the streams are trained by
    their own losses alone and the fusion cannot pull a slow modality's stream off course."""
    modality_dropout: float = 0.0
    """In training, the probability of hiding each modality from the teacher per sample (one always stays).
    It keeps the teacher from leaning on the modality it fits first, so it stays stronger than every student."""
    pooling: str = "mean"
    """How the Transformer's tokens become one vector: 'mean' over present tokens, or a learned 'cls' token."""
    modality_embedding: bool = True
    """Add a learned embedding per modality to its tokens."""
    position_embedding: bool = True
    """Add a learned position embedding (per modality, by token index) to the tokens."""
    teacher_stages: int | None = None
    """How many encoder stages the teacher owns per modality after the shared ones; None = as many as the
    student's rest (the default), fewer makes the teacher's streams shallower (at least 1 when nothing is shared)."""
    cross_layers: int = 0
    """Cross-attention blocks before the self-attention ones: each modality's tokens attend to the tokens of
    the other present modalities (the authors' earlier fusion). 0 = none."""
    late_fusion_weights: str = "equal"
    """How late fusion weighs the streams: 'equal' (a plain product of experts, or the plain mean for
    regression) or 'learned': per sample, a linear gate on each stream's own (detached) pooled features
    scores how far to trust that stream, and a softmax over the present streams turns the scores into
    weights, trained by the late fusion's own task loss. Its gates start at zero, so it starts as 'equal'. Beyond the
    paper; for regression, where a plain mean adds the weak streams' errors (docs/shards.md, sentiment)."""
    student_shared_grad: float = 1.0
    """Scale of the gradient the students' losses send into the shared stages: 1 = both paths train them (the
    paper), 0 = the teacher alone shapes them and each student adapts its own stages to them. Measured in
    docs/results.md (emotion, where sharing cost the teacher accuracy)."""
    assemble: bool = False
    """With late_fusion and equal weights (beyond the paper; off, measured): keep each teacher part's weights from
    its own best validation epoch (every stream, as a unimodal baseline is kept, and the Transformer), choose w
    again on validation for their assembly, and score the teacher that way where it beats the teacher of the single
    best epoch on validation (ops/assemble.py). Built because at one epoch for all the streams trailed their
    baselines (eval-30: video 70.9 vs 72.6, audio 53.2 vs 55.6) and the teacher from scratch fell below late fusion
    of the baselines. On the development members it changed the teacher by -0.04 points (test, mean of 18 runs:
    dev-5, dev-10, dev-20, from scratch and co-trained, 3 seeds) with swings of -3.0 and +3.4 on single seeds:
    chosen on a few hundred validation samples, the assembly is no better than the epoch chosen for how the experts
    combine (docs/results-assemble.md)."""

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"fusion.pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.teacher_stages is not None and self.teacher_stages < 0:
            raise ValueError(f"fusion.teacher_stages must be >= 0 or None, got {self.teacher_stages}")
        if self.cross_layers < 0:
            raise ValueError(f"fusion.cross_layers must be >= 0, got {self.cross_layers}")
        if not 0 <= self.modality_dropout < 1:
            raise ValueError(f"fusion.modality_dropout must be in [0, 1), got {self.modality_dropout}")
        if self.late_fusion_weights not in LATE_FUSION_WEIGHTS:
            raise ValueError(f"fusion.late_fusion_weights must be one of {', '.join(LATE_FUSION_WEIGHTS)}, "
                             f"got {self.late_fusion_weights!r}")
        self.transformer_weights = tuple(float(w) for w in self.transformer_weights)
        if not self.transformer_weights or min(self.transformer_weights) < 0:
            raise ValueError(f"fusion.transformer_weights must be one or more weights >= 0, "
                             f"got {list(self.transformer_weights)}")
        if not 0 <= self.student_shared_grad <= 1:
            raise ValueError(f"fusion.student_shared_grad must be in [0, 1], got {self.student_shared_grad}")


def _split(encoder: StagedEncoder, shared_stages: int) -> tuple[Stages, Stages]:
    if not 0 <= shared_stages < len(encoder.stages):
        raise ValueError(
            f"shared_stages={shared_stages} for a {encoder.kind} encoder with {len(encoder.stages)} stages; "
            f"choose 0..{len(encoder.stages) - 1} so every branch keeps at least one stage of its own"
        )
    return Stages(encoder.stages[:shared_stages]), Stages(encoder.stages[shared_stages:])


def _teacher_rest(encoder: StagedEncoder, spec: ModalitySpec, fusion: FusionConfig) -> tuple[Stages, int]:
    """The teacher's own stages of one modality and their output width (fusion.teacher_stages of them)."""
    _, rest = _split(encoder, spec.shared_stages)
    if fusion.teacher_stages is None:
        return rest, encoder.out_channels[-1]
    own = fusion.teacher_stages
    if own > len(rest) or (own == 0 and spec.shared_stages == 0):
        raise ValueError(f"fusion.teacher_stages={own} for {spec.name!r}: choose {int(spec.shared_stages == 0)}.."
                         f"{len(rest)} (its encoder has {len(rest)} stages after the {spec.shared_stages} shared)")
    return Stages(rest[:own]), encoder.out_channels[spec.shared_stages + own - 1]


def _last_transformer(module: nn.Module) -> TransformerStage | None:
    """The last self-attention block of `module` that exposes its attention (TransformerStage or a library
    backbone's layer wrapped to do the same), or None."""
    blocks = [m for m in module.modules() if getattr(m, "exposes_attention", False)]
    return blocks[-1] if blocks else None


def _query_mean(attention: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, Lq, Lk) attention -> (B, Lk): the mean over the valid queries of where they attend."""
    if valid is None:
        return attention.mean(dim=1)
    w = valid.to(attention.dtype)[..., None]
    return (attention * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


class StudentBranch(nn.Module):
    """The unimodal branch after the shared stages: its own stages, pooling (mean or attention), a linear head."""

    def __init__(self, rest: nn.Module, width: int, num_classes: int, pool: str = "mean"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"a modality's pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.rest = rest
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        self.score = nn.Linear(width, 1) if pool == "attention" else None
        self.pool = pool

    def encode(self, shared: torch.Tensor, valid: torch.Tensor | None,
               want_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pooled, normalised feature (B, C) and, if asked and the branch has one, its attention over its
        own tokens (B, L): the attention-pooling weights, else the last self-attention block's (mean over queries)."""
        block = _last_transformer(self.rest) if want_attention and self.score is None else None
        if block is not None:
            block.record_attention = True
        try:
            tokens = tokens_of(self.rest(shared, valid))  # (B, L, C)
        finally:
            if block is not None:
                block.record_attention = False
        attention = None
        if self.score is not None:
            scores = self.score(tokens).squeeze(-1)  # (B, L)
            if valid is not None:
                scores = scores.masked_fill(~_first_kept(valid), float("-inf"))
            attention = torch.softmax(scores, dim=-1)
            pooled = (attention.unsqueeze(-1) * tokens).sum(dim=1)
        else:
            pooled = pool_tokens(tokens, valid, self.pool)
            if block is not None:
                attention = _query_mean(block.attention, valid)
        return self.norm(pooled), attention

    def forward(self, shared: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.encode(shared, valid)[0])


def _first_kept(keep: torch.Tensor) -> torch.Tensor:
    """Keep at least the first token of rows that keep none, so attention never divides by zero (NaN)."""
    first = keep[:, :1] | ~keep.any(dim=1, keepdim=True)  # out of place, so the branch exports to ONNX
    return torch.cat([first, keep[:, 1:]], dim=1)


class _CrossAttention(nn.Module):
    """Each modality's tokens attend to the tokens of the other present modalities (one block per modality)."""

    def __init__(self, order: list[str], cfg: FusionConfig):
        super().__init__()
        self.order = order
        self.blocks = nn.ModuleDict({m: nn.TransformerDecoderLayer(
            cfg.dim, cfg.heads, dim_feedforward=2 * cfg.dim, dropout=cfg.dropout, batch_first=True, norm_first=True)
            for m in order})

    def forward(self, tokens: list[torch.Tensor], keep: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, m in enumerate(self.order):
            others = [j for j in range(len(self.order)) if j != i]
            if not others:
                out.append(tokens[i])
                continue
            memory = torch.cat([tokens[j] for j in others], dim=1)
            memory_keep = torch.cat([keep[j] for j in others], dim=1)
            attended = self.blocks[m](tokens[i], memory, tgt_key_padding_mask=~_first_kept(keep[i]),
                                      memory_key_padding_mask=~_first_kept(memory_keep))
            # a sample with no other modality present keeps its tokens as they were
            out.append(torch.where(memory_keep.any(dim=1)[:, None, None], attended, tokens[i]))
        return out


class MultimodalBranch(nn.Module):
    """Per-modality stages of its own, then one Transformer over the tokens of all modalities."""

    def __init__(self, rests: dict[str, nn.Module], widths: dict[str, int], num_classes: int, cfg: FusionConfig,
                 task: str = "class", pools: dict[str, str] | None = None):
        super().__init__()
        self.order = list(rests)
        # each stream pools like its modality's student ('attention' has no scorer here: mean)
        self.stream_pools = {m: "max" if (pools or {}).get(m) == "max" else "mean" for m in self.order}
        self.rests = nn.ModuleDict(rests)
        self.proj = nn.ModuleDict({m: nn.Linear(widths[m], cfg.dim) for m in self.order})
        self.modality_embed = nn.Parameter(torch.randn(len(self.order), cfg.dim) * 0.02) \
            if cfg.modality_embedding else None
        self.pos_embed = nn.Parameter(torch.randn(cfg.max_tokens, cfg.dim) * 0.02) if cfg.position_embedding else None
        self.max_tokens = cfg.max_tokens
        block = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, dim_feedforward=2 * cfg.dim, dropout=cfg.dropout, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_classes)
        self.modality_dropout = cfg.modality_dropout
        self.stream_heads = nn.ModuleDict({m: _stream_head(widths[m], num_classes) for m in self.order}) \
            if cfg.stream_loss else None
        if cfg.late_fusion and not cfg.stream_loss:
            raise ValueError("fusion.late_fusion needs fusion.stream_loss: the streams' own losses train the experts")
        self.late_fusion = cfg.late_fusion
        self.transformer_weights = cfg.transformer_weights
        self.detach_streams = cfg.detach_streams
        self.task = task
        # options beyond the defaults are built last, so the default parts' initial weights never move
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02) if cfg.pooling == "cls" else None
        self.cross = _CrossAttention(self.order, cfg) if cfg.cross_layers else None
        if self.cross is not None and cfg.cross_layers > 1:
            self.cross = nn.ModuleList([self.cross] + [_CrossAttention(self.order, cfg)
                                                       for _ in range(cfg.cross_layers - 1)])
        self.stream_gates = nn.ModuleDict({m: _zero_linear(widths[m], 1) for m in self.order}) \
            if cfg.late_fusion and cfg.late_fusion_weights == "learned" else None
        # the Transformer's weight in the teacher, chosen on validation (a buffer: saved with the best weights)
        self.register_buffer("transformer_weight", torch.tensor(cfg.transformer_weights[0]))

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

    def _stream(self, i: int, m: str, shared: torch.Tensor, valid: torch.Tensor | None, gates: dict):
        """(B, L_m, D) embedded tokens of modality m, and its stream logits (or None); fills gates[m], the
        stream's late-fusion gate score (B, 1), when the weights are learned."""
        tokens = tokens_of(self.rests[m](shared, valid))  # (B, L_m, C_m)
        length = tokens.shape[1]
        if self.pos_embed is not None and length > self.max_tokens:
            raise ValueError(f"modality {m!r} yields {length} tokens; raise fusion.max_tokens to at least {length}")
        stream = None
        if self.stream_heads is not None:  # gates exist only with stream heads (late fusion needs stream_loss)
            pooled = pool_tokens(tokens, valid, self.stream_pools[m])
            stream = self.stream_heads[m](pooled)
            if self.stream_gates is not None:
                gates[m] = self.stream_gates[m](pooled.detach())
        fused_in = tokens.detach() if self.detach_streams else tokens
        embedded = self.proj[m](fused_in)
        if self.modality_embed is not None:
            embedded = embedded + self.modality_embed[i]
        if self.pos_embed is not None:
            embedded = embedded + self.pos_embed[:length]
        return embedded, stream

    def _cross_attend(self, tokens: list, keep: list) -> list:
        for layer in (self.cross if isinstance(self.cross, nn.ModuleList) else [self.cross]):
            tokens = layer(tokens, keep)
        return tokens

    def forward(self, shared: dict, valid: dict, present: dict, extras: dict | None = None) -> dict[str, torch.Tensor]:
        """{"multimodal": fused logits, "multimodal/<m>": stream logits per modality (when enabled)}. With an
        `extras` dict, also fills extras["feature"] (B, D) and extras["attention"][m] (B, L_m): the last block's
        attention over modality m's tokens (mean over heads and queries, renormalised over m's tokens)."""
        if self.training and self.modality_dropout > 0:
            present = self._drop_modalities(present)
        tokens, keep, out, gates = [], [], {}, {}
        for i, m in enumerate(self.order):
            t, stream = self._stream(i, m, shared[m], valid[m], gates)
            if stream is not None:
                out[f"{TEACHER}/{m}"] = stream
            k = present[m][:, None].expand(-1, t.shape[1])
            tokens.append(t)
            keep.append(k & valid[m] if valid[m] is not None else k)
        if self.cross is not None:
            tokens = self._cross_attend(tokens, keep)
        lengths = [t.shape[1] for t in tokens]
        x, keep_all = torch.cat(tokens, dim=1), torch.cat(keep, dim=1)  # (B, L, D), (B, L)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
            keep_all = torch.cat([torch.ones_like(keep_all[:, :1]), keep_all], dim=1)
        # A sample with no modality at all would make attention NaN; let it attend to its first token.
        keep_all = _first_kept(keep_all)
        captured = self._capture_last_block_input() if extras is not None else None
        try:
            x = self.blocks(x, src_key_padding_mask=~keep_all)
        finally:
            if captured is not None:
                captured["handle"].remove()
        pooled = self.norm(x[:, 0] if self.cls is not None else masked_mean(x, keep_all))
        transformer = self.head(pooled)
        if self.late_fusion:
            out[TRANSFORMER] = transformer
            out[LATE_FUSION] = self._late_fusion(out, present, gates)
            out[TEACHER] = combine_teacher(out[LATE_FUSION], transformer, self.transformer_weight, self.task)
        else:
            out[TEACHER] = transformer
        if extras is not None:
            extras["feature"] = pooled
            extras["attention"] = self._attention_per_modality(captured["input"], keep_all, lengths)
        return out

    def _capture_last_block_input(self) -> dict:
        captured = {}

        def hook(_module, args, kwargs=None):
            captured["input"] = args[0]

        captured["handle"] = self.blocks.layers[-1].register_forward_pre_hook(hook)
        return captured

    def _attention_per_modality(self, block_input: torch.Tensor, keep_all: torch.Tensor,
                                lengths: list[int]) -> dict[str, torch.Tensor]:
        """Recompute the last block's attention weights from its input (the output path stays the fused kernel)."""
        layer = self.blocks.layers[-1]
        h = layer.norm1(block_input) if layer.norm_first else block_input
        _, weights = layer.self_attn(h, h, h, key_padding_mask=~keep_all, need_weights=True,
                                     average_attn_weights=True)  # (B, L, L)
        over_keys = weights[:, 0] if self.cls is not None else _query_mean(weights, keep_all)  # (B, L)
        start, result = (1 if self.cls is not None else 0), {}
        for m, length in zip(self.order, lengths):
            part = over_keys[:, start:start + length]
            result[m] = part / part.sum(dim=-1, keepdim=True).clamp_min(1e-12)
            start += length
        return result

    def _late_fusion(self, out: dict, present: dict, gates: dict) -> torch.Tensor:
        """The streams' (detached) joint prediction: a product of experts for classes (sum of log-probs) and for
        independent labels (sum of logits), the mean of the present streams for regression. With learned
        gates each present stream is weighted by its gate's softmax share (times the number of present
        streams for a product, so equal gates give the plain product)."""
        preds = torch.stack([out[f"{TEACHER}/{m}"].detach() for m in self.order])  # (M, B, K)
        mask = torch.stack([present[m] for m in self.order])[..., None].to(preds.dtype)  # (M, B, 1)
        if not gates:
            return late_fusion(preds, mask, self.task)
        if self.task == "class":
            preds = torch.log_softmax(preds, dim=-1)
        count = mask.sum(dim=0).clamp_min(1.0)
        scores = torch.stack([gates[m] for m in self.order]).masked_fill(mask == 0, -1e9)
        weights = torch.softmax(scores, dim=0) * mask  # (M, B, 1), summing to 1 over the present streams
        if self.task != "regression":
            weights = weights * count
        return (preds * weights).sum(dim=0)


def combine_teacher(fused: torch.Tensor, transformer: torch.Tensor, weight: torch.Tensor | float,
                    task: str) -> torch.Tensor:
    """The teacher's output: late fusion of its streams plus `weight` times the Transformer's log-probabilities
    (classes; its logits for independent labels), or their weighted mean for regression."""
    if task == "regression":
        return (fused + weight * transformer) / (1 + weight)
    return fused + weight * (torch.log_softmax(transformer, dim=-1) if task == "class" else transformer)


def _stream_head(width: int, num_classes: int) -> nn.Sequential:
    """A stream's head, as a student's (StudentBranch: LayerNorm, then Linear over the pooled tokens), so that
    each stream trains like its unimodal baseline."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))


def _zero_linear(width: int, out: int) -> nn.Linear:
    """A linear layer that starts at zero output (a gate that starts neutral)."""
    layer = nn.Linear(width, out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class CoTrainModel(nn.Module):
    """Shared stages per modality, students for `students`, and the teacher unless mode is unimodal.

    `students` names the modalities that get a unimodal branch; the others feed only the teacher (a modality
    available in training but not at deployment). `feature_transfer` adds each student's projection to the
    teacher's feature width, which the feature-level transfer term needs."""

    def __init__(self, specs: list[ModalitySpec], num_classes: int, *, mode: str = "cotrain",
                 students: list[str] | None = None, fusion: FusionConfig | None = None, init_seed: int = 0,
                 task: str = "class", feature_transfer: bool = False, load_weights: bool = True):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
        names = [s.name for s in specs]
        unknown = sorted(set(students or []) - set(names))
        if unknown:
            raise ValueError(f"students {unknown} are not among the modalities {names}; pass --students as a "
                             "comma-separated subset of --modalities")
        fusion = fusion or FusionConfig()
        self.mode, self.kinds, self.task = mode, {s.name: s.kind for s in specs}, task
        self.student_shared_grad = fusion.student_shared_grad
        self.students_of = [] if mode == "multimodal" else [m for m in names if m in (students or names)]
        if mode == "unimodal" and len(specs) != 1:
            raise ValueError(f"mode 'unimodal' trains one modality; got {names}")
        if mode == "cotrain" and not self.students_of:
            raise ValueError("mode 'cotrain' needs at least one student modality; use --mode multimodal instead")
        self.shared = nn.ModuleDict()
        self.students = nn.ModuleDict()
        teacher_rests, widths = {}, {}
        # Each part draws its initial weights from its own seed, so a branch starts from the same weights
        # in every mode: co-trained and baseline runs of one seed are paired, not just equally random.
        self.stage_layout: dict[str, StageLayout] = {}
        for spec in specs:
            with seeded(init_seed, f"encoder/{spec.name}"):
                encoder = spec.build_encoder(load_weights)
            self.stage_layout[spec.name] = StageLayout.of(encoder, spec)
            shared, rest = _split(encoder, spec.shared_stages)
            width = encoder.out_channels[-1]
            self.shared[spec.name] = shared
            if spec.name in self.students_of:
                with seeded(init_seed, f"student/{spec.name}"):
                    self.students[spec.name] = StudentBranch(rest, width, num_classes, spec.pool)
            if mode != "unimodal":
                with seeded(init_seed, f"teacher/{spec.name}"):
                    teacher_encoder = spec.build_encoder(load_weights)
                teacher_rests[spec.name], widths[spec.name] = _teacher_rest(teacher_encoder, spec, fusion)
        self.teacher = None
        if mode != "unimodal":
            with seeded(init_seed, "teacher/fusion"):
                self.teacher = MultimodalBranch(teacher_rests, widths, num_classes, fusion, task,
                                                {s.name: s.pool for s in specs})
        self.feature_proj = None
        if feature_transfer and self.teacher is not None and self.students:
            self.feature_proj = nn.ModuleDict()
            for spec in specs:
                if spec.name in self.students:
                    with seeded(init_seed, f"transfer/features/{spec.name}"):
                        self.feature_proj[spec.name] = nn.Linear(encoder_width(spec), fusion.dim)

    def encoder_parameters(self, modality: str) -> list[tuple[int, str, nn.Parameter]]:
        """(stage index, name, parameter) of every encoder stage of `modality` in this model: the shared stages,
        the student's own and the teacher's own copies of the stages after the split."""
        split = self.stage_layout[modality].split
        parts = [(f"shared.{modality}", self.shared[modality], 0)]
        if modality in self.students:
            parts.append((f"students.{modality}.rest", self.students[modality].rest, split))
        if self.teacher is not None and modality in self.teacher.rests:
            parts.append((f"teacher.rests.{modality}", self.teacher.rests[modality], split))
        found = []
        for prefix, stages, offset in parts:
            for i, stage in enumerate(stages):
                found += [(offset + i, f"{prefix}.{i}.{n}", p) for n, p in stage.named_parameters()]
        return found

    def teacher_candidates(self, logits: dict[str, torch.Tensor]) -> dict[float, torch.Tensor]:
        """The teacher's output under each of fusion.transformer_weights (empty without late fusion or with one
        weight): what a validation scores to choose the weight."""
        teacher = self.teacher
        if teacher is None or not teacher.late_fusion or len(teacher.transformer_weights) < 2:
            return {}
        return {w: combine_teacher(logits[LATE_FUSION], logits[TRANSFORMER], w, self.task)
                for w in teacher.transformer_weights}

    def set_transformer_weight(self, weight: float) -> None:
        """Use `weight` for the Transformer in the teacher's output from now on (saved with the weights)."""
        self.teacher.transformer_weight.fill_(weight)

    def branch_of(self, name: str) -> str:
        """The branch a parameter (by its name in this model) belongs to, for clipping each branch on its own:
        a student, with the shared stages it deploys with ('rgb'); a teacher stream ('multimodal/rgb', also
        owning the shared stages when that modality has no student); the rest of the teacher ('multimodal')."""
        parts = name.split(".")
        if parts[0] == "shared":
            m = parts[1]
            return m if m in self.students else f"{TEACHER}/{m}"
        if parts[0] in ("students", "feature_proj"):
            return parts[1]
        if parts[0] == "teacher" and parts[1] in ("rests", "stream_heads"):
            return f"{TEACHER}/{parts[2]}"
        return TEACHER

    @property
    def teacher_parts(self) -> list[str]:
        """The parts of the teacher whose best validation weights training keeps, to assemble it from them
        (fusion.assemble): its streams ("multimodal/<m>") and the Transformer. Empty where the teacher is not late
        fusion of equally weighted streams plus a Transformer."""
        teacher = self.teacher
        if teacher is None or not teacher.late_fusion or teacher.stream_gates is not None:
            return []
        return [f"{TEACHER}/{m}" for m in teacher.order] + [TRANSFORMER]

    def stream_state(self, state: dict[str, torch.Tensor], stream: str) -> dict[str, torch.Tensor]:
        """The entries of `state` that decide a teacher stream's output ("multimodal/<m>"): modality m's shared
        stages, the teacher's own stages for m and its stream head. Streams share none of them."""
        m = stream.removeprefix(f"{TEACHER}/")
        prefixes = (f"shared.{m}.", f"teacher.rests.{m}.", f"teacher.stream_heads.{m}.")
        return {k: v for k, v in state.items() if k.startswith(prefixes)}

    @property
    def branches(self) -> list[str]:
        """Names of the branches whose logits forward() returns."""
        return list(self.students) + ([TEACHER] if self.teacher is not None else [])

    def valid_masks(self, inputs: dict[str, torch.Tensor],
                    lengths: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor | None]:
        """(B, L) real-token masks: text ids != 0, features steps < length; None where every step counts."""
        valid = {}
        for m, x in inputs.items():
            if self.kinds.get(m) == "text":
                valid[m] = x != 0
            elif self.kinds.get(m) == "features" and lengths and m in lengths:
                valid[m] = torch.arange(x.shape[1], device=x.device)[None] < lengths[m].to(x.device)[:, None]
            else:
                valid[m] = None
        return valid

    def forward(self, inputs: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                lengths: dict[str, torch.Tensor] | None = None, extras: bool = False):
        """Logits (B, num_classes) per branch: one per student modality and 'multimodal', plus the teacher's
        training-only stream heads as 'multimodal/<m>'. With extras=True, returns (logits, extras) where
        extras = {"feature": {branch: (B, D)}, "attention": {branch: (B, L_m)}} holds what the feature- and
        attention-level transfer terms compare (teacher entries keyed 'multimodal/<m>' for attention)."""
        valid = self.valid_masks({m: inputs[m] for m in self.shared}, lengths)
        shared = {m: self.shared[m](inputs[m], valid[m]) for m in self.shared}
        seen = {m: _scale_grad(shared[m], self.student_shared_grad) for m in self.students}  # the students' view
        if not extras:
            logits = {m: branch(seen[m], valid[m]) for m, branch in self.students.items()}
            if self.teacher is not None:
                logits.update(self.teacher(shared, valid, present))
            return logits
        logits, found = {}, {"feature": {}, "attention": {}}
        for m, branch in self.students.items():
            pooled, attention = branch.encode(seen[m], valid[m], want_attention=True)
            logits[m] = branch.head(pooled)
            if self.feature_proj is not None:
                found["feature"][m] = self.feature_proj[m](pooled)
            if attention is not None:
                found["attention"][m] = attention
        if self.teacher is not None:
            teacher_extras = {}
            logits.update(self.teacher(shared, valid, present, extras=teacher_extras))
            found["feature"][TEACHER] = teacher_extras["feature"]
            found["attention"].update({f"{TEACHER}/{m}": a for m, a in teacher_extras["attention"].items()})
        return logits, found


@dataclass(frozen=True)
class StageLayout:
    """One modality's encoder as the optimizer sees it: stage names, how many stages hold pretrained weights,
    where the split is."""

    names: list[str]
    pretrained: int
    split: int

    @classmethod
    def of(cls, encoder: StagedEncoder, spec: ModalitySpec) -> "StageLayout":
        names = encoder.stage_names or [str(i) for i in range(len(encoder.stages))]
        return cls(list(names), encoder.pretrained_stages, spec.shared_stages)


def _scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x itself in the forward pass; its gradient times `scale` in the backward pass."""
    return x if scale == 1 else x * scale + x.detach() * (1 - scale)


def encoder_width(spec: ModalitySpec) -> int:
    """Width of the encoder's last stage (builds it once on the meta device: no memory, no RNG)."""
    with torch.device("meta"):
        return spec.build_encoder().out_channels[-1]


def build_model(specs: list[ModalitySpec], num_classes: int, *, mode: str, fusion: FusionConfig | None = None,
                students: list[str] | None = None, init_seed: int = 0, task: str = "class",
                feature_transfer: bool = False, load_weights: bool = True) -> CoTrainModel:
    """The model for one training mode; unimodal mode takes the single spec given. `load_weights=False`
    leaves pretrained encoders unread (a state dict is loaded next)."""
    return CoTrainModel(specs, num_classes, mode=mode, students=students, fusion=fusion, init_seed=init_seed,
                        task=task, feature_transfer=feature_transfer, load_weights=load_weights)


@contextmanager
def seeded(seed: int, part: str):
    """Run the block with the global torch RNG seeded from (seed, part), then restore the RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}/{part}".encode()))
        yield

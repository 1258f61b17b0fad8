"""One typed run config; the DeepSpeed JSON is derived from it and never kept by hand elsewhere."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from model.cotrain import MODES, FusionConfig
from model.losses import TransferConfig
from pipeline.config import LoaderConfig

__all__ = ["OptimConfig", "MetricsConfig", "RunConfig", "deepspeed_config", "save_config", "load_config"]


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay; every mode uses the same schedule.

    A constant learning rate made co-training collapse on some seeds (shared/NOTES.md)."""

    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay."""
    warmup_fraction: float = 0.05
    """Fraction of all steps spent warming the learning rate up linearly."""
    min_lr_ratio: float = 0.01
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"optim.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass
class MetricsConfig:
    """The Prometheus exporter each rank serves while training."""

    port: int = 9400
    """Base port; rank r serves on port + local rank. 0 disables the exporter."""
    host: str = "127.0.0.1"
    """Address to bind; loopback unless you mean to expose it."""


@dataclass
class RunConfig:
    """Everything one training run needs; saved as RUN/config.json."""

    shards: str
    """Directory written by `cotrain shards build`."""
    out: str
    """Run directory: checkpoint, config, evaluations."""
    mode: str = "cotrain"
    """cotrain (teacher + students), unimodal (one modality alone) or multimodal (teacher alone)."""
    modalities: list[str] = field(default_factory=list)
    """Modalities to use; empty = all in the dataset (unimodal mode needs exactly one)."""
    epochs: int = 10
    """Passes over the training split."""
    seed: int = 0
    """Seeds model initialisation, shuffling and dropout."""
    shared_stages: int = 1
    """Encoder stages each modality shares between its unimodal branch and the teacher."""
    eval_every: int = 1
    """Validate every N epochs (and after the last); each branch keeps its best weights. 0 turns it off."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "unimodal" and len(self.modalities) != 1:
            raise ValueError(f"--mode unimodal trains one modality: pass --modalities NAME (got {self.modalities})")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A hash of the config, for telling runs apart and refusing mismatched resumes."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def deepspeed_config(cfg: RunConfig, *, total_steps: int, bf16: bool) -> dict:
    """The DeepSpeed JSON for this run. Only the micro-batch and accumulation are given, so the
    same config serves any world size (DeepSpeed derives train_batch_size)."""
    o = cfg.optim
    return {
        "train_micro_batch_size_per_gpu": cfg.loader.batch_size,
        "gradient_accumulation_steps": 1,
        # torch's AdamW (torch_adam): DeepSpeed's fused Adam would be compiled at start-up on CPU.
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "weight_decay": o.weight_decay, "betas": [0.9, 0.999],
                                                  "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total_steps, 1), "warmup_num_steps": max(1, int(o.warmup_fraction * total_steps)),
            "warmup_min_ratio": 0.0, "cos_min_ratio": o.min_lr_ratio, "warmup_type": "linear"}},
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": o.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def _build(cls, data: dict):
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = {"loader": LoaderConfig, "optim": OptimConfig, "transfer": TransferConfig,
               "fusion": FusionConfig, "metrics": MetricsConfig}.get(f.name) if cls is RunConfig else None
        kwargs[f.name] = _build(sub, value) if sub else value
    return cls(**kwargs)


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def load_config(path: Path) -> RunConfig:
    return _build(RunConfig, json.loads(Path(path).read_text()))

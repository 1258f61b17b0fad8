"""One typed run config; the DeepSpeed JSON is derived from it and never kept by hand elsewhere."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from model.cotrain import MODES, FusionConfig
from model.losses import TransferConfig
from model.tasks import TaskConfig
from pipeline.config import LoaderConfig

__all__ = ["OptimConfig", "MetricsConfig", "CheckpointConfig", "RunConfig", "deepspeed_config", "save_config",
           "load_config", "resolve_config", "parse_assignment", "read_config_file", "config_hash", "hashed_config",
           "config_differences"]


CLIP_SCOPES = ("branch", "global")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay; every mode uses the same schedule.

    A constant learning rate made co-training collapse on some seeds in our first measurements."""

    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay."""
    warmup_fraction: float = 0.05
    """Fraction of all steps spent warming the learning rate up linearly."""
    min_lr_ratio: float = 0.01
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables), applied as clip_scope says."""
    clip_scope: str = "global"
    """'global': one norm over the whole model (DeepSpeed's clipping); 'branch': each branch's norm on its own
    (each student with the shared stages it deploys with, each teacher stream, the rest of the teacher;
    ops/optimizer.py), so a branch takes the steps it would take trained alone. A unimodal run is one branch, so
    both clip it the same way. 'branch' was measured on dev-10 and not adopted (docs/results-protocol.md): the
    co-trained teacher gained, the multimodal model from scratch fell below late fusion."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. A partial group at the end of an epoch is stepped too, its loss
    rescaled so it is the mean over the micro-batches it has (DeepSpeed would carry it into the next epoch)."""
    offload_optimizer: bool = False
    """Keep the optimizer state in host memory (ZeRO-Offload; needs zero_stage >= 1)."""
    pretrained_lr_mult: float = 1.0
    """Learning-rate multiplier of encoder stages that hold pretrained weights (encoders.<m>.weights);
    encoders.<m>.lr_mult overrides it per encoder. New parameters train at lr."""
    layer_decay: float = 1.0
    """Layer-wise decay: pretrained stage i of P trains at pretrained_lr_mult * layer_decay ** (P - i), so stages
    near the input move least. 1 = off."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"optim.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        if self.clip_scope not in CLIP_SCOPES:
            raise ValueError(f"optim.clip_scope must be one of {', '.join(CLIP_SCOPES)}, got {self.clip_scope!r}")
        if self.pretrained_lr_mult <= 0:
            raise ValueError(f"optim.pretrained_lr_mult must be > 0 (freeze stages to stop them), "
                             f"got {self.pretrained_lr_mult}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay must be in (0, 1] (1 = off), got {self.layer_decay}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("optim.offload_optimizer needs ZeRO stage 1, 2 or 3: add --zero-stage 2")


@dataclass
class MetricsConfig:
    """The Prometheus exporter each rank serves while training."""

    port: int = 9400
    """Base port; rank r serves on port + local rank. 0 disables the exporter."""
    host: str = "127.0.0.1"
    """Address to bind; loopback unless you mean to expose it."""
    targets_dir: str = ""
    """Where each rank writes `<run>-rank-NNNNN.json` for Prometheus' file_sd ("" = RUN/prometheus-targets)."""


@dataclass
class CheckpointConfig:
    """Periodic checkpoints for resuming after a crash, a kill or a pre-emption."""

    save_every: int = 0
    """Save every N optimizer steps (0 = only on SIGTERM). Each checkpoint holds the DeepSpeed state
    (weights, optimizer, scheduler) and, per rank, the loader position and the RNG states."""
    keep: int = 2
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    max_bad_steps: int = 5
    """A step whose loss is NaN or infinite is skipped; this many in a row stop the run."""

    def __post_init__(self):
        if self.save_every < 0:
            raise ValueError(f"checkpoint.save_every must be >= 0, got {self.save_every}")
        if self.keep < 2:
            raise ValueError(f"checkpoint.keep must be >= 2 (the newest may be incomplete when a run dies), "
                             f"got {self.keep}")
        if self.max_bad_steps < 1:
            raise ValueError(f"checkpoint.max_bad_steps must be >= 1, got {self.max_bad_steps}")


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
    students: list[str] = field(default_factory=list)
    """Modalities that get a unimodal branch (empty = all); the others feed only the teacher."""
    encoders: dict = field(default_factory=dict)
    """Per modality kind or name: {"name", "shared_stages", "pool", **encoder options} (model/presets.py)."""
    cpu_threads: int = 0
    """torch compute threads per rank in CPU training; 0 = OMP_NUM_THREADS when set, else this machine's
    cores divided by the ranks on it (torch's own default, every core in every rank, oversubscribes the
    cores as soon as two ranks share a machine). Not part of the config hash: it changes speed, not the model
    (beyond float rounding)."""
    eval_every: int = 1
    """Validate every N epochs (and after the last); each branch keeps its best weights. 0 turns it off."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "unimodal" and len(self.modalities) != 1:
            raise ValueError(f"--mode unimodal trains one modality: pass --modalities NAME (got {self.modalities})")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0 (0 = cores / ranks on this machine), got {self.cpu_threads}")
        if self.mode == "cotrain" and self.transfer.gate == "stream_correct" and not self.fusion.stream_loss:
            raise ValueError("transfer.gate stream_correct (the default) reads the teacher's per-modality streams, "
                             "which fusion.stream_loss false removes: set transfer.gate teacher_correct, or keep "
                             "fusion.stream_loss true")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A hash of the config, for telling runs apart and refusing mismatched resumes."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def config_hash(cfg: RunConfig) -> str:
    """A hash of what decides the training math: a resume under another hash would not be the same run.
    Where the run lives, how it checkpoints and where it exports metrics are left out."""
    return hashlib.sha256(json.dumps(hashed_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


def hashed_config(cfg: RunConfig) -> dict:
    """The part of the config that config_hash covers (saved in each checkpoint to name what changed).
    Transfer settings only change a co-trained run: a baseline or a multimodal model trained with another
    transfer default is the same run, so a grid reuses it. fusion.assemble counts only when on: off, the default,
    is how every run was trained before the option existed, so those runs keep their hash."""
    left_out = {"out", "metrics", "checkpoint", "shards", "cpu_threads"}
    if cfg.mode != "cotrain":
        left_out.add("transfer")
    hashed = {k: v for k, v in cfg.to_dict().items() if k not in left_out}
    if not hashed["fusion"].get("assemble"):
        hashed["fusion"] = {k: v for k, v in hashed["fusion"].items() if k != "assemble"}
    return hashed


def config_differences(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts, as "key: old -> new", sorted."""
    found = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += config_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {json.dumps(old)} -> {json.dumps(new)}")
    return found


def deepspeed_config(cfg: RunConfig, *, total_steps: int, bf16: bool) -> dict:
    """The DeepSpeed JSON for this run. Only the micro-batch and accumulation are given, so the
    same config serves any world size (DeepSpeed derives train_batch_size)."""
    o = cfg.optim
    return {
        "train_micro_batch_size_per_gpu": cfg.loader.batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        # torch's AdamW (torch_adam): DeepSpeed's fused Adam would be compiled at start-up on CPU.
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "weight_decay": o.weight_decay, "betas": [0.9, 0.999],
                                                  "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total_steps, 1), "warmup_num_steps": max(1, int(o.warmup_fraction * total_steps)),
            "warmup_min_ratio": 0.0, "cos_min_ratio": o.min_lr_ratio, "warmup_type": "linear"}},
        # clip_scope 'branch' clips inside the optimizer (ops/engine.py build_engine), so DeepSpeed does not
        "gradient_clipping": o.grad_clip if o.clip_scope == "global" else 0.0,
        "branch_clipping": o.grad_clip if o.clip_scope == "branch" else 0.0,
        "zero_optimization": _zero_section(o),
        # offloaded or not, the optimizer stays torch's AdamW, so nothing is compiled at start-up
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def _zero_section(o: OptimConfig) -> dict:
    section = {"stage": o.zero_stage}
    if o.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return section


SECTIONS = {"loader": LoaderConfig, "optim": OptimConfig, "transfer": TransferConfig, "fusion": FusionConfig,
            "task": TaskConfig, "metrics": MetricsConfig, "checkpoint": CheckpointConfig}


def _build(cls, data: dict, where: str = ""):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                         f"valid keys{' of ' + where.rstrip('.') if where else ''}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        sub = SECTIONS.get(name) if cls is RunConfig else None
        kwargs[name] = _build(sub, value, f"{name}.") if sub else value
    return cls(**kwargs)


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")


def load_config(path: Path) -> RunConfig:
    return _build(RunConfig, json.loads(Path(path).read_text()))


def _defaults() -> dict:
    """RunConfig's defaults as a plain dict (shards and out have none)."""
    return {f.name: (dataclasses.asdict(f.default_factory()) if f.name in SECTIONS else f.default)
            for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING or f.name in SECTIONS}


def _merge(base: dict, layer: dict) -> dict:
    merged = dict(base)
    for key, value in layer.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
            else value
    return merged


def read_config_file(path: str | Path) -> dict:
    """A run config layer from JSON or YAML: any subset of RUN/config.json's keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found; write one with `cotrain config show --json > FILE`")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 -- json and yaml raise different types; both mean the same
        raise ValueError(f"config file {path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: "
                         f"{err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of config keys, got {type(data).__name__}")
    return _run_part(data)


SHOW_PLACEHOLDERS = {"shards": "SHARDS", "out": "RUN"}
"""What `cotrain config show` prints for --shards and --out when they are not given."""


def _run_part(data: dict) -> dict:
    """The run config of `cotrain config show --json` output ({run, deepspeed}), without its placeholders; any
    other mapping as it is. The DeepSpeed part is derived from the run config, so it is not read back."""
    if "run" not in data or not set(data) <= {"run", "deepspeed"} or not isinstance(data["run"], dict):
        return data
    return {k: v for k, v in data["run"].items() if SHOW_PLACEHOLDERS.get(k) != v}


def _coerce(text: str, current):
    """A command-line string as the type of the value it replaces."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if isinstance(current, float):
        return float(text)
    if isinstance(current, int):
        value = float(text)
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {text!r}")
        return int(value)
    if isinstance(current, (list, tuple)):
        return [v.strip() for v in text.split(",") if v.strip()]
    return text


def parse_assignment(assignment: str, base: dict) -> dict:
    """`optim.lr=1e-3` as a layer {"optim": {"lr": 0.001}}, typed like the value it replaces in `base`."""
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r}: write KEY=VALUE, for example --set optim.lr=1e-3")
    key, text = assignment.split("=", 1)
    parts, node = key.strip().split("."), base
    if parts[0] in FREE_FORM and len(parts) > 1:
        return {parts[0]: _nest(parts[1:], _free_value(text))}
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            valid = ", ".join(sorted(node)) if isinstance(node, dict) else "(none: not a section)"
            raise ValueError(f"--set {assignment!r}: unknown key {'.'.join(parts[:i + 1])!r}; valid here: {valid}")
        node = node[part] if i < len(parts) - 1 else node
    try:
        value = _coerce(text, node[parts[-1]]) if node[parts[-1]] is not None else text
    except ValueError as err:
        raise ValueError(f"--set {assignment!r}: {err}") from err
    return _nest(parts, value)


FREE_FORM = ("encoders",)
"""Sections whose keys are the user's (modality kinds or names, then encoder options): --set takes new keys there,
e.g. --set encoders.video.name=r3d_18."""


def _nest(parts: list[str], value) -> dict:
    layer = value
    for part in reversed(parts):
        layer = {part: layer}
    return layer


def _free_value(text: str):
    """A value with no current value to follow: JSON when it parses (2, 0.1, false, ["stem", "layer1"]), else the
    text itself (KINETICS400_V1, layer2, features.6)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def resolve_config(*, preset: dict | None = None, file: str | Path | None = None, cli: dict | None = None,
                   assignments: list[str] = ()) -> RunConfig:
    """Defaults, then the preset, then the config file, then the command line (options, then --set)."""
    data = _defaults()
    for layer in (preset or {}, read_config_file(file) if file else {}, cli or {}):
        data = _merge(data, layer)
    for assignment in assignments:
        data = _merge(data, parse_assignment(assignment, data))
    for required in ("shards", "out"):
        if not data.get(required):
            raise ValueError(f"no {required!r} given: pass --{required} or set it in the config file")
    return _build(RunConfig, data)

"""Shipping a unimodal branch: a standalone model (that modality's shared stages, its own rest, pooling and
head; no teacher, no other modality) saved as TorchScript, ONNX or a state dict, with everything `predict`
needs to preprocess raw media (the shards' and the loader's parameters, class names, the tokenizer) inside.

    run/model.pt ─ model_from_payload ─ CoTrainModel ─ unimodal_model(m) ─ UnimodalModel ─ export_model(fmt)
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .cotrain import CoTrainModel, FusionConfig, ModalitySpec, StudentBranch, _split, seeded
from .encoders import Stages

__all__ = ["FORMATS", "META_KEY", "model_from_payload", "UnimodalModel", "unimodal_model", "export_model",
           "load_exported", "ExportedModel", "export_run"]

FORMATS = ("torchscript", "onnx", "state_dict")
META_KEY = "cotrain.json"
STATE_FORMAT = "cotrain-unimodal-v1"


def model_from_payload(payload: dict) -> CoTrainModel:
    """Rebuild (without weights) the model a run's model.pt describes."""
    config = payload.get("config", {})
    specs = [ModalitySpec(**s) for s in payload["specs"]]
    return CoTrainModel(specs, payload["num_classes"], mode=payload["mode"], fusion=FusionConfig(**payload["fusion"]),
                        students=config.get("students") or None, task=config.get("task", {}).get("type", "class"),
                        feature_transfer=config.get("transfer", {}).get("feature", 0) > 0, load_weights=False)


class UnimodalModel(nn.Module):
    """One modality's deployable model: shared stages, then the student branch. forward(x) for video, depth,
    audio and text (ids, 0 = padding); forward(x, lengths) for feature sequences."""

    def __init__(self, shared: Stages, branch: StudentBranch, kind: str):
        super().__init__()
        self.shared, self.branch, self.kind = shared, branch, kind

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        valid = None
        if self.kind == "text":
            valid = x != 0
        elif self.kind == "features" and lengths is not None:
            valid = torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]
        return self.branch(self.shared(x, valid), valid)


def unimodal_model(model: CoTrainModel, modality: str) -> UnimodalModel:
    """The standalone model of `modality`, sharing (not copying) the full model's modules."""
    if modality not in model.students:
        have = ", ".join(model.students) or "none (a multimodal-only run)"
        raise ValueError(f"modality {modality!r} has no unimodal branch in this run; branches: {have}")
    return UnimodalModel(model.shared[modality], model.students[modality], model.kinds[modality]).eval()


def _build_unimodal(meta: dict) -> UnimodalModel:
    """An untrained UnimodalModel of the architecture `meta` describes (to load a state dict into)."""
    spec = ModalitySpec(**meta["spec"])
    with seeded(0, "export"):  # the weights are loaded next; seeding only keeps the global RNG untouched
        encoder = spec.build_encoder(load_weights=False)
        shared, rest = _split(encoder, spec.shared_stages)
        branch = StudentBranch(rest, encoder.out_channels[-1], meta["num_classes"], spec.pool)
    return UnimodalModel(shared, branch, spec.kind).eval()


def _example_inputs(meta: dict) -> tuple[torch.Tensor, ...]:
    """A one-sample input of the shape the loader gives this modality."""
    spec, kind = meta["source"], meta["spec"]["kind"]
    if kind in ("video", "depth"):
        channels = meta["spec"]["encoder"].get("in_channels", 3)
        return (torch.zeros(1, channels, int(spec["frames"]), int(spec["height"]), int(spec["width"])),)
    if kind == "audio" and _waveform(meta):
        return (torch.zeros(1, int(spec["samples"])),)
    if kind == "audio":
        frames = 1 + int(spec["samples"]) // int(int(spec["sample_rate"]) * meta["loader"]["hop_ms"] / 1000)
        return (torch.zeros(1, int(meta["loader"]["n_mels"]), frames),)
    if kind == "text":
        ids = torch.zeros(1, int(spec["max_tokens"]), dtype=torch.int32)
        ids[0, 0] = 1
        return (ids,)
    steps = int(spec["max_frames"])
    return torch.zeros(1, steps, int(spec["dim"])), torch.tensor([steps])


def _waveform(meta: dict) -> bool:
    """Whether the branch reads the raw waveform (B, S) rather than (B, F, T) features."""
    return meta["loader"].get("audio_features") == "waveform"


def _meta(payload: dict, modality: str, run: Path | None) -> dict:
    config = payload.get("config", {})
    spec = next(s for s in payload["specs"] if s["name"] == modality)
    source = dict(payload.get("modalities", {}).get(modality, {}))
    dataset = Path(config.get("shards", "")) / "dataset.json"
    names = json.loads(dataset.read_text()).get("label", {}).get("names") if dataset.is_file() else None
    meta = {"format": STATE_FORMAT, "modality": modality, "spec": spec, "num_classes": payload["num_classes"],
            "task": config.get("task", {}).get("type", "class"), "class_names": names,
            "source": source, "loader": config.get("loader", {})}
    if spec["kind"] == "text" and run is not None:
        tokenizer = Path(config.get("shards", "")) / source.get("tokenizer", "tokenizer.json")
        if not tokenizer.is_file():
            raise FileNotFoundError(f"{tokenizer} not found: text export embeds the shards' tokenizer; pass the "
                                    "run's shard directory back where it was trained (config.json 'shards')")
        meta["tokenizer"] = tokenizer.read_text(encoding="utf-8")
    return meta


def export_model(model: UnimodalModel, meta: dict, fmt: str, path: str | Path) -> Path:
    """Write `model` in `fmt` with `meta` inside (TorchScript extra file, ONNX metadata, state-dict entry)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    if fmt == "state_dict":
        torch.save({"format": STATE_FORMAT, "meta": meta, "state_dict": model.state_dict()}, path)
        return path
    example = _example_inputs(meta)
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # TorchScript still loads in C++ and older runtimes (torch 2.14 deprecates it with FutureWarnings)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={META_KEY: json.dumps(meta)})
        return path
    _export_onnx(model, example, meta, path)
    return path


def _export_onnx(model: UnimodalModel, example: tuple, meta: dict, path: Path) -> None:
    try:
        import onnx
    except ImportError as err:
        raise ValueError("--format onnx needs the onnx package: pip install 'cotrain[onnx]' "
                         "(onnx and onnxruntime)") from err
    names = ["x", "lengths"][:len(example)]
    # sequences may vary in length
    steps_axis = {"audio": 1 if _waveform(meta) else 2, "text": 1, "features": 1}.get(meta["spec"]["kind"])
    x_axes = {0: "batch", **({steps_axis: "steps"} if steps_axis else {})}
    axes = {"x": x_axes, "logits": {0: "batch"}, **({"lengths": {0: "batch"}} if len(example) > 1 else {})}
    # with gradients on, attention takes its decomposed path (ONNX has no fused native attention op)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer warnings
        torch.onnx.export(model, example, str(path), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    onnx.save(proto, str(path))


class ExportedModel:
    """An exported file loaded for inference: `meta` (preprocessing, classes) and `__call__(x[, lengths])`."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: write it with `cotrain export`")
        self.path, self.format = path, _detect_format(path)
        try:
            self._load(path)
        except (KeyError, RuntimeError, ValueError, OSError) as err:
            raise ValueError(f"{path} is not a model written by `cotrain export` ({self.format} without cotrain "
                             f"metadata: {err}); export it with `cotrain export --run RUN --modality NAME`") from err

    def _load(self, path: Path) -> None:
        if self.format == "torchscript":
            extra = {META_KEY: ""}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            self.meta = json.loads(extra[META_KEY])
        elif self.format == "state_dict":
            saved = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
                raise ValueError(f"no '{STATE_FORMAT}' format tag")
            self.meta = saved["meta"]
            self.module = _build_unimodal(self.meta)
            self.module.load_state_dict(saved["state_dict"])
        else:
            import onnx
            import onnxruntime

            try:
                proto = onnx.load(str(path), load_external_data=False)
            except Exception as err:  # onnx raises protobuf's DecodeError, which has no common base with ours
                raise ValueError(f"not ONNX either ({type(err).__name__})") from err
            props = {p.key: p.value for p in proto.metadata_props}
            self.meta = json.loads(props[META_KEY])
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.format == "onnx":
            names = [i.name for i in self.session.get_inputs()]
            feed = {n: t.numpy() for n, t in zip(names, inputs)}
            return torch.from_numpy(self.session.run(None, feed)[0])
        return self.module(*inputs)


def _detect_format(path: Path) -> str:
    head = path.read_bytes()[:4]
    if head[:2] == b"PK":  # a zip: TorchScript archive or torch.save's zip
        import zipfile

        with zipfile.ZipFile(path) as archive:
            return "torchscript" if any(n.endswith("/constants.pkl") or n.endswith("/code/__torch__.py")
                                        or "/code/" in n for n in archive.namelist()) else "state_dict"
    return "onnx"


def export_run(run: str | Path, modality: str, fmt: str, out: str | Path, *, which: str = "best") -> Path:
    """Export `modality`'s branch of the run at RUN (its best-validation weights when there are any)."""
    run = Path(run)
    path = run / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train first with `cotrain train --out {run}`")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model = model_from_payload(payload)
    best = run / "best" / f"{modality}.pt"
    state = torch.load(best, map_location="cpu", weights_only=True) if which == "best" and best.is_file() \
        else payload["state_dict"]
    model.load_state_dict(state)
    return export_model(unimodal_model(model, modality), _meta(payload, modality, run), fmt, out)

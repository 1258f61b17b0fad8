"""Audio and text backbones as StagedEncoders: wav2vec2 and HuBERT on the raw 16 kHz waveform and a BERT-like text
encoder (all three from transformers), and a ResNet-style 2D CNN on log-mel (plain torch.nn).

    waveform (B, S) ─ feature_extractor ─ feature_projection ─ encoder.layers.0 ─ ... ─ (B, D, T')
    log-mel (B, F, T) ─ stem ─ layer1 ─ layer2 ─ layer3 ─ layer4 (pools frequency) ─ (B, C, T')
    ids (B, L)       ─ embeddings ─ encoder.layer.0 ─ ... ─ encoder.layer.N-1 ─ (B, D, L)

Each stage is named after the backbone's own module (`stage_names`), so a split point can be given by name.
transformers is imported only when one of its backbones is built. Their Transformer layers expose their
attention like TransformerStage does, so attention-level transfer works with them.

Weights (`weights`): a local directory in Hugging Face format (config.json plus model.safetensors or
pytorch_model.bin), a state-dict file (.safetensors, .pt, .bin), or a model name already in the local Hugging Face
cache. Nothing is downloaded: anything else is an error that says how to fetch it. Without weights the backbone
has random weights in the architecture `config` names (NAMED_CONFIGS) or gives as a dict of sizes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .encoders import StagedEncoder, _fix_empty, _groups

__all__ = ["AUDIO_ENCODERS", "TEXT_ENCODERS", "NAMED_CONFIGS", "LibraryAttentionLayer", "build_wav2vec2",
           "build_hubert", "build_bert", "build_audio_cnn2d", "resolve_weights", "WAVEFORM_RATE"]

WAVEFORM_RATE = 16000
"""The sample rate wav2vec2 and HuBERT were trained on: the shards must store audio at this rate."""

# (config class, model class) in transformers for each family
_FAMILIES = {"wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"), "hubert": ("HubertConfig", "HubertModel"),
             "bert": ("BertConfig", "BertModel")}

_LARGE_SPEECH = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                 "feat_extract_norm": "layer", "conv_bias": True, "do_stable_layer_norm": True}
NAMED_CONFIGS: dict[str, tuple[str, dict]] = {
    # name on the Hugging Face hub -> (family, its config as changes to the family's default config). The config
    # classes' defaults are the base models' architectures; sizes are spelt out so they can be read here.
    "facebook/wav2vec2-base": ("wav2vec2", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                            "intermediate_size": 3072}),
    "facebook/wav2vec2-large-lv60": ("wav2vec2", _LARGE_SPEECH),
    "facebook/hubert-base-ls960": ("hubert", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                              "intermediate_size": 3072}),
    "facebook/hubert-large-ll60k": ("hubert", _LARGE_SPEECH),
    "bert-base-uncased": ("bert", {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                                   "num_attention_heads": 12, "intermediate_size": 3072}),
    "bert-base-cased": ("bert", {"vocab_size": 28996, "hidden_size": 768, "num_hidden_layers": 12,
                                 "num_attention_heads": 12, "intermediate_size": 3072}),
    "bert-large-uncased": ("bert", {"vocab_size": 30522, "hidden_size": 1024, "num_hidden_layers": 24,
                                    "num_attention_heads": 16, "intermediate_size": 4096}),
}


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ValueError("the wav2vec2, hubert and bert encoders need the transformers package: "
                         "pip install transformers (setup.py lists it)") from err
    return transformers


def _on_meta() -> bool:
    """Whether modules are being built on the meta device (encoder_width): shapes only, no weights to load."""
    return torch.empty(0).device.type == "meta"


# ---------------------------------------------------------------------------------------------
# Configs and weights

def _config(family: str, config: str | dict):
    """The family's transformers config from a NAMED_CONFIGS name or a dict of changes to its defaults."""
    config_class = getattr(_transformers(), _FAMILIES[family][0])
    if isinstance(config, str):
        known = [n for n, (f, _) in NAMED_CONFIGS.items() if f == family]
        if config not in known:
            raise ValueError(f"{family} config {config!r} is not known; give one of {', '.join(known)}, or a dict "
                             f"of {config_class.__name__} sizes (hidden_size, num_hidden_layers, ...)")
        config = NAMED_CONFIGS[config][1]
    unknown = sorted(set(config) - set(config_class().to_dict()))
    if unknown:  # the library would keep a misspelt field as an attribute nothing reads
        raise ValueError(f"{family} config: {', '.join(unknown)} is not a field of {config_class.__name__}; see "
                         f"its documentation in transformers for the valid ones (hidden_size, num_hidden_layers, ...)")
    try:
        made = config_class(**dict(config))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{family} config {config}: {err}") from err
    made._attn_implementation = "eager"  # the layers hand back attention weights (attention-level transfer)
    return made


def _fetch_hint(name: str) -> str:
    local = f"models/{name.rsplit('/', 1)[-1]}"
    return (f"nothing is downloaded at run time. Fetch it once on a machine with network access with "
            f"`hf download {name} --local-dir {local}` (`huggingface-cli download` in older huggingface_hub), "
            f"copy {local} here and set encoders.<modality>.weights: {local}")


def resolve_weights(weights: str) -> Path:
    """`weights` as a local path: an existing file or directory, or a hub name found in the local Hugging Face
    cache (never downloaded); anything else raises an error that says how to fetch it and where to put it."""
    path = Path(weights).expanduser()
    if path.exists():
        return path
    looks_like_path = weights.startswith((".", "/", "~")) or path.suffix in (".pt", ".pth", ".bin", ".safetensors")
    if looks_like_path or weights.count("/") > 1:
        raise ValueError(f"weights {weights!r}: no such file or directory. Give a directory in Hugging Face format "
                         f"(config.json and model.safetensors or pytorch_model.bin) or a state-dict file; for a "
                         f"model on the Hugging Face hub, {_fetch_hint('<name>')}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(weights, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise ValueError(f"weights {weights!r}: not a local file or directory and not in the local Hugging Face "
                         f"cache; {_fetch_hint(weights)}") from err


def _model_config(family: str, config: str | dict, weights: str | None):
    """(transformers config, weights path or None): the weights directory's config.json where weights are a
    directory, else `config` (a NAMED_CONFIGS name or a dict of sizes)."""
    source = resolve_weights(weights) if weights is not None else None
    if source is None or not source.is_dir():
        return _config(family, config), source
    if not (source / "config.json").is_file():
        raise ValueError(f"weights directory {source} has no config.json: save it with save_pretrained() or "
                         f"fetch the whole model ({_fetch_hint('<name>')})")
    made = getattr(_transformers(), _FAMILIES[family][0]).from_pretrained(source)
    made._attn_implementation = "eager"
    return made, source


def _hf_model(family: str, config, source: Path | None, **init) -> nn.Module:
    """The family's transformers model in `config`'s architecture, with the weights at `source` if any."""
    model_class = getattr(_transformers(), _FAMILIES[family][1])
    if source is None or _on_meta():  # on the meta device (encoder_width) there is nothing to load into
        return model_class(config, **init)
    if source.is_dir():
        try:
            # use_kernels=False: the kernels library would fetch compiled layers from the hub at load time
            return model_class.from_pretrained(source, config=config, use_kernels=False, **init)
        except (OSError, ValueError) as err:
            raise ValueError(f"weights directory {source} does not load as a {model_class.__name__}: {err}") from err
    model = model_class(config, **init)
    _load_state_file(model, source)
    return model


def _load_state_file(model: nn.Module, path: Path) -> None:
    """Load a state-dict file into `model`; keys may carry the model's prefix ('bert.', 'wav2vec2.') and heads
    beyond the backbone are ignored, but every backbone weight must be there."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    prefix = f"{model.base_model_prefix}."
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("position_ids", "token_type_ids"))]
    if missing:
        raise ValueError(f"weights file {path} lacks {len(missing)} of the {type(model).__name__}'s weights "
                         f"(e.g. {', '.join(missing[:4])}): it is not a state dict of this architecture; set the "
                         f"encoder's config to the one it was saved from")


# ---------------------------------------------------------------------------------------------
# Stages around transformers' modules

class LibraryAttentionLayer(nn.Module):
    """One Transformer layer of a library backbone as a stage over channels-first (B, D, L) tokens. It exposes
    its attention as TransformerStage does: with `record_attention` set, the last forward's (B, L, L) attention,
    averaged over heads, is kept in `attention` (read from `attention_module`'s output by a hook that lives only
    during that forward)."""

    takes_mask = True
    exposes_attention = True

    def __init__(self, layer: nn.Module, attention_module: nn.Module, final_norm: nn.Module | None = None):
        super().__init__()
        self.layer, self.final_norm = layer, final_norm
        self._attention_module = [attention_module]  # a plain list: not registered twice in the state dict
        self.record_attention = False
        self.attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        h = x.transpose(1, 2)  # (B, L, D)
        valid = _fix_empty(valid)
        mask = None if valid is None else (~valid)[:, None, None, :].to(h.dtype) * torch.finfo(h.dtype).min
        handle = self._attention_module[0].register_forward_hook(self._keep) if self.record_attention else None
        try:
            h = self.layer(h, attention_mask=mask)
        finally:
            if handle is not None:
                handle.remove()
        h = h[0] if isinstance(h, tuple) else h
        if self.final_norm is not None:
            h = self.final_norm(h)
        if valid is not None:
            h = h * valid[..., None].to(h.dtype)
        return h.transpose(1, 2)

    def _keep(self, _module, _args, output) -> None:
        self.attention = output[1].mean(dim=1)  # (B, H, L, L) -> (B, L, L)


class _WaveformFeatures(nn.Module):
    """(B, S) waveform -> (B, C, T') conv features; with `normalize`, each waveform is first scaled to zero mean
    and unit variance, as the weights' feature extractor did in their training (preprocessor_config.json)."""

    def __init__(self, extractor: nn.Module, normalize: bool):
        super().__init__()
        self.extractor, self.normalize = extractor, normalize

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            mean = wave.mean(dim=1, keepdim=True)
            wave = (wave - mean) / torch.sqrt(((wave - mean) ** 2).mean(dim=1, keepdim=True) + 1e-7)
        return self.extractor(wave)


class _WaveformProjection(nn.Module):
    """(B, C, T') conv features -> (B, D, T'): the feature projection, then what the encoder does before its
    layers (convolutional positions, and the layer norm of post-norm models)."""

    def __init__(self, projection: nn.Module, encoder: nn.Module, stable_layer_norm: bool):
        super().__init__()
        self.projection, self.pos_conv_embed, self.dropout = projection, encoder.pos_conv_embed, encoder.dropout
        self.layer_norm = None if stable_layer_norm else encoder.layer_norm

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.projection(features.transpose(1, 2))
        h = h[0] if isinstance(h, tuple) else h  # wav2vec2 also returns the normed input
        h = h + self.pos_conv_embed(h)
        if self.layer_norm is not None:
            h = self.layer_norm(h)
        return self.dropout(h).transpose(1, 2)


class _TokenEmbeddings(nn.Module):
    """(B, L) ids -> (B, D, L): the backbone's word, position and token-type embeddings."""

    def __init__(self, embeddings: nn.Module, max_len: int):
        super().__init__()
        self.embeddings, self.max_len = embeddings, max_len

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.max_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds the text encoder's {self.max_len} positions;"
                             f" rebuild the shards with --max-tokens {self.max_len} or less")
        return self.embeddings(input_ids=ids.long()).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Builders

def _check_waveform_input(name: str, in_channels: int, sample_rate: int | None) -> None:
    if in_channels != 1:
        raise ValueError(f"the {name} audio encoder reads the raw waveform, but the loader gives {in_channels} "
                         f"feature rows; set loader.audio_features: waveform")
    if sample_rate is not None and sample_rate != WAVEFORM_RATE:
        raise ValueError(f"the {name} audio encoder was trained on {WAVEFORM_RATE} Hz audio, the shards store "
                         f"{sample_rate} Hz; rebuild them with `cotrain shards build --sample-rate {WAVEFORM_RATE}`")


def _normalizes(weights_dir: Path | None, normalize: bool | None) -> bool:
    """Per-waveform normalisation: as asked, else as the weights' preprocessor_config.json says, else on (as
    the base models were trained)."""
    if normalize is not None:
        return bool(normalize)
    preprocessor = weights_dir / "preprocessor_config.json" if weights_dir is not None else None
    if preprocessor is not None and preprocessor.is_file():
        return bool(json.loads(preprocessor.read_text()).get("do_normalize", True))
    return True


def _speech_encoder(family: str, *, in_channels: int, config: str | dict, weights: str | None,
                    normalize: bool | None, sample_rate: int | None) -> StagedEncoder:
    _check_waveform_input(family, in_channels, sample_rate)
    cfg, source = _model_config(family, config, weights)
    model = _hf_model(family, cfg, source)
    stable = bool(cfg.do_stable_layer_norm)
    layers = list(model.encoder.layers)
    weights_dir = source if source is not None and source.is_dir() else None
    stages = [_WaveformFeatures(model.feature_extractor, _normalizes(weights_dir, normalize)),
              _WaveformProjection(model.feature_projection, model.encoder, stable)]
    stages += [LibraryAttentionLayer(layer, layer.attention,
                                     model.encoder.layer_norm if stable and i == len(layers) - 1 else None)
               for i, layer in enumerate(layers)]
    names = ["feature_extractor", "feature_projection", *(f"encoder.layers.{i}" for i in range(len(layers)))]
    encoder = StagedEncoder(stages, [cfg.conv_dim[-1]] + [cfg.hidden_size] * (len(layers) + 1), kind="audio",
                            stage_names=names)
    encoder.input_features = "waveform"
    return encoder


def build_wav2vec2(*, in_channels: int = 1, config: str | dict = "facebook/wav2vec2-base", weights: str | None = None,
                   normalize: bool | None = None, sample_rate: int | None = None) -> StagedEncoder:
    """wav2vec 2.0 (transformers' Wav2Vec2Model) on the raw 16 kHz waveform (B, S): conv feature extractor,
    projection, then one stage per Transformer layer. `sample_rate` is the shards' (filled in from dataset.json)."""
    return _speech_encoder("wav2vec2", in_channels=in_channels, config=config, weights=weights, normalize=normalize,
                           sample_rate=sample_rate)


def build_hubert(*, in_channels: int = 1, config: str | dict = "facebook/hubert-base-ls960", weights: str | None = None,
                 normalize: bool | None = None, sample_rate: int | None = None) -> StagedEncoder:
    """HuBERT (transformers' HubertModel) on the raw 16 kHz waveform (B, S), staged as build_wav2vec2."""
    return _speech_encoder("hubert", in_channels=in_channels, config=config, weights=weights, normalize=normalize,
                           sample_rate=sample_rate)


def _check_vocabulary(config, vocab_size: int, special_ids: dict | None, weights_dir: Path | None) -> None:
    """The shards' token ids must be this model's: the same vocabulary size, padding id and (where the weights
    ship their tokenizer) the same [CLS]/[SEP] ids."""
    fix = "rebuild the shards with `cotrain shards build --tokenizer DIR` giving this model's tokenizer " \
          "(vocab.txt or tokenizer.json), or give the encoder the config of the model whose tokenizer built them"
    if config.vocab_size != vocab_size:
        raise ValueError(f"the bert text encoder has a vocabulary of {config.vocab_size} tokens, the shards' "
                         f"tokenizer (dataset.json vocab_size) {vocab_size}; {fix}")
    special_ids = special_ids or {}
    if special_ids.get("pad", 0) != (config.pad_token_id or 0):
        raise ValueError(f"the bert text encoder pads with id {config.pad_token_id}, the shards with "
                         f"{special_ids.get('pad')}; {fix}")
    shipped = _shipped_vocabulary(weights_dir)
    for key, token in (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]")):
        if key in special_ids and token in shipped and special_ids[key] != shipped[token]:
            raise ValueError(f"the weights' tokenizer has {token} = {shipped[token]}, the shards' tokenizer "
                             f"{special_ids[key]}; {fix}")


def _shipped_vocabulary(weights_dir: Path | None) -> dict[str, int]:
    """token -> id of the tokenizer saved beside the weights (vocab.txt or tokenizer.json), if any."""
    if weights_dir is None:
        return {}
    if (weights_dir / "tokenizer.json").is_file():
        saved = json.loads((weights_dir / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = saved.get("model", {}).get("vocab", {})
        vocab = dict(vocab) if isinstance(vocab, dict) else {}
        vocab.update({t["content"]: t["id"] for t in saved.get("added_tokens", [])})
        return vocab
    if (weights_dir / "vocab.txt").is_file():
        return {t: i for i, t in enumerate((weights_dir / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    return {}


def build_bert(*, vocab_size: int, config: str | dict = "bert-base-uncased", weights: str | None = None,
               special_ids: dict | None = None) -> StagedEncoder:
    """A BERT-like encoder (transformers' BertModel, no pooler) over (B, L) token ids, 0 = padding: an embeddings
    stage, then one stage per layer. `vocab_size` and `special_ids` are the shards' tokenizer's (dataset.json);
    they must match the model's. A config dict without vocab_size takes the shards'."""
    if isinstance(config, dict) and "vocab_size" not in config:
        config = {**config, "vocab_size": vocab_size}
    cfg, source = _model_config("bert", config, weights)
    _check_vocabulary(cfg, vocab_size, special_ids, source if source is not None and source.is_dir() else None)
    model = _hf_model("bert", cfg, source, add_pooling_layer=False)
    layers = list(model.encoder.layer)
    stages = [_TokenEmbeddings(model.embeddings, model.config.max_position_embeddings)]
    stages += [LibraryAttentionLayer(layer, layer.attention.self) for layer in layers]
    names = ["embeddings", *(f"encoder.layer.{i}" for i in range(len(layers)))]
    return StagedEncoder(stages, [model.config.hidden_size] * (len(layers) + 1), kind="text", stage_names=names)


# ---------------------------------------------------------------------------------------------
# A ResNet-style 2D CNN on log-mel (plain torch.nn)

class _BasicBlock2d(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(_groups(c_out), c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.GroupNorm(_groups(c_out), c_out),
        )
        self.skip = nn.Identity() if c_in == c_out and stride == 1 else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(_groups(c_out), c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, F, T)
        return torch.relu(self.body(x) + self.skip(x))


class _MelStem(nn.Module):
    """(B, F, T) log-mel as a one-channel image -> (B, C, F, T)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.GroupNorm(_groups(width), width),
                                  nn.ReLU(inplace=True))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.conv(mel.unsqueeze(1))


class _PoolFrequency(nn.Module):
    """The last stage's blocks, then the mean over frequency: (B, C, F', T') -> (B, C, T') tokens over time."""

    def __init__(self, blocks: nn.Module):
        super().__init__()
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=2)


def build_audio_cnn2d(*, in_channels: int = 40, stem_width: int = 32, widths: tuple[int, ...] = (32, 64, 128, 256),
                      depths: tuple[int, ...] = (1, 1, 1, 1)) -> StagedEncoder:
    """A ResNet-style 2D CNN over (B, F, T) log-mel or MFCC as an image: a stem, then four stages of residual
    blocks (layer2-4 halve frequency and time); layer4 averages frequency out, so tokens run over time."""
    if in_channels == 1:
        raise ValueError("the cnn2d audio encoder reads log-mel or MFCC (B, F, T), but the loader gives the "
                         "waveform; set loader.audio_features: logmel")
    if len(widths) != 4 or len(depths) != 4:
        raise ValueError(f"cnn2d takes four stage widths and depths, got widths={widths}, depths={depths}")
    stages, c_in = [_MelStem(stem_width)], stem_width
    for i, (width, depth) in enumerate(zip(widths, depths)):
        stride = 1 if i == 0 else 2
        blocks = nn.Sequential(*[_BasicBlock2d(c_in if j == 0 else width, width, stride if j == 0 else 1)
                                 for j in range(depth)])
        stages.append(_PoolFrequency(blocks) if i == len(widths) - 1 else blocks)
        c_in = width
    return StagedEncoder(stages, [stem_width, *widths], kind="audio",
                         stage_names=["stem", "layer1", "layer2", "layer3", "layer4"])


AUDIO_ENCODERS = {"wav2vec2": build_wav2vec2, "hubert": build_hubert, "cnn2d": build_audio_cnn2d}
TEXT_ENCODERS = {"bert": build_bert}

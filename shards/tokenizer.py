"""The shards' tokenizer: a word-level one trained on the train split's texts, or a model's own tokenizer (BERT's
WordPiece vocab.txt or a tokenizer.json) given by the user, so the shards store that model's token ids."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = ["PAD_ID", "SPECIAL_TOKENS", "UNK_ID", "train_tokenizer", "load_model_tokenizer", "tokenizer_description",
           "TokenizerError"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]")
PAD_ID, UNK_ID = 0, 1
PADDING_TOKENS = ("[PAD]", "<pad>", "<PAD>")
_MODEL_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


class TokenizerError(ValueError):
    """A tokenizer given with --tokenizer that cotrain cannot use; the message says why and what to give."""


def train_tokenizer(texts: Iterable[str], *, max_tokens: int) -> Tokenizer:
    """A lowercase, whitespace-split WordLevel tokenizer with [PAD]=0 and [UNK]=1.

    Only train texts go in, so val/test words map to [UNK] as they would for unseen data. Padding and
    truncation to `max_tokens` are saved with it, so loaders that re-encode text get the same ids.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS[UNK_ID]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _fit_length(tokenizer, max_tokens)


def _fit_length(tokenizer: Tokenizer, max_tokens: int) -> Tokenizer:
    # truncation inside the tokenizer keeps a model's closing [SEP]; 0-padding is what the shards store
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(length=max_tokens, pad_id=PAD_ID, pad_token=tokenizer.id_to_token(PAD_ID) or "[PAD]")
    return tokenizer


def load_model_tokenizer(path: Path | str, *, max_tokens: int) -> Tokenizer:
    """A model's own tokenizer from `path`: a directory holding tokenizer.json or vocab.txt (as Hugging Face
    saves BERT), a tokenizer.json file, or a WordPiece vocab.txt. Nothing is downloaded. Its padding id must be
    0, which the shards and the model read as padding."""
    path = Path(path)
    tokenizer = _read_tokenizer(path)
    zero = tokenizer.id_to_token(PAD_ID)
    if zero not in PADDING_TOKENS:
        raise TokenizerError(f"tokenizer {path}: id 0 is {zero!r}, not a padding token; cotrain stores 0-padded ids "
                             f"and reads id 0 as padding, so give a tokenizer whose [PAD] is id 0 (BERT's is)")
    return _fit_length(tokenizer, max_tokens)


def _read_tokenizer(path: Path) -> Tokenizer:
    hint = ("give a tokenizer directory (tokenizer.json or vocab.txt, e.g. the model's files fetched with "
            "`hf download bert-base-uncased --local-dir models/bert-base-uncased`), a tokenizer.json or a vocab.txt")
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).is_file():
                return _read_tokenizer_file(path / name, lowercase=_lowercases(path))
        raise TokenizerError(f"tokenizer directory {path} holds neither tokenizer.json nor vocab.txt; {hint}")
    if not path.is_file():
        raise TokenizerError(f"tokenizer {path} not found; {hint}")
    return _read_tokenizer_file(path, lowercase=_lowercases(path.parent))


def _read_tokenizer_file(path: Path, *, lowercase: bool) -> Tokenizer:
    try:
        if path.suffix == ".json":
            return Tokenizer.from_file(str(path))
        return _wordpiece(path, lowercase=lowercase)
    except Exception as err:  # the tokenizers library raises its own Exception subclasses
        raise TokenizerError(f"tokenizer {path} does not load ({err}); give a tokenizer.json saved by the "
                             f"tokenizers or transformers library, or a WordPiece vocab.txt") from err


def _lowercases(folder: Path) -> bool:
    """BERT's do_lower_case from tokenizer_config.json where the files have one; uncased otherwise."""
    config = folder / "tokenizer_config.json"
    if config.is_file():
        return bool(json.loads(config.read_text(encoding="utf-8")).get("do_lower_case", True))
    return True


def _wordpiece(vocab: Path, *, lowercase: bool) -> Tokenizer:
    """BERT's tokenizer from its vocab.txt: normalise, split on whitespace and punctuation, WordPiece, then
    [CLS] ... [SEP] around each text (as transformers' BertTokenizerFast builds it)."""
    tokenizer = Tokenizer(models.WordPiece.from_file(str(vocab), unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise TokenizerError(f"vocab.txt {vocab} has no [CLS] or [SEP] token: it is not a BERT WordPiece vocabulary")
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return tokenizer


def tokenizer_description(tokenizer: Tokenizer, source: Path | None) -> dict:
    """What dataset.json records of the tokenizer: where it came from, its name and its special ids."""
    special = {key: tokenizer.token_to_id(token) for key, token in _MODEL_SPECIALS.items()}
    return {"tokenizer_source": "trained on the train split" if source is None else str(source),
            "tokenizer_name": "word-level" if source is None else _name_of(source),
            "special_ids": {key: value for key, value in special.items() if value is not None}}


def _name_of(source: Path) -> str:
    folder = source if source.is_dir() else source.parent
    config = folder / "config.json"
    if config.is_file():  # a model directory: the name it was saved under, where it says
        name = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
        if name:
            return str(name)
    return folder.name if source.name in ("vocab.txt", "tokenizer.json") or source.is_dir() else source.stem

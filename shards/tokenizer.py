"""Train the corpus's word-level tokenizer on the train split's texts."""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

__all__ = ["PAD_ID", "SPECIAL_TOKENS", "UNK_ID", "train_tokenizer"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]")
PAD_ID, UNK_ID = 0, 1


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
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(length=max_tokens, pad_id=PAD_ID, pad_token=SPECIAL_TOKENS[PAD_ID])
    return tokenizer

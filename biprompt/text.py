"""Referring-expression tokenisation: transformers' XLMRobertaTokenizer (BEiT-3's sentencepiece
model), `<s> tokens </s>`, right padding with a real padding mask."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from biprompt.config import MAX_TEXT_CHARS, MAX_TEXT_TOKENS
from biprompt.errors import InvalidPromptError, ModelConfigError

DEFAULT_MAX_TOKENS = MAX_TEXT_TOKENS
DEFAULT_MAX_CHARS = MAX_TEXT_CHARS


class TextTokenizer:
    def __init__(self, tokenizer, max_tokens: int = DEFAULT_MAX_TOKENS,
                 max_chars: int = DEFAULT_MAX_CHARS):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.max_chars = max_chars
        self.pad_id = tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, directory: str | Path, **limits) -> TextTokenizer:
        from transformers import XLMRobertaTokenizer

        directory = Path(directory)
        if not (directory / "sentencepiece.bpe.model").is_file():
            raise ModelConfigError(
                f"no tokenizer in {directory}: expected sentencepiece.bpe.model (plus "
                "tokenizer_config.json, special_tokens_map.json) beside config.json"
            )
        return cls(XLMRobertaTokenizer.from_pretrained(str(directory)), **limits)

    @classmethod
    def train(cls, sentences: Sequence[str], directory: str | Path | None = None,
              vocab_size: int = 64, **limits) -> TextTokenizer:
        """Train a small sentencepiece BPE model on `sentences` and wrap it as an
        XLMRobertaTokenizer (saved to `directory`, or a temporary one). For tiny/demo models."""
        import sentencepiece as spm
        from transformers import XLMRobertaTokenizer

        directory = Path(directory or tempfile.mkdtemp(prefix="biprompt-tok-"))
        directory.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, minloglevel=2,
            bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False,
        )
        sp_path = directory / "sentencepiece.bpe.model"
        sp_path.write_bytes(buf.getvalue())
        tok = XLMRobertaTokenizer(vocab_file=str(sp_path))
        tok.save_pretrained(str(directory))
        return cls(tok, **limits)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def validate(self, text: object) -> str:
        if not isinstance(text, str):
            raise InvalidPromptError(f"text must be a string, got {type(text).__name__}")
        stripped = text.strip()
        if not stripped:
            raise InvalidPromptError("text is empty: give a referring expression, or omit it")
        if len(stripped) > self.max_chars:
            raise InvalidPromptError(
                f"text is {len(stripped)} characters; the limit is {self.max_chars}"
            )
        n = len(self.tokenizer(stripped)["input_ids"])
        if n > self.max_tokens:
            raise InvalidPromptError(
                f"text is {n} tokens long; the limit is {self.max_tokens}: shorten the expression"
            )
        return stripped

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids BxT (long), padding BxT (bool, True at pad positions)."""
        texts = [self.validate(t) for t in texts]
        enc = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"] == 0

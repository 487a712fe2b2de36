"""Text to token ids with the model's own fast tokenizer (`tokenizer.json`), without transformers.

Special tokens are added exactly as the tokenizer's post-processor defines them. Padding and
truncation settings saved in tokenizer.json are cleared: the service decides about length itself,
so that an over-long input is an error unless the client asked for truncation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property, lru_cache
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from toolkit.errors import ModelLoadError

logger = logging.getLogger(__name__)


class TextTokenizer:
    """`special_tokens=False` for models that take none (sentence-transformers' StaticEmbedding)."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: bool = True) -> None:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._plain = tokenizer
        self._truncating: dict[tuple[str, int], Tokenizer] = {}
        self.special_tokens = special_tokens

    @classmethod
    def from_dir(cls, directory: Path, special_tokens: bool = True) -> TextTokenizer:
        path = directory / "tokenizer.json"
        if path.is_file():
            return cls(Tokenizer.from_file(str(path)), special_tokens)
        # Only slow-tokenizer files: let transformers convert them to a fast tokenizer once.
        logger.info("No tokenizer.json in %s: converting with transformers.", directory)
        try:
            from transformers import AutoTokenizer  # only for such a model: it imports torch

            converted = AutoTokenizer.from_pretrained(str(directory), use_fast=True)
            return cls(Tokenizer.from_str(converted.backend_tokenizer.to_str()), special_tokens)
        except Exception as exc:
            raise ModelLoadError(f"cannot load a tokenizer from {directory}: {exc}") from exc

    @cached_property
    def vocab_size(self) -> int:
        """Number of valid token ids (added tokens included)."""
        return int(self._plain.get_vocab_size(with_added_tokens=True))

    def encode(self, texts: list[str], add_special_tokens: bool | None = None) -> list[list[int]]:
        """Token ids, with the model's special tokens unless told otherwise, no truncation."""
        special = self.special_tokens if add_special_tokens is None else add_special_tokens
        return [e.ids for e in self._encode_batch(self._plain, texts, special)]

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None."""
        found = self._plain.token_to_id(token)
        return int(found) if found is not None else None

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of token ids, special tokens written out unless skipped."""
        return str(self._plain.decode(ids, skip_special_tokens=skip_special_tokens))

    def encode_truncated(self, texts: list[str], max_length: int, side: str) -> list[list[int]]:
        """Token ids cut to `max_length`, special tokens kept, cutting from `side`."""
        tokenizer = self._truncating.get((side, max_length))
        if tokenizer is None:
            tokenizer = Tokenizer.from_str(self._plain.to_str())
            tokenizer.enable_truncation(max_length, direction=side)
            self._truncating[(side, max_length)] = tokenizer
        return [e.ids for e in self._encode_batch(tokenizer, texts, self.special_tokens)]

    def encode_pairs(
        self, pairs: list[tuple[str, str]], max_length: int | None
    ) -> list[tuple[list[int], int]]:
        """Each pair's token ids and where its second text starts (0 where the tokenizer gives
        both texts type 0, as RoBERTa's does); cut to `max_length` longest text first, as
        transformers' tokenizers cut pairs, or whole where `max_length` is None."""
        tokenizer = self._plain
        if max_length is not None:
            tokenizer = self._truncating.get(("pair", max_length)) or self._pair_truncating(max_length)
        encodings = self._encode_batch(tokenizer, pairs)
        return [(e.ids, _second_segment_start(e.type_ids)) for e in encodings]

    def _pair_truncating(self, max_length: int) -> Tokenizer:
        tokenizer = Tokenizer.from_str(self._plain.to_str())
        tokenizer.enable_truncation(max_length, strategy="longest_first")
        self._truncating[("pair", max_length)] = tokenizer
        return tokenizer

    @cached_property
    def max_token_chars(self) -> int:
        """Characters of the longest token in the vocabulary (at least 1)."""
        vocab = self._plain.get_vocab(with_added_tokens=True)
        return max((len(token) for token in vocab), default=1)

    @cached_property
    def framing(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The special token ids this tokenizer puts before and after every input ((101,), (102,)
        for BERT); empty where it adds none."""
        encoding = self._plain.encode("a", add_special_tokens=True)
        ids, special = encoding.ids, encoding.special_tokens_mask
        lead = next((i for i, flag in enumerate(special) if not flag), len(ids))
        trail = next((i for i, flag in enumerate(reversed(special)) if not flag), 0)
        return tuple(ids[:lead]), tuple(ids[len(ids) - trail :])

    def frames(self, ids: Sequence[int]) -> bool:
        """Whether `ids` start and end with this tokenizer's special tokens, as its own output does."""
        prefix, suffix = self.framing if self.special_tokens else ((), ())
        if len(ids) < len(prefix) + len(suffix):
            return False
        return tuple(ids[: len(prefix)]) == prefix and (not suffix or tuple(ids[-len(suffix) :]) == suffix)

    def prompt_length(self, prompt: str) -> int:
        """Tokens the prompt occupies at the start of an input, as sentence-transformers counts:
        the prompt's own encoding, without a trailing special token (EOS/SEP) it would not keep."""
        return _prompt_length(self._plain, prompt)

    @staticmethod
    def _encode_batch(
        tokenizer: Tokenizer, texts: Sequence[str | tuple[str, str]], add_special_tokens: bool = True
    ) -> list[Encoding]:
        # Runs in Rust threads and releases the GIL; the fast variant skips the character offsets,
        # which nothing here reads (docs/performance.md, "Text on the GPU").
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        encodings: list[Encoding] = encode(texts, add_special_tokens=add_special_tokens)
        return encodings


def _second_segment_start(type_ids: list[int]) -> int:
    return next((index for index, kind in enumerate(type_ids) if kind), 0)


@lru_cache(maxsize=64)
def _prompt_length(tokenizer: Tokenizer, prompt: str) -> int:
    encoding = tokenizer.encode(prompt, add_special_tokens=True)
    length = len(encoding.ids)
    if length and encoding.special_tokens_mask[-1]:
        length -= 1
    return length

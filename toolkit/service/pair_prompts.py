"""Decoder rerankers (Qwen3-Reranker, mxbai-rerank-v2, zerank): a (query, document) pair becomes one
prompt, and the score is read at its last token as logit(true) - logit(false), or logit(true).

Two ways to write the prompt:
- a sentence-transformers CrossEncoder folder (a text-generation Transformer, then LogitScore)
  renders the pair through the tokenizer's chat template as two messages with the roles "query"
  and "document", without special tokens, as sentence-transformers does. Truncation cuts the
  render and writes the template's closing tokens back at the end;
- a plain folder served with --is-reranker takes the Qwen3-Reranker model card's prompt, its
  instruction replaceable per request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from toolkit.errors import InvalidRequestError, ModelLoadError
from toolkit.service.model_json import json_dict
from toolkit.service.tokenization import TextTokenizer

QWEN3_RERANKER = "qwen3-reranker"
QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
_QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
_QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
# Two contents that tokenize differently: the tokens their renders share at the end are the template's.
_FILLERS = ("0", "1 2 3 4")
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


@dataclass(frozen=True)
class PromptedPairs:
    """`template`: a chat template's source, or QWEN3_RERANKER; `variables`: what the template may
    read besides the messages (the tokenizer's special tokens, sentence-transformers' chat-template
    arguments)."""

    true_token: int
    false_token: int | None
    template: str
    variables: dict[str, Any] = field(default_factory=dict)
    restore_tail: bool = True  # sentence-transformers' restore_suffix: truncation keeps the tail


def read_logit_score(score_dir: Path, transformer_dir: Path) -> PromptedPairs:
    """A sentence-transformers causal CrossEncoder: LogitScore's tokens, the chat template."""
    score = json_dict(score_dir / "config.json")
    true_token = score.get("true_token_id")
    if not isinstance(true_token, int):
        raise ModelLoadError(f"{score_dir / 'config.json'} names no true_token_id")
    tokenizer_cfg = json_dict(transformer_dir / "tokenizer_config.json")
    jinja_file = transformer_dir / "chat_template.jinja"
    template = jinja_file.read_text() if jinja_file.is_file() else tokenizer_cfg.get("chat_template")
    if not isinstance(template, str):
        raise ModelLoadError(f"{transformer_dir} has no chat template to write (query, document) pairs with")
    st_cfg = json_dict(transformer_dir / "sentence_bert_config.json")
    chat_kwargs = dict((st_cfg.get("processing_kwargs") or {}).get("chat_template") or {})
    restore_tail = bool(chat_kwargs.pop("restore_suffix", True))
    variables = {
        key: _token_text(tokenizer_cfg.get(key)) for key in _SPECIAL_TOKEN_KEYS if tokenizer_cfg.get(key)
    }
    pairs = PromptedPairs(true_token, score.get("false_token_id"), template, variables | chat_kwargs)
    return replace(pairs, restore_tail=restore_tail)


def qwen3_reranker(tokenizer: TextTokenizer) -> PromptedPairs:
    """The Qwen3-Reranker model card's recipe: P(yes) against "no" after its prompt."""
    ids = [tokenizer.token_id(word) for word in ("yes", "no")]
    if None in ids:
        raise ModelLoadError('--is-reranker on a causal LM needs "yes" and "no" tokens in its vocabulary')
    return PromptedPairs(ids[0], ids[1], QWEN3_RERANKER)


class PairPrompter:
    """Token ids of each pair's prompt, cut to `limit` when asked."""

    def __init__(self, pairs: PromptedPairs, tokenizer: TextTokenizer) -> None:
        self.pairs, self.tokenizer = pairs, tokenizer

    def encode(
        self, pairs: list[tuple[str, str]], limit: int, truncate: bool, instruction: str | None
    ) -> list[list[int]]:
        if self.pairs.template == QWEN3_RERANKER:
            return self._qwen3(pairs, limit, truncate, instruction)
        if instruction is not None:
            raise InvalidRequestError(
                "this reranker writes its prompt with its chat template, which takes no instruction",
                param="instruction",
            )
        texts = [self._render(query, document) for query, document in pairs]
        ids = self.tokenizer.encode(texts, add_special_tokens=False)
        if not truncate:
            return ids
        tail = self._template_tail if self.pairs.restore_tail else []
        return [seq if len(seq) <= limit else seq[: limit - len(tail)] + tail for seq in ids]

    def _qwen3(
        self, pairs: list[tuple[str, str]], limit: int, truncate: bool, instruction: str | None
    ) -> list[list[int]]:
        prefix, suffix = self._qwen3_frame
        task = QWEN3_INSTRUCTION if instruction is None else instruction
        bodies = [
            f"<Instruct>: {task}\n<Query>: {query}\n<Document>: {document}" for query, document in pairs
        ]
        room = limit - len(prefix) - len(suffix)
        ids = (
            self.tokenizer.encode_truncated(bodies, room, "right")
            if truncate
            else self.tokenizer.encode(bodies)
        )
        return [prefix + seq + suffix for seq in ids]

    @cached_property
    def _qwen3_frame(self) -> tuple[list[int], list[int]]:
        prefix, suffix = self.tokenizer.encode([_QWEN3_PREFIX, _QWEN3_SUFFIX], add_special_tokens=False)
        return prefix, suffix

    @cached_property
    def _compiled(self) -> jinja2.Template:
        return _environment().from_string(self.pairs.template)

    def _render(self, query: str, document: str) -> str:
        messages = [{"role": "query", "content": query}, {"role": "document", "content": document}]
        variables = {"add_generation_prompt": False} | self.pairs.variables
        try:
            return self._compiled.render(messages=messages, **variables)
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"the model's chat template refused this pair: {exc}") from None

    @cached_property
    def _template_tail(self) -> list[int]:
        """The tokens the template writes after the document, which truncation must keep."""
        first, second = self.tokenizer.encode([self._render(filler, filler) for filler in _FILLERS], False)
        count = 0
        for left, right in zip(reversed(first), reversed(second), strict=False):
            if left != right:
                break
            count += 1
        return first[len(first) - count :] if 0 < count < min(len(first), len(second)) else []


def _environment() -> ImmutableSandboxedEnvironment:
    """Chat templates run as transformers runs them: sandboxed, trimmed blocks, loop controls."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **options: Any) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **options)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value

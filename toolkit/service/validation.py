"""The checks a request's content must pass against the model, each raising the client's 4xx.

Cheap checks come first: the input's structure is sorted out by counts and lengths before any
element is looked at, every element is looked at once at most, and a text's characters are
counted before it is tokenized. Every route's request goes through these same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from toolkit.errors import ContextLengthExceededError, InvalidRequestError
from toolkit.scheduling.work import WorkItem
from toolkit.service.model_spec import EmbeddingSpec

_INPUT_FORMS = "a string, a list of strings, a list of token ids or a list of token-id lists"


@dataclass(frozen=True)
class RequestLimits:
    context_length: int
    vocab_size: int
    max_inputs_per_request: int
    truncate: bool
    truncation_side: str
    default_prompt_name: str | None
    max_tokens_per_request: int | None = None
    request_timeout: float | None = None


@dataclass(frozen=True)
class Inputs:
    """A request's inputs, sorted: texts or token-id lists (one of the two is None)."""

    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None


def sort_inputs(
    raw: object, param: str, limits: RequestLimits, max_chars: int, truncate_side: str | None
) -> Inputs:
    """Sort a request's raw input (parsed JSON, or a caller's Python values) into texts or
    token-id lists. Texts over `max_chars` characters are refused, or cut to it where
    `truncate_side` says which end truncation cuts."""
    if isinstance(raw, str):
        raw = [raw]
    elif not isinstance(raw, list):
        raise InvalidRequestError(f"'{param}' must be {_INPUT_FORMS}, not {_type_name(raw)}", param=param)
    elif raw and _is_token_id(raw[0]):  # one list of token ids
        return Inputs(token_ids=[_token_ids(raw, param, param, limits.context_length)])
    check_count(len(raw), limits.max_inputs_per_request, param)
    if isinstance(raw[0], str):
        fit = _TextFit(param, max_chars, truncate_side, limits.context_length)
        return Inputs(texts=[fit(item, index) for index, item in enumerate(raw)])
    if isinstance(raw[0], list):
        return Inputs(token_ids=_token_id_lists(raw, param, limits))
    expected = "a string, a token id or a list of token ids"
    raise InvalidRequestError(f"{param}[0] must be {expected}, not {_type_name(raw[0])}", param=param)


@dataclass(frozen=True)
class _TextFit:
    """Checks one text of a request: a string, not empty, and within `max_chars` characters, or
    cut to them from `truncate_side` (None: refused)."""

    param: str
    max_chars: int
    truncate_side: str | None
    context_length: int

    def __call__(self, text: object, index: int) -> str:
        where, param = f"{self.param}[{index}]", self.param
        if not isinstance(text, str):
            expected = "a string like the inputs before it"
            raise InvalidRequestError(f"{where} must be {expected}, not {_type_name(text)}", param=param)
        if not text:
            raise InvalidRequestError(f"{where} is an empty string; every input must hold text", param=param)
        if len(text) <= self.max_chars:
            return text
        if self.truncate_side is None:
            raise ContextLengthExceededError(
                f"{where} has {len(text)} characters, more than this model's context of "
                f"{self.context_length} tokens can hold (at most {self.max_chars}); shorten it or "
                'send "truncate": true',
                param=param,
            )
        return text[: self.max_chars] if self.truncate_side == "right" else text[-self.max_chars :]


def _token_id_lists(raw: list[object], param: str, limits: RequestLimits) -> list[list[int]]:
    lists, total, budget = [], 0, limits.max_tokens_per_request
    for index, item in enumerate(raw):
        where = f"{param}[{index}]"
        if not isinstance(item, list):
            raise InvalidRequestError(
                f"{where} must be a list of token ids like the inputs before it, not {_type_name(item)}",
                param=param,
            )
        lists.append(_token_ids(item, where, param, limits.context_length))
        total += len(item)
        if budget is not None and total > budget:  # before the rest is looked at
            raise InvalidRequestError(
                f"'{param}' holds more than {budget} tokens in all; at most {budget} are allowed per request",
                param=param,
                code="max_tokens_per_request_exceeded",
            )
    return lists


def _token_ids(ids: list[object], where: str, param: str, context_length: int) -> list[int]:
    if not ids:
        raise InvalidRequestError(f"{where} is an empty list of token ids", param=param)
    if len(ids) > context_length:  # before any element is looked at
        raise ContextLengthExceededError(
            f"{where} has {len(ids)} tokens, more than this model's context length of {context_length}",
            param=param,
        )
    for position, token in enumerate(ids):
        if not _is_token_id(token):
            raise InvalidRequestError(
                f"{where}[{position}] must be an integer token id, not {_type_name(token)}", param=param
            )
    return ids  # type: ignore[return-value]  # every element is an int


def _is_token_id(value: object) -> bool:
    return type(value) is int  # not bool, which JSON's true would be


def _type_name(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return names.get(type(value), "a list" if isinstance(value, list) else "an object")


def check_count(count: int, limit: int, param: str) -> None:
    if count == 0:
        raise InvalidRequestError(f"'{param}' must not be empty", param=param)
    if count > limit:
        raise InvalidRequestError(
            f"'{param}' holds {count} inputs; at most {limit} are allowed per request", param=param
        )


def check_vocabulary(ids: Sequence[int], where: str, param: str, vocab: int) -> None:
    # min/max run in C; only a failing list is scanned again, for the message.
    if min(ids) < 0 or max(ids) >= vocab:
        bad = next(t for t in ids if not 0 <= t < vocab)
        raise InvalidRequestError(
            f"{where} holds token id {bad}, outside this model's vocabulary 0..{vocab - 1}", param=param
        )


def check_total_tokens(items: Sequence[WorkItem], limit: int | None, param: str) -> None:
    total = sum(len(item.token_ids) for item in items)
    if limit is not None and total > limit:
        raise InvalidRequestError(
            f"'{param}' holds {total} tokens in all; at most {limit} are allowed per request",
            param=param,
            code="max_tokens_per_request_exceeded",
        )


def check_dimensions(
    dimensions: int | None, embedding_dim: int, matryoshka: Sequence[int] | None, param: str = "dimensions"
) -> None:
    if dimensions is None:
        return
    if matryoshka is not None and dimensions not in matryoshka and dimensions != embedding_dim:
        raise InvalidRequestError(
            f"{param} must be one of this model's Matryoshka sizes {list(matryoshka)}",
            param=param,
        )
    if not 1 <= dimensions <= embedding_dim:
        raise InvalidRequestError(
            f"{param} must be between 1 and {embedding_dim}, got {dimensions}", param=param
        )


def resolve_prompt(
    prompt: str | None, prompt_name: str | None, default_name: str | None, spec: EmbeddingSpec
) -> str | None:
    """The prompt text a request asks for: its own, a named one of the model's, or the default."""
    if prompt is not None and prompt_name is not None:
        raise InvalidRequestError("send either 'prompt' or 'prompt_name', not both", param="prompt")
    if prompt is not None:
        return prompt
    name = prompt_name or default_name
    if name is None:
        return None
    if name not in spec.prompts:
        known = ", ".join(sorted(spec.prompts)) or "none"
        raise InvalidRequestError(
            f"unknown prompt_name {name!r}; this model's prompts: {known}", param="prompt_name"
        )
    return spec.prompts[name]


def text_list(raw: object, param: str, limit: int, objects: bool = False) -> list[str]:
    """One text or a list of texts, counted before any is looked at; with `objects`, an item may
    also be `{"text": ...}`, as Cohere's and Jina's documents are."""
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list):
        raise InvalidRequestError(
            f"'{param}' must be a string or a list of strings, not {_type_name(raw)}", param=param
        )
    check_count(len(raw), limit, param)
    texts = []
    for index, item in enumerate(raw):
        if objects and isinstance(item, dict):
            item = item.get("text")
        if not isinstance(item, str):
            expected = 'a string or {"text": a string}' if objects else "a string"
            raise InvalidRequestError(
                f"{param}[{index}] must be {expected}, not {_type_name(item)}", param=param
            )
        texts.append(item)
    return texts

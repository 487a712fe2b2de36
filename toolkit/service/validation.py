"""The checks a request's content must pass against the model, each raising the client's 4xx.

Cheap checks come first (counts, lengths, ranges checked in C); the caller tokenizes only after
them. Every route's request goes through these same functions.
"""

from __future__ import annotations

from collections.abc import Sequence

from toolkit.errors import ContextLengthExceededError, InvalidRequestError
from toolkit.scheduling.work import WorkItem
from toolkit.service.model_spec import EmbeddingSpec


def check_count(count: int, limit: int, param: str) -> None:
    if count == 0:
        raise InvalidRequestError(f"'{param}' must not be empty", param=param)
    if count > limit:
        raise InvalidRequestError(
            f"'{param}' holds {count} inputs; at most {limit} are allowed per request", param=param
        )


def check_texts(texts: Sequence[str], param: str) -> None:
    for index, text in enumerate(texts):
        if not text:
            raise InvalidRequestError(
                f"{param}[{index}] is an empty string; every input must hold text", param=param
            )


def check_token_ids(ids: Sequence[int], where: str, param: str, vocab: int, context_length: int) -> None:
    if not ids:
        raise InvalidRequestError(f"{where} is an empty list of token ids", param=param)
    # min/max run in C; only a failing list is scanned again, for the message.
    if min(ids) < 0 or max(ids) >= vocab:
        bad = next(t for t in ids if not 0 <= t < vocab)
        raise InvalidRequestError(
            f"{where} holds token id {bad}, outside this model's vocabulary 0..{vocab - 1}", param=param
        )
    if len(ids) > context_length:
        raise ContextLengthExceededError(
            f"{where} has {len(ids)} tokens, more than this model's context length of {context_length}",
            param=param,
        )


def check_total_tokens(items: Sequence[WorkItem], limit: int | None, param: str) -> None:
    total = sum(len(item.token_ids) for item in items)
    if limit is not None and total > limit:
        raise InvalidRequestError(
            f"'{param}' holds {total} tokens in all; at most {limit} are allowed per request",
            param=param,
            code="max_tokens_per_request_exceeded",
        )


def check_dimensions(dimensions: int | None, embedding_dim: int, matryoshka: Sequence[int] | None) -> None:
    if dimensions is None:
        return
    if matryoshka is not None and dimensions not in matryoshka and dimensions != embedding_dim:
        raise InvalidRequestError(
            f"dimensions must be one of this model's Matryoshka sizes {list(matryoshka)}",
            param="dimensions",
        )
    if not 1 <= dimensions <= embedding_dim:
        raise InvalidRequestError(
            f"dimensions must be between 1 and {embedding_dim}, got {dimensions}", param="dimensions"
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

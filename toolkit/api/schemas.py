"""Request bodies of the HTTP API. Strict types: "1" is not a token id and true is not a string.

The inputs themselves (`input`, `text`, `input_ids`) are described here for the OpenAPI schema but
not validated by pydantic: `toolkit.service.validation.sort_inputs` checks them, counts and
lengths before elements, where pydantic would build an error for every element of a million.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, SkipValidation, StrictBool, StrictInt, StrictStr

TokenIds = list[StrictInt]
EmbeddingInput = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings: OpenAI's fields, plus prompts and truncation as extra body fields."""

    model_config = ConfigDict(extra="ignore")

    input: SkipValidation[EmbeddingInput]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    prompt_name: StrictStr | None = None
    prompt: StrictStr | None = None
    truncate: StrictBool | None = None
    truncation_side: Literal["left", "right"] | None = None


class EncodeRequest(BaseModel):
    """POST /encode, SGLang's native shape: `text` or `input_ids`, one input or a list."""

    model_config = ConfigDict(extra="ignore")

    text: SkipValidation[StrictStr | list[StrictStr] | None] = None
    input_ids: SkipValidation[TokenIds | list[TokenIds] | None] = None
    dimensions: StrictInt | None = None
    prompt_name: StrictStr | None = None
    prompt: StrictStr | None = None
    truncate: StrictBool | None = None
    truncation_side: Literal["left", "right"] | None = None

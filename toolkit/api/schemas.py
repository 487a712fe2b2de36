"""Request bodies of the HTTP API. Strict types: "1" is not a token id and true is not a string.

The inputs themselves (`input`, `text`, `input_ids`) are described here for the OpenAPI schema but
not validated by pydantic: `toolkit.service.validation.sort_inputs` checks them, counts and
lengths before elements, where pydantic would build an error for every element of a million.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, StrictBool, StrictInt, StrictStr

TokenIds = list[StrictInt]
Side = Literal["left", "right"]
CompactType = Literal["float", "int8", "uint8", "binary", "ubinary"]
MAX_TOP_N = 2**31 - 1
MAX_INSTRUCTION_CHARS = 4096
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
    truncation_side: Side | None = None
    # Not OpenAI's: a compact form of each vector (toolkit.service.compact); absent, floats.
    embedding_type: CompactType | None = None
    # Not OpenAI's, for sparse models: (index, value) pairs instead of a vocabulary-wide vector,
    # and how many of the largest components to keep.
    sparse: StrictBool = False
    max_active_dims: StrictInt | None = Field(default=None, ge=1)


class EncodeRequest(BaseModel):
    """POST /encode, SGLang's native shape: `text` or `input_ids`, one input or a list."""

    model_config = ConfigDict(extra="ignore")

    text: SkipValidation[StrictStr | list[StrictStr] | None] = None
    input_ids: SkipValidation[TokenIds | list[TokenIds] | None] = None
    dimensions: StrictInt | None = None
    prompt_name: StrictStr | None = None
    prompt: StrictStr | None = None
    truncate: StrictBool | None = None
    truncation_side: Side | None = None


class RerankRequest(BaseModel):
    """POST /v1/rerank, /rerank, /v2/rerank: the fields Cohere, Jina, vLLM and SGLang clients send."""

    model_config = ConfigDict(extra="ignore")

    query: StrictStr
    documents: SkipValidation[list[StrictStr | dict[str, Any]]]
    model: StrictStr | None = None
    top_n: StrictInt | None = Field(default=None, ge=1, le=MAX_TOP_N)
    return_documents: StrictBool = True
    truncate: StrictBool | None = None
    truncation_side: Side | None = None
    # A decoder reranker's task (Qwen3-Reranker's Instruct); it is repeated in every pair.
    instruction: StrictStr | None = Field(default=None, max_length=MAX_INSTRUCTION_CHARS)


class ScoreRequest(BaseModel):
    """POST /v1/score, /score: vLLM's pairs, `text_1` against each of `text_2` or pairwise."""

    model_config = ConfigDict(extra="ignore")

    text_1: SkipValidation[StrictStr | list[StrictStr]]
    text_2: SkipValidation[StrictStr | list[StrictStr]]
    model: StrictStr | None = None
    truncate: StrictBool | None = None
    truncation_side: Side | None = None
    instruction: StrictStr | None = Field(default=None, max_length=MAX_INSTRUCTION_CHARS)


class CohereEmbedRequest(BaseModel):
    """POST /v2/embed, Cohere's: texts only (no images)."""

    model_config = ConfigDict(extra="ignore")

    texts: SkipValidation[list[StrictStr]]
    model: StrictStr | None = None
    input_type: Literal["search_query", "search_document", "classification", "clustering"] | None = None
    # Checked by count first (toolkit.api.bodies.embedding_types), not item by item here.
    embedding_types: SkipValidation[list[CompactType | Literal["base64"]] | None] = None
    output_dimension: StrictInt | None = None
    truncate: Literal["NONE", "START", "END"] | None = None
    images: None = None
    inputs: None = None


class SparseEmbedRequest(BaseModel):
    """POST /embed_sparse, text-embeddings-inference's: a text or texts of a sparse model."""

    model_config = ConfigDict(extra="ignore")

    inputs: SkipValidation[StrictStr | list[StrictStr]]
    model: StrictStr | None = None
    truncate: StrictBool | None = None
    truncation_direction: Literal["left", "right", "Left", "Right"] | None = None
    prompt_name: StrictStr | None = None
    # The route of an inference-free model, and the prompt of that name where the model has one.
    input_type: Literal["query", "document", "search_query", "search_document"] | None = None
    max_active_dims: StrictInt | None = Field(default=None, ge=1)


class TokenizeRequest(BaseModel):
    """POST /tokenize, SGLang's and vLLM's: a text or texts."""

    model_config = ConfigDict(extra="ignore")

    prompt: SkipValidation[StrictStr | list[StrictStr]]
    model: StrictStr | None = None
    add_special_tokens: StrictBool | None = None  # default: as the model tokenizes its inputs


class DetokenizeRequest(BaseModel):
    """POST /detokenize: one list of token ids."""

    model_config = ConfigDict(extra="ignore")

    tokens: SkipValidation[TokenIds]
    model: StrictStr | None = None
    skip_special_tokens: StrictBool = False

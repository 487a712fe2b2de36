"""Find a model and read the files the request side needs: its spec and its tokenizer.

Quick and torch-free, so it runs before the server binds (a missing model is one clear error line
and a non-zero exit) and in every front-end process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from toolkit.errors import ModelLoadError
from toolkit.service.model_json import json_dict
from toolkit.service.model_source import resolve_model_dir
from toolkit.service.model_spec import EmbeddingSpec, decoder_reranker_fields, read_embedding_spec
from toolkit.service.pair_prompts import qwen3_reranker
from toolkit.service.tokenization import TextTokenizer


@dataclass(frozen=True)
class ModelFiles:
    model_dir: Path
    tokenizer_dir: Path
    spec: EmbeddingSpec
    tokenizer: TextTokenizer


def read_model_files(
    model_path: str | None,
    tokenizer_path: str | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    reranker: bool = False,
) -> ModelFiles:
    """Resolve the model and read its configuration and tokenizer; `pooling` and `normalize`
    override an embedding model's own; `reranker` insists on a cross-encoder. Raises
    ModelLoadError."""
    model_dir = resolve_model_dir(model_path)
    if not (model_dir / "config.json").is_file() and not (model_dir / "modules.json").is_file():
        raise ModelLoadError(f"{model_dir} holds neither config.json nor modules.json")
    spec = read_embedding_spec(model_dir)
    tokenizer_dir = resolve_model_dir(tokenizer_path) if tokenizer_path else spec.transformer_dir
    tokenizer = TextTokenizer.from_dir(tokenizer_dir, special_tokens=not spec.static)
    if reranker and not spec.is_cross_encoder:
        spec = _causal_reranker(spec, tokenizer)
    if spec.is_cross_encoder and (pooling is not None or normalize is not None):
        raise ModelLoadError(
            f"{model_dir} is a cross-encoder: it reads its first token and is not normalized, so "
            "--pooling and --normalize do not apply"
        )
    if spec.sparse is not None and (pooling is not None or normalize is not None):
        raise ModelLoadError(
            f"{model_dir} is a sparse model: SpladePooling makes its vectors, unnormalized, so "
            "--pooling and --normalize do not apply"
        )
    if pooling is not None:
        spec = replace(spec, pooling_modes=(pooling,))
    if normalize is not None:
        spec = replace(spec, normalize=normalize)
    return ModelFiles(model_dir, tokenizer_dir, spec, tokenizer)


def _causal_reranker(spec: EmbeddingSpec, tokenizer: TextTokenizer) -> EmbeddingSpec:
    """--is-reranker on a plain causal LM folder: the Qwen3-Reranker model card's recipe."""
    if (spec.transformer_dir / "modules.json").is_file():
        raise ModelLoadError(
            f"--is-reranker: {spec.transformer_dir} is not a cross-encoder: it is a sentence-transformers "
            "embedding model (its modules.json pools token states)"
        )
    hf_cfg = json_dict(spec.transformer_dir / "config.json")
    if not any(str(name).endswith("ForCausalLM") for name in hf_cfg.get("architectures") or ()):
        raise ModelLoadError(
            f"--is-reranker: {spec.transformer_dir} is not a cross-encoder (its config.json names no "
            "*ForSequenceClassification or *ForCausalLM architecture)"
        )
    return replace(spec, **decoder_reranker_fields(qwen3_reranker(tokenizer), hf_cfg, {}))

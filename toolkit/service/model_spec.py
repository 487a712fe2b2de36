"""How a model turns token states into an embedding, read from its sentence-transformers files.

`modules.json` names the Transformer, Pooling and Normalize modules; `1_Pooling/config.json` the
pooling; `sentence_bert_config.json` the max length and lower-casing (sentence-transformers 6
saves the max length as the tokenizer's `model_max_length` instead);
`config_sentence_transformers.json` the prompts. A plain transformers checkpoint without these
files gets sentence-transformers' own defaults for such a model, with last-token pooling for
decoders (the convention of every decoder embedder).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import ModelLoadError
from toolkit.models.registry import family_of, is_classifier, num_labels
from toolkit.service.model_json import as_dict, class_name, json_dict, read_json, saved_model_max_length
from toolkit.service.pair_prompts import PromptedPairs, read_logit_score
from toolkit.service.sparse_spec import SparseSpec, read_sparse_spec

logger = logging.getLogger(__name__)

POOLING_MODES = ("cls", "mean", "lasttoken", "max", "mean_sqrt_len_tokens", "weightedmean")

_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_IGNORED_MODULES = (
    "Transformer",
    "StaticEmbedding",
    "Pooling",
    "Dense",
    "LayerNorm",
    "Normalize",
    "LogitScore",
)
VECTOR_MODULES = ("Dense", "LayerNorm")
# sentence-transformers' Dense activations (saved as class paths) that the server applies.
DENSE_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid")


@dataclass(frozen=True)
class VectorModule:
    """A sentence-transformers module over the pooled vector: `Dense` (a linear layer, then its
    `activation`, a name of DENSE_ACTIVATIONS) or `LayerNorm` (over `in_features`); the weights
    are in `path`'s model.safetensors."""

    kind: str
    path: Path
    in_features: int
    out_features: int
    bias: bool = True
    activation: str = "Identity"


@dataclass(frozen=True)
class EmbeddingSpec:
    transformer_dir: Path
    pooling_modes: tuple[str, ...]
    include_prompt: bool = True
    normalize: bool = True
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    matryoshka_dimensions: tuple[int, ...] | None = None
    vector_modules: tuple[VectorModule, ...] = ()  # after pooling, in order
    # A StaticEmbedding model: the mean of per-token vectors, tokens without special tokens.
    static: bool = False
    # A cross-encoder ("rerank") scores text pairs: its labels' logits go through `activation`.
    task: str = "embed"
    labels: int = 0
    activation: str = "identity"
    # A sparse model ("sparse" task): SPLADE, and an inference-free model's query route.
    sparse: SparseSpec | None = None
    # A decoder reranker: how a pair becomes one prompt, and the tokens its score reads.
    prompted: PromptedPairs | None = None
    # A decoder classifier reads the last token that is not this (its pad id), as transformers does.
    score_skips: int | None = None

    @property
    def is_cross_encoder(self) -> bool:
        return self.task == "rerank"


# sentence-transformers' CrossEncoder activations (saved as class paths) that we apply.
_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity"}


def _cross_encoder_fields(hf_cfg: dict[str, Any], st_cfg: dict[str, Any]) -> dict[str, Any]:
    """A cross-encoder's spec fields (its first token, unnormalized, through its activation), or
    none for an embedding model (a sentence-transformers bi-encoder may sit on a classifier's
    checkpoint). The activation is sentence-transformers': the saved one, else sigmoid."""
    if not is_classifier(hf_cfg) or st_cfg.get("model_type", "CrossEncoder") != "CrossEncoder":
        return {}
    model_type = hf_cfg.get("model_type")
    family = family_of(model_type)
    if family not in ("encoder", "decoder"):
        raise ModelLoadError(
            f"cross-encoders of model_type {model_type!r} are not served yet; BERT, RoBERTa, "
            "XLM-RoBERTa, MPNet, Llama, Mistral, Qwen2 and Qwen3 ones are"
        )
    if family == "decoder" and hf_cfg.get("is_causal") is False:
        # transformers reads the last token that is not padding, under attention that sees the
        # tokens after it: one row of our packed forward cannot give that.
        raise ModelLoadError("bidirectional decoder cross-encoders are not served yet; causal ones are")
    labels = num_labels(hf_cfg)
    if labels != 1:
        raise ModelLoadError(f"this cross-encoder has {labels} labels; ranking and scoring need one")
    return {
        # A decoder classifier reads its last token, as transformers' *ForSequenceClassification do.
        "pooling_modes": ("cls",) if family == "encoder" else ("lasttoken",),
        "normalize": False,
        "task": "rerank",
        "labels": labels,
        "activation": _activation(hf_cfg, st_cfg),
        "score_skips": hf_cfg.get("pad_token_id") if family == "decoder" else None,
    }


def _activation(hf_cfg: dict[str, Any], st_cfg: dict[str, Any]) -> str:
    """A one-label cross-encoder's activation: the saved one, else sentence-transformers' sigmoid."""
    legacy = as_dict(hf_cfg.get("sentence_transformers"))
    saved = st_cfg.get("activation_fn") or legacy.get("activation_fn")
    if saved is None:
        return "sigmoid"
    name = class_name(saved)
    if name not in _ACTIVATIONS:
        raise ModelLoadError(f"unsupported cross-encoder activation {saved!r}; known: {list(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def decoder_reranker_fields(
    pairs: PromptedPairs, hf_cfg: dict[str, Any], st_cfg: dict[str, Any]
) -> dict[str, Any]:
    """A decoder reranker's spec fields: its last token, scored through `pairs`' tokens."""
    model_type = hf_cfg.get("model_type")
    if family_of(model_type) != "decoder":
        raise ModelLoadError(
            f"decoder rerankers of model_type {model_type!r} are not served; Llama, Mistral, Qwen2 "
            "and Qwen3 causal LMs are"
        )
    if any(st_cfg.get("prompts") or {}):
        raise ModelLoadError("cross-encoder prompts are not served yet; this reranker saves some")
    return {
        "pooling_modes": ("lasttoken",),
        "normalize": False,
        "task": "rerank",
        "labels": 1,
        "activation": _activation(hf_cfg, st_cfg),
        "prompted": pairs,
    }


def read_embedding_spec(model_dir: Path) -> EmbeddingSpec:
    modules = read_json(model_dir / "modules.json")
    if not isinstance(modules, list):
        return _spec_without_st_files(model_dir)
    by_kind = {class_name(m.get("type", "")): m for m in modules}
    st_cfg = json_dict(model_dir / "config_sentence_transformers.json")
    if st_cfg.get("model_type") == "SparseEncoder" or {"SpladePooling", "Router"} & set(by_kind):
        return _sparse_embedding_spec(model_dir, modules, st_cfg)
    unknown = [kind for kind in by_kind if kind not in _IGNORED_MODULES]
    if unknown:
        raise ModelLoadError(f"unsupported sentence-transformers modules in {model_dir}: {unknown}")
    static = "StaticEmbedding" in by_kind
    transformer_dir = model_dir / by_kind.get("StaticEmbedding" if static else "Transformer", {}).get(
        "path", ""
    )
    pooling_cfg: dict[str, Any] = {}
    if "Pooling" in by_kind:
        pooling_cfg = json_dict(model_dir / by_kind["Pooling"].get("path", "1_Pooling") / "config.json")
    bert_cfg = json_dict(transformer_dir / "sentence_bert_config.json")
    if not bert_cfg:
        bert_cfg = json_dict(model_dir / "sentence_bert_config.json")
    hf_cfg = json_dict(transformer_dir / "config.json")
    fields: dict[str, Any] = {
        "pooling_modes": _pooling_modes(pooling_cfg, hf_cfg),
        "normalize": "Normalize" in by_kind,
    }
    if "LogitScore" in by_kind:
        pairs = read_logit_score(model_dir / by_kind["LogitScore"].get("path", ""), transformer_dir)
        fields = decoder_reranker_fields(pairs, hf_cfg, st_cfg)
    elif "Pooling" not in by_kind:
        fields |= _cross_encoder_fields(hf_cfg, st_cfg)
    return EmbeddingSpec(
        transformer_dir=transformer_dir,
        include_prompt=bool(pooling_cfg.get("include_prompt", True)),
        max_seq_length=(
            _static_max_length(transformer_dir)
            if static
            else _max_seq_length(bert_cfg, hf_cfg, transformer_dir, model_dir)
        ),
        do_lower_case=bool(bert_cfg.get("do_lower_case", False)),
        prompts=dict(st_cfg.get("prompts") or {}),
        default_prompt_name=st_cfg.get("default_prompt_name"),
        matryoshka_dimensions=_matryoshka(hf_cfg, st_cfg),
        vector_modules=_vector_modules(model_dir, modules),
        static=static,
        **fields,
    )


def _sparse_embedding_spec(model_dir: Path, modules: list[Any], st_cfg: dict[str, Any]) -> EmbeddingSpec:
    """A SparseEncoder: SPLADE over an encoder's masked-language-model head, not normalized."""
    transformer_dir, sparse = read_sparse_spec(model_dir, modules, st_cfg)
    hf_cfg = json_dict(transformer_dir / "config.json")
    if family_of(hf_cfg.get("model_type")) != "encoder":
        raise ModelLoadError(
            f"SPLADE over model_type {hf_cfg.get('model_type')!r} is not served; BERT, RoBERTa, "
            "XLM-RoBERTa and MPNet masked-language models are"
        )
    bert_cfg = json_dict(transformer_dir / "sentence_bert_config.json")
    return EmbeddingSpec(
        transformer_dir=transformer_dir,
        pooling_modes=(f"splade_{sparse.pooling}",),
        normalize=False,
        max_seq_length=_max_seq_length(bert_cfg, hf_cfg, transformer_dir, model_dir),
        do_lower_case=bool(bert_cfg.get("do_lower_case", False)),
        prompts=dict(st_cfg.get("prompts") or {}),
        default_prompt_name=st_cfg.get("default_prompt_name"),
        task="sparse",
        sparse=sparse,
    )


def _vector_modules(model_dir: Path, modules: list[Any]) -> tuple[VectorModule, ...]:
    """The Dense and LayerNorm modules, in order; they must come after pooling and before
    normalization."""
    kinds = [class_name(module.get("type", "")) for module in modules]
    found = [index for index, kind in enumerate(kinds) if kind in VECTOR_MODULES]
    if not found:
        return ()
    pooling = kinds.index("Pooling") if "Pooling" in kinds else -1
    normalize = kinds.index("Normalize") if "Normalize" in kinds else len(kinds)
    if found[0] < pooling or found[-1] > normalize:
        raise ModelLoadError(
            f"a {kinds[found[0]]} module outside pooling and normalization in {model_dir}: {kinds}"
        )
    paths = [model_dir / str(modules[index].get("path", "")) for index in found]
    return tuple(
        _dense(path) if kinds[index] == "Dense" else _layer_norm(path)
        for index, path in zip(found, paths, strict=True)
    )


def _layer_norm(path: Path) -> VectorModule:
    dimension = json_dict(path / "config.json").get("dimension")
    if not isinstance(dimension, int) or dimension < 1:
        raise ModelLoadError(f"{path / 'config.json'} does not describe a LayerNorm module")
    return VectorModule("LayerNorm", path, dimension, dimension)


def _dense(path: Path) -> VectorModule:
    cfg = json_dict(path / "config.json")
    activation = class_name(cfg.get("activation_function", "torch.nn.modules.activation.Tanh"))
    if activation not in DENSE_ACTIVATIONS:
        raise ModelLoadError(
            f"unsupported Dense activation {activation!r} in {path}; known: {DENSE_ACTIVATIONS}"
        )
    try:
        return VectorModule(
            "Dense",
            path,
            int(cfg["in_features"]),
            int(cfg["out_features"]),
            bool(cfg.get("bias", True)),
            activation,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} does not describe a Dense module: {exc}") from None


def _pooling_modes(pooling_cfg: dict[str, Any], hf_cfg: dict[str, Any]) -> tuple[str, ...]:
    mode = pooling_cfg.get("pooling_mode")
    if isinstance(mode, str):
        modes: tuple[str, ...] = (mode,)
    elif isinstance(mode, list):
        modes = tuple(mode)
    else:
        modes = tuple(name for key, name in _LEGACY_POOLING_KEYS.items() if pooling_cfg.get(key))
    if not modes:
        modes = _default_pooling(hf_cfg)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise ModelLoadError(f"unknown pooling mode(s) {bad}; known: {list(POOLING_MODES)}")
    return modes


def _default_pooling(hf_cfg: dict[str, Any]) -> tuple[str, ...]:
    is_decoder = family_of(hf_cfg.get("model_type")) in ("decoder", "gemma3")
    return ("lasttoken",) if is_decoder else ("mean",)


def _spec_without_st_files(model_dir: Path) -> EmbeddingSpec:
    hf_cfg = json_dict(model_dir / "config.json")
    cross_encoder = _cross_encoder_fields(hf_cfg, {})
    fields: dict[str, Any] = cross_encoder or {"pooling_modes": _default_pooling(hf_cfg), "normalize": True}
    if not cross_encoder:
        logger.info(
            "No sentence-transformers files in %s: using %s pooling and L2 normalization.",
            model_dir,
            fields["pooling_modes"][0],
        )
    return EmbeddingSpec(
        transformer_dir=model_dir,
        max_seq_length=_max_seq_length({}, hf_cfg, model_dir),
        matryoshka_dimensions=_matryoshka(hf_cfg, {}),
        **fields,
    )


def _static_max_length(directory: Path) -> int | None:
    """StaticEmbedding cuts where its saved tokenizer.json truncates, if it does."""
    truncation = json_dict(directory / "tokenizer.json").get("truncation")
    length = truncation.get("max_length") if isinstance(truncation, dict) else None
    return length if isinstance(length, int) and length > 0 else None


def _max_seq_length(bert_cfg: dict[str, Any], hf_cfg: dict[str, Any], *dirs: Path) -> int | None:
    """The limit sentence-transformers truncates at: its own config's `max_seq_length`, else the
    tokenizer's `model_max_length` capped at the model's positions (as sentence-transformers 6
    saves and reads it); None where neither says (the positions then decide)."""
    length = bert_cfg.get("max_seq_length")
    if isinstance(length, int):
        return length
    for directory in dirs:
        saved = saved_model_max_length(directory)
        if saved is not None:
            positions = hf_cfg.get("max_position_embeddings")
            return min(saved, positions) if isinstance(positions, int) and positions > 0 else saved
    return None


def _matryoshka(hf_cfg: dict[str, Any], st_cfg: dict[str, Any]) -> tuple[int, ...] | None:
    for cfg in (st_cfg, hf_cfg):
        dims = cfg.get("matryoshka_dimensions")
        if isinstance(dims, list) and dims and all(isinstance(d, int) for d in dims):
            return tuple(sorted(dims))
    return None

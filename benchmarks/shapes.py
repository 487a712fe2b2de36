"""Random-weight checkpoints with the exact configs of real embedding models, for benchmarks.

Weights are random (there is no model hub here), so only speed is meaningful; the inputs are
token ids. Building needs transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # Alibaba-NLP/gte-Qwen2-1.5B-instruct's config.json (bidirectional attention, last-token pooling).
    "gte-qwen2-1.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151646,
        "max_position_embeddings": 131072,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "is_causal": False,
        "pooling": "lasttoken",
    },
    # BERT-base (bge-base-en-v1.5, e5-base-v2): CLS pooling.
    "bert-base": {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "pad_token_id": 0,
        "pooling": "cls",
    },
}
# Alibaba-NLP/gte-modernbert-base: ModernBERT-base, CLS pooling, a global layer every three.
SHAPES["modernbert-base"] = {
    "architectures": ["ModernBertModel"],
    "model_type": "modernbert",
    "hidden_size": 768,
    "intermediate_size": 1152,
    "num_hidden_layers": 22,
    "num_attention_heads": 12,
    "vocab_size": 50368,
    "max_position_embeddings": 8192,
    "local_attention": 128,
    "global_attn_every_n_layers": 3,
    "global_rope_theta": 160000.0,
    "local_rope_theta": 10000.0,
    "norm_eps": 1e-5,
    "pad_token_id": 50283,
    "pooling": "cls",
}
# google/embeddinggemma-300m's Gemma3 text model (bidirectional, mean pooling; its two Dense
# layers after pooling are left out: a few hundred kFLOPs per input).
SHAPES["embeddinggemma-300m"] = {
    "architectures": ["Gemma3TextModel"],
    "model_type": "gemma3_text",
    "hidden_size": 768,
    "intermediate_size": 1152,
    "num_hidden_layers": 24,
    "num_attention_heads": 3,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "vocab_size": 262144,
    "max_position_embeddings": 2048,
    "sliding_window": 512,
    "query_pre_attn_scalar": 256,
    "use_bidirectional_attention": True,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "pad_token_id": 0,
    "pooling": "mean",
}
# all-MiniLM-L6-v2 (the bundled model): a smaller BERT with mean pooling, for CPU runs where the
# bundled package cannot go (a lent machine), with token-id inputs.
SHAPES["minilm-l6"] = SHAPES["bert-base"] | {
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "pooling": "mean",
}


def build_shape(name: str, dest: Path, device: str = "cpu", dtype: str = "bfloat16") -> Path:
    """Save a random-weight checkpoint of the named shape (safetensors + sentence-transformers pooling)."""
    import torch
    from transformers import AutoConfig, AutoModel

    spec = dict(SHAPES[name])
    pooling = spec.pop("pooling")
    if (dest / "model.safetensors").exists() or (dest / "model.safetensors.index.json").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(**spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(dest, safe_serialization=True)
    _save_word_tokenizer(dest, config.vocab_size)
    (dest / "1_Pooling").mkdir(exist_ok=True)
    pooling_config = {"pooling_mode": pooling, "word_embedding_dimension": config.hidden_size}
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (dest / "modules.json").write_text(json.dumps(modules))
    return dest


def _save_word_tokenizer(dest: Path, vocab_size: int) -> None:
    """A tokenizer whose words are "t0", "t1", ...: the server needs one, the benchmark sends ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(dest / "tokenizer.json"))

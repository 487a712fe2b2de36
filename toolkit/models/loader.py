"""Build a model for a checkpoint directory: own forward when we have one, transformers if not.

Our modules are created on the meta device and receive the checkpoint tensors by assignment,
so no time is spent on a random initialisation that would be overwritten.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from toolkit.errors import ModelLoadError
from toolkit.models.base import LoadedModel
from toolkit.models.classifier import BODY as _BODY
from toolkit.models.classifier import PairClassifier, TokenScorer, head_state_dict
from toolkit.models.decoder import Decoder, DecoderConfig, decoder_state_dict
from toolkit.models.encoder import Encoder, EncoderConfig, encoder_state_dict
from toolkit.models.gemma3 import Gemma3, Gemma3Config, gemma3_state_dict
from toolkit.models.hf_fallback import load_transformers_model
from toolkit.models.modernbert import ModernBert, ModernBertConfig, modernbert_state_dict
from toolkit.models.registry import family_of, num_labels
from toolkit.models.short_batch_linear import pack_linear_weights
from toolkit.models.sparse import SpladeEncoder, mlm_head_state_dict
from toolkit.models.static import MAX_INPUT_TOKENS, is_static_checkpoint, load_static

logger = logging.getLogger(__name__)

_PROGRESS_FROM_BYTES = 2**30

# Each family's config, module, checkpoint renaming, and a tensor name every checkpoint of the
# family ends with (its prefix is stripped).
_FAMILIES: dict[str, tuple[Any, Any, Any, str]] = {
    "encoder": (EncoderConfig, Encoder, encoder_state_dict, "embeddings.word_embeddings.weight"),
    "decoder": (DecoderConfig, Decoder, decoder_state_dict, "embed_tokens.weight"),
    "modernbert": (ModernBertConfig, ModernBert, modernbert_state_dict, "embeddings.tok_embeddings.weight"),
    "gemma3": (Gemma3Config, Gemma3, gemma3_state_dict, "embed_tokens.weight"),
}


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"no config.json in {model_dir}")
    config: dict[str, Any] = json.loads(path.read_text())
    return config


@dataclass(frozen=True)
class Head:
    """What reads the model's states, as the spec decides: nothing (token states for pooling), a
    cross-encoder's classification head (`classifier`), SPLADE over the masked-language-model
    head with its (pooling, activation), or a causal LM's logits of `scored_tokens` (a decoder
    reranker: true, then false)."""

    classifier: bool = False
    splade: tuple[str, str] | None = None
    scored_tokens: tuple[int, ...] = ()


def load_model(
    model_dir: Path, device: torch.device, dtype: torch.dtype, head: Head | None = None
) -> LoadedModel:
    if is_static_checkpoint(model_dir):
        module = load_static(model_dir).to(device=device, dtype=dtype).eval().requires_grad_(False)
        dim = module.tok_embeddings.embedding_dim
        return LoadedModel(module, module, dim, MAX_INPUT_TOKENS, implementation="native")
    hf = read_hf_config(model_dir)
    model_type = hf.get("model_type", "")
    if family_of(model_type) is not None:
        return _load_native(model_dir, hf, device, dtype, head or Head())
    logger.warning(
        "No packed implementation for model_type=%r: falling back to transformers.AutoModel "
        "with padded batches.",
        model_type,
    )
    return load_transformers_model(model_dir, hf, device, dtype)


def _load_native(
    model_dir: Path, hf: dict[str, Any], device: torch.device, dtype: torch.dtype, head: Head
) -> LoadedModel:
    family = family_of(hf["model_type"]) or ""
    raw = _read_safetensors(model_dir)
    config_type, module_type, state_dict, anchor = _FAMILIES[family]
    cfg = config_type.from_hf(hf)
    weights = _strip_prefix(raw, anchor)
    with torch.device("meta"):
        module: nn.Module = module_type(cfg)
    state = state_dict(weights, cfg)
    module, state, dim = _with_head(module, state, raw, weights[anchor], hf, head)
    module.load_state_dict(state, strict=True, assign=True)
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if device.type == "cpu" and pack_linear_weights(module):
        logger.debug("Short batches take oneDNN products with weights packed at load: faster than MKL here.")
    return LoadedModel(
        forward=module,
        module=module,
        hidden_size=dim,
        max_input_tokens=cfg.max_input_tokens,
        implementation="native",
        compile_pays_off=True,
        compile_needs_graphs=family != "decoder",
        row_pooling_modes=module.row_pooling_modes,
        pools_itself=head.splade is not None,
    )


def _with_head(
    body: nn.Module,
    state: dict[str, torch.Tensor],
    raw: dict[str, torch.Tensor],
    embeddings: torch.Tensor,
    hf: dict[str, Any],
    head: Head,
) -> tuple[nn.Module, dict[str, torch.Tensor], int]:
    """The model with the head that reads it, its tensors, and the width of what it returns."""
    nested = {f"{_BODY}.{key}": value for key, value in state.items()}
    with torch.device("meta"):
        if head.classifier and not isinstance(body, Encoder):
            rows = _scoring_rows(raw, embeddings, head.scored_tokens)
            return TokenScorer(body, rows.shape[0]), nested | {"rows.weight": rows}, 1
        if head.classifier:
            labels = num_labels(hf)
            return PairClassifier(body, labels), nested | head_state_dict(raw), labels
        if head.splade is not None:
            module = SpladeEncoder(body, *head.splade)
            return module, nested | mlm_head_state_dict(raw, embeddings), module.body.cfg.vocab_size
    return body, state, body.cfg.dim


def _scoring_rows(
    raw: dict[str, torch.Tensor], embeddings: torch.Tensor, tokens: tuple[int, ...]
) -> torch.Tensor:
    """A decoder reranker's LM-head rows of its scored tokens (the head may be tied to the
    embeddings), or a decoder classifier's one-label `score` layer."""
    if tokens:
        return raw.get("lm_head.weight", embeddings)[list(tokens)]
    score = next(
        (value for key, value in raw.items() if key == "score.weight" or key.endswith(".score.weight")), None
    )
    if score is None or score.shape[0] != 1:
        raise ModelLoadError("no one-label 'score' layer in this sequence-classification checkpoint")
    return score


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no *.safetensors weights in {model_dir} (only safetensors checkpoints are loaded)"
        )
    progress = _Progress(sum(file.stat().st_size for file in files))
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as shard:
            for key in shard.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                weights[key] = tensor = shard.get_tensor(key)
                progress.advance(tensor.numel() * tensor.element_size())
    return weights


class _Progress:
    """Logs each quarter of a large checkpoint read, so that a slow disk shows progress."""

    def __init__(self, total_bytes: int) -> None:
        self.total, self.done = total_bytes, 0
        self.next_quarter = 1 if total_bytes >= _PROGRESS_FROM_BYTES else 5

    def advance(self, size: int) -> None:
        self.done += size
        while self.next_quarter < 4 and self.done >= self.next_quarter * self.total / 4:
            logger.info("Read %d%% of the weights' %.1f GB.", 25 * self.next_quarter, self.total / 2**30)
            self.next_quarter += 1


def _strip_prefix(weights: dict[str, torch.Tensor], anchor: str) -> dict[str, torch.Tensor]:
    """Drop the wrapper prefix ("bert.", "model.", ...) found before a key every checkpoint has.

    Old BERT checkpoints name LayerNorm parameters gamma/beta; they are renamed on the way.
    """
    prefix = next((key[: -len(anchor)] for key in weights if key.endswith(anchor)), None)
    if prefix is None:
        raise ModelLoadError(f"checkpoint has no tensor named '*{anchor}'")
    stripped = {}
    for key, tensor in weights.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        name = name.removesuffix(".gamma") + ".weight" if name.endswith(".gamma") else name
        name = name.removesuffix(".beta") + ".bias" if name.endswith(".beta") else name
        stripped[name] = tensor
    return stripped

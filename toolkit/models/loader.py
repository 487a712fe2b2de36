"""Build a model for a checkpoint directory: own forward when we have one, transformers if not.

Our modules are created on the meta device and receive the checkpoint tensors by assignment,
so no time is spent on a random initialisation that would be overwritten.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from toolkit.errors import ModelLoadError
from toolkit.models.base import LoadedModel
from toolkit.models.classifier import PairClassifier, head_state_dict
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

# The families other than BERT-like encoders: config, module, checkpoint renaming, and a tensor
# name every checkpoint of the family ends with (its prefix is stripped).
_FAMILIES: dict[str, tuple[Any, Any, Any, str]] = {
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


def load_model(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    classifier: bool = False,
    splade: tuple[str, str] | None = None,
) -> LoadedModel:
    """`classifier`: a cross-encoder, read through its classification head; `splade`: SPLADE over
    the masked-language-model head, with its (pooling, activation). The spec decides both."""
    if is_static_checkpoint(model_dir):
        module = load_static(model_dir).to(device=device, dtype=dtype).eval().requires_grad_(False)
        dim = module.tok_embeddings.embedding_dim
        return LoadedModel(module, module, dim, MAX_INPUT_TOKENS, implementation="native")
    hf = read_hf_config(model_dir)
    model_type = hf.get("model_type", "")
    if family_of(model_type) is not None:
        return _load_native(model_dir, hf, device, dtype, classifier, splade)
    logger.warning(
        "No packed implementation for model_type=%r: falling back to transformers.AutoModel "
        "with padded batches.",
        model_type,
    )
    return load_transformers_model(model_dir, hf, device, dtype)


def _load_native(
    model_dir: Path,
    hf: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    classifier: bool,
    splade: tuple[str, str] | None,
) -> LoadedModel:
    module: nn.Module
    family = family_of(hf["model_type"])
    encoder = family == "encoder"
    if encoder:
        enc_cfg = EncoderConfig.from_hf(hf)
        raw = _read_safetensors(model_dir)
        weights = _strip_prefix(raw, "embeddings.word_embeddings.weight")
        with torch.device("meta"):
            module = Encoder(enc_cfg)
        state = encoder_state_dict(weights, enc_cfg)
        dim, max_tokens = enc_cfg.dim, enc_cfg.max_input_tokens
        if classifier:
            labels = num_labels(hf)
            with torch.device("meta"):
                module = PairClassifier(module, labels)
            state = {f"encoder.{key}": value for key, value in state.items()} | head_state_dict(raw)
            dim = labels
        elif splade is not None:
            with torch.device("meta"):
                module = SpladeEncoder(module, *splade)
            head = mlm_head_state_dict(raw, weights["embeddings.word_embeddings.weight"])
            state = {f"encoder.{key}": value for key, value in state.items()} | head
            dim = enc_cfg.vocab_size
    else:
        config_type, module_type, state_dict, anchor = _FAMILIES[family]
        cfg = config_type.from_hf(hf)
        weights = _strip_prefix(_read_safetensors(model_dir), anchor)
        with torch.device("meta"):
            module = module_type(cfg)
        state = state_dict(weights, cfg)
        dim, max_tokens = cfg.dim, cfg.max_input_tokens
    module.load_state_dict(state, strict=True, assign=True)
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if device.type == "cpu" and pack_linear_weights(module):
        logger.debug("Short batches take oneDNN products with weights packed at load: faster than MKL here.")
    return LoadedModel(
        forward=module,
        module=module,
        hidden_size=dim,
        max_input_tokens=max_tokens,
        implementation="native",
        compile_pays_off=True,
        compile_needs_graphs=family != "decoder",
        row_pooling_modes=module.row_pooling_modes,
        pools_itself=splade is not None,
    )


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

"""Build a model for a checkpoint directory: own forward when we have one, transformers if not.

Our modules are created on the meta device and receive the checkpoint tensors by assignment,
so no time is spent on a random initialisation that would be overwritten.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from toolkit.errors import ModelLoadError
from toolkit.models.decoder import Decoder, DecoderConfig, decoder_state_dict
from toolkit.models.encoder import Encoder, EncoderConfig, encoder_state_dict
from toolkit.models.short_batch_linear import pack_linear_weights
from toolkit.packing import PackedBatch

logger = logging.getLogger(__name__)

ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "mpnet"})
DECODER_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass
class LoadedModel:
    """A model that maps a PackedBatch to packed hidden states [T, D].

    `forward(batch, rows)` with rows (one token per sequence, for a pooling mode in
    `row_pooling_modes`) returns just those tokens' states [B, D], and spares the last layer
    the work on all others.
    """

    forward: Callable[[PackedBatch, torch.Tensor | None], torch.Tensor]
    module: nn.Module
    hidden_size: int
    max_input_tokens: int
    implementation: str  # "native" or "transformers"
    # Measured on an H100 (benchmarks/profile_forward.py): torch.compile of the layer blocks
    # makes gte-Qwen2-1.5B 45% faster. Encoders compile only their add + LayerNorm steps (9 % less
    # GPU time for BERT-base), which pays off only when CUDA graphs replay them: launched one by
    # one, the compiled functions' guards cost more host time than the fusion saves (a lone
    # 8-token input took 11.3 ms instead of 4.6).
    compile_pays_off: bool = False
    compile_needs_graphs: bool = False
    row_pooling_modes: frozenset[str] = frozenset()


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"no config.json in {model_dir}")
    config: dict[str, Any] = json.loads(path.read_text())
    return config


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    hf = read_hf_config(model_dir)
    model_type = hf.get("model_type", "")
    if model_type in ENCODER_TYPES or model_type in DECODER_TYPES:
        return _load_native(model_dir, hf, device, dtype)
    logger.warning(
        "No packed implementation for model_type=%r: falling back to transformers.AutoModel "
        "with padded batches.",
        model_type,
    )
    from toolkit.models.hf_fallback import load_transformers_model

    return load_transformers_model(model_dir, hf, device, dtype)


def _load_native(
    model_dir: Path, hf: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    module: Encoder | Decoder
    if hf["model_type"] in ENCODER_TYPES:
        enc_cfg = EncoderConfig.from_hf(hf)
        weights = _strip_prefix(_read_safetensors(model_dir), "embeddings.word_embeddings.weight")
        with torch.device("meta"):
            module = Encoder(enc_cfg)
        state = encoder_state_dict(weights, enc_cfg)
        dim, max_tokens = enc_cfg.dim, enc_cfg.max_input_tokens
    else:
        dec_cfg = DecoderConfig.from_hf(hf)
        weights = _strip_prefix(_read_safetensors(model_dir), "embed_tokens.weight")
        with torch.device("meta"):
            module = Decoder(dec_cfg)
        state = decoder_state_dict(weights, dec_cfg)
        dim, max_tokens = dec_cfg.dim, dec_cfg.max_input_tokens
    module.load_state_dict(state, strict=True, assign=True)
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if device.type == "cpu" and pack_linear_weights(module):
        logger.info("Short batches take oneDNN products with weights packed at load: faster than MKL here.")
    return LoadedModel(
        forward=module,
        module=module,
        hidden_size=dim,
        max_input_tokens=max_tokens,
        implementation="native",
        compile_pays_off=True,
        compile_needs_graphs=hf["model_type"] in ENCODER_TYPES,
        row_pooling_modes=module.row_pooling_modes,
    )


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no *.safetensors weights in {model_dir} (only safetensors checkpoints are loaded)"
        )
    weights: dict[str, torch.Tensor] = {}
    # A bar for one shard says nothing the next log line doesn't; sharded checkpoints get one.
    shards = tqdm(files, desc="Loading safetensors checkpoint shards", unit="shard", disable=len(files) < 2)
    for file in shards:
        weights.update(load_file(file))
    return weights


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

"""Fallback for architectures without a packed forward: transformers.AutoModel, padded batches.

It still honours the PackedBatch contract: the packed tokens are scattered into a right-padded
[B, L] batch, run with an attention mask, and the real tokens gathered back into [T, D].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from toolkit.models.base import LoadedModel
from toolkit.models.packed_batch import PackedBatch


def load_transformers_model(
    model_dir: Path, hf: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    from transformers import AutoModel  # imported only when a model needs it: it takes seconds

    model = AutoModel.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    pad_id = int(hf.get("pad_token_id") or 0)

    @torch.inference_mode()
    def forward(batch: PackedBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        # No row pooling modes are declared, so rows never come: every token is returned.
        size = batch.num_seqs * batch.max_seqlen
        input_ids = torch.full((size,), pad_id, dtype=torch.long, device=batch.device)
        input_ids[batch.padded_index] = batch.input_ids.long()
        mask = batch.key_padding_mask.long()
        out = model(input_ids=input_ids.view(batch.num_seqs, -1), attention_mask=mask)
        hidden = out.last_hidden_state.reshape(size, -1)
        return hidden[batch.padded_index]

    return LoadedModel(
        forward=forward,
        module=model,
        # Read through the transformers config, which maps family names (DistilBERT's `dim`).
        hidden_size=int(model.config.hidden_size),
        max_input_tokens=int(getattr(model.config, "max_position_embeddings", 512)),
        implementation="transformers",
    )

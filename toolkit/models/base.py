"""What every model family hands the device side: `LoadedModel`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from toolkit.models.packed_batch import PackedBatch

# Pooling modes that read one token per sequence: a model may compute just those tokens' states
# in its last layer (`LoadedModel.row_pooling_modes`).
SINGLE_TOKEN_MODES = frozenset({"lasttoken", "cls"})


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
    # Whether torch.compile of the layer blocks pays on CUDA, and whether only under CUDA graphs
    # (encoders: launched one by one, compiled functions' guards cost more host time than the
    # fusion saves). Figures: docs/performance.md.
    compile_pays_off: bool = False
    compile_needs_graphs: bool = False
    row_pooling_modes: frozenset[str] = frozenset()
    # `forward` returns each sequence's vector [B, D] itself (SPLADE), not token states.
    pools_itself: bool = False

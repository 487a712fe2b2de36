"""Building blocks shared by the model families."""

from __future__ import annotations

import torch
from torch import nn


def uninitialized_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An embedding table whose weights the checkpoint will assign.

    Passing `_weight` skips the random normal init: on the meta device that init goes through
    torch's Python reference kernels, whose first use imports seconds' worth of modules.
    """
    return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))

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


# torch hands the exact GELU of a CPU float tensor to oneDNN, which builds and keeps a kernel for
# every shape it meets (up to 1024): packed batches bring a new row count almost every time, and
# memory grew with each kernel. Blocks of power-of-two rows plus a short remainder bound the shapes.
GELU_MIN_BLOCK = 64


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU of `x` [rows, features] in place, over row blocks of a few dozen shapes."""
    rows = x.shape[0]
    if not x.is_cpu or rows <= GELU_MIN_BLOCK:
        return torch.ops.aten.gelu_(x)
    start, block = 0, 1 << (rows.bit_length() - 1)
    while block >= GELU_MIN_BLOCK:
        if rows - start >= block:
            torch.ops.aten.gelu_(x[start : start + block])
            start += block
        block //= 2
    if start < rows:
        torch.ops.aten.gelu_(x[start:])
    return x

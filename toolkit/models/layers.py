"""Building blocks shared by the model families."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from toolkit.models.packed_batch import PackedBatch


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


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. Llama's kind casts back before the weight, as its reference
    does; Gemma's (`unit_offset`) scales by 1 + weight in float32 and casts back at the end."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def rotary_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, 1, d] for the given positions, computed in float32."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SplitLayer(nn.Module):
    """A layer whose parts around attention, `attention_inputs` and `attention_output_and_mlp`, are
    pure tensor code: `compile_blocks` fuses each with torch.compile (CUDA serving). Each family
    says how it attends (`attend`)."""

    def forward(
        self,
        x: torch.Tensor,
        batch: PackedBatch,
        rope: tuple[torch.Tensor, torch.Tensor],
        rows: torch.Tensor | None = None,  # keep only these tokens' outputs
    ) -> torch.Tensor:
        q, k, v = self.attention_inputs(x, *rope)
        attn = self.attend(q, k, v, batch, rows)
        return self.attention_output_and_mlp(x if rows is None else x[rows], attn)

    def attention_inputs(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, rows: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def attention_output_and_mlp(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compile_blocks(self) -> None:
        for name in ("attention_inputs", "attention_output_and_mlp"):
            setattr(self, name, torch.compile(getattr(self, name), dynamic=True))


class LayerStack(nn.Module):
    """A model of `layers`; `compile_blocks` compiles each one's attention-free parts."""

    layers: nn.ModuleList

    def compile_blocks(self) -> None:
        for layer in self.layers:
            layer.compile_blocks()


class WindowedLayer(Protocol):
    window: int | None

    def __call__(
        self,
        x: torch.Tensor,
        batch: PackedBatch,
        rope: tuple[torch.Tensor, torch.Tensor],
        rows: torch.Tensor | None,
    ) -> torch.Tensor: ...


def run_windowed_layers(
    x: torch.Tensor,
    batch: PackedBatch,
    layers: Sequence[WindowedLayer],
    head_dim: int,
    thetas: tuple[float, float],
    rows: torch.Tensor | None,
) -> torch.Tensor:
    """Layers of global and windowed attention, each with its rotary theta (global, local); only
    the last one computes `rows` alone."""
    tables = {theta: rotary_tables(batch.position_ids, head_dim, theta, x.dtype) for theta in set(thetas)}
    last = len(layers) - 1
    for index, layer in enumerate(layers):
        x = layer(x, batch, tables[thetas[layer.window is not None]], rows if index == last else None)
    return x

"""Pooling over packed hidden states, read from `cu_seqlens` (no padding involved).

Each mode reproduces sentence-transformers' `Pooling` module. The batch's `pool_starts` (tokens
to skip at the start of each sequence) implement `include_prompt=False`: prompt tokens are left
out of the pooled tokens, as sentence-transformers masks them. Several modes are concatenated in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from toolkit.models.base import SINGLE_TOKEN_MODES
from toolkit.models.packed_batch import PackedBatch


def pool(hidden: torch.Tensor, batch: PackedBatch, modes: Sequence[str]) -> torch.Tensor:
    """hidden [T, D] → [B, D * len(modes)] in float32."""
    hidden = hidden.float()
    starts = batch.pool_starts.long() if batch.skips_tokens else None
    return torch.cat([_pool_one(hidden, batch, mode, starts) for mode in modes], dim=-1)


def token_rows(batch: PackedBatch, mode: str) -> torch.Tensor:
    """[B] int64: the packed row each sequence's embedding is read from, for SINGLE_TOKEN_MODES."""
    if mode == "lasttoken":
        return batch.cu_seqlens[1:].long() - 1
    if mode != "cls":
        raise ValueError(f"pooling mode {mode!r} reads more than one token")
    first = batch.cu_seqlens[:-1].long()
    if batch.skips_tokens:  # the first token after the prompt, unless the input is all prompt
        starts = batch.pool_starts.long()
        lengths = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]
        first = first + torch.where(lengths > starts, starts, 0)
    return first


def _pool_one(
    hidden: torch.Tensor, batch: PackedBatch, mode: str, starts: torch.Tensor | None
) -> torch.Tensor:
    if mode in SINGLE_TOKEN_MODES:
        return hidden[token_rows(batch, mode)]
    keep = None
    if starts is not None:
        keep = batch.position_ids.long() >= starts[batch.seq_index]
    if mode == "max":
        return _segment_max(hidden, batch, keep)
    if mode == "weightedmean":
        # Token i (counted from 1 in the whole sequence, prompt included) weighs i.
        weights = batch.position_ids.float() + 1
    elif mode in ("mean", "mean_sqrt_len_tokens"):
        weights = torch.ones(batch.num_tokens, device=hidden.device)
    else:
        raise ValueError(f"unknown pooling mode {mode!r}")
    if keep is not None:
        weights = weights * keep.float()
    sums = _segment_sum(hidden * weights[:, None], batch)
    totals = _segment_sum(weights[:, None], batch).clamp_min(1e-9)
    return sums / (totals.sqrt() if mode == "mean_sqrt_len_tokens" else totals)


def _segment_sum(values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    out = torch.zeros(batch.num_seqs, values.shape[1], dtype=values.dtype, device=values.device)
    return out.index_add_(0, batch.seq_index, values)


def _segment_max(hidden: torch.Tensor, batch: PackedBatch, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is not None:
        hidden = hidden.masked_fill(~keep[:, None], -torch.inf)
    out = torch.full((batch.num_seqs, hidden.shape[1]), -torch.inf, dtype=hidden.dtype, device=hidden.device)
    index = batch.seq_index[:, None].expand_as(hidden)
    return out.scatter_reduce_(0, index, hidden, reduce="amax")


def normalize(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings, p=2.0, dim=-1)

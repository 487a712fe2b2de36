"""Attention over packed sequences: each sequence attends only to itself.

On CUDA with half precision, flash attention over `cu_seqlens` (the kernel behind
`torch.nn.attention.varlen.varlen_attn`) runs on the packed tokens directly. Elsewhere (CPU,
float32, or an additive bias such as MPNet's relative positions) the tokens are scattered into a
[B, H, L, d] layout for `scaled_dot_product_attention` with a key-padding mask and gathered back,
one run of similar lengths at a time; only attention sees padding, every other layer runs on the
packed tokens.

With `query_rows`, only one token per sequence attends (the keys are still every token): a last
layer whose output is pooled from one token (CLS, last token) needs nothing else. With `window`,
a token attends only to tokens at most that far away (ModernBERT's and Gemma3's local layers).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toolkit.models.packed_batch import PackedBatch

logger = logging.getLogger(__name__)


def packed_attention(
    q: torch.Tensor,  # [T, Hq, d]
    k: torch.Tensor,  # [T, Hkv, d]
    v: torch.Tensor,  # [T, Hkv, d]
    batch: PackedBatch,
    *,
    causal: bool,
    bias: torch.Tensor | None = None,  # [Hq, L, L] additive, shared by all sequences
    query_rows: torch.Tensor | None = None,  # [B] int64, one token of each sequence, in order
    window: int | None = None,  # the largest distance between a query and its keys
    scale: float | None = None,  # of the scores; None: 1/sqrt(d)
) -> torch.Tensor:  # [T, Hq, d], or [B, Hq, d] with query_rows
    if query_rows is not None and window is not None:
        raise ValueError("a windowed layer computes every token: the models pass no rows to one")
    if query_rows is not None:
        # Under causal attention the rows must be each sequence's last token, which sees its
        # whole sequence: so no causal mask is needed (the models only ask for that case).
        q, causal = q[query_rows], False
    # Checked in this order: a CPU server never asks for the CUDA kernel.
    if bias is None and q.is_cuda and q.dtype != torch.float32:
        varlen = _varlen_kernel(q.device, q.dtype, q.shape[-1], window is not None)
        if varlen is not None:
            return varlen(q, k, v, batch, causal, window, scale)
    shape = _Shape(causal, window, scale)
    groups = batch.length_groups
    if len(groups) == 1:
        return _padded_sdpa(q, k, v, batch, shape, bias=bias, query_rows=query_rows)
    # Each run of similar lengths is padded on its own: far less padding than one layout for
    # all (the runner packs batches longest first, so neighbours have similar lengths).
    outputs = []
    for group in groups:
        sub = group.batch
        group_q = q[group.seqs] if query_rows is not None else q[group.tokens]
        group_rows = None if query_rows is None else query_rows[group.seqs] - group.tokens.start
        group_bias = None if bias is None else bias[:, : sub.max_seqlen, : sub.max_seqlen]
        outputs.append(
            _padded_sdpa(
                group_q, k[group.tokens], v[group.tokens], sub, shape, bias=group_bias, query_rows=group_rows
            )
        )
    return torch.cat(outputs)


@dataclass(frozen=True)
class _Shape:
    """Which keys a query sees (all before it when causal; those within `window`), and the scale."""

    causal: bool
    window: int | None
    scale: float | None

    def mask(self, length: int, device: torch.device) -> torch.Tensor | None:
        """[L, L] bool, or None where every key is seen. Built here, not cached: a CUDA graph
        would keep reading a cached mask's memory after the cache let it go."""
        if not self.causal and self.window is None:
            return None
        positions = torch.arange(length, device=device)
        distance = positions[:, None] - positions[None, :]  # query minus key
        mask = distance >= 0 if self.causal else torch.ones_like(distance, dtype=torch.bool)
        return mask if self.window is None else mask & (distance.abs() <= self.window)


def _padded_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    shape: _Shape,
    *,
    bias: torch.Tensor | None,
    query_rows: torch.Tensor | None,
) -> torch.Tensor:
    num_seqs, length = batch.num_seqs, batch.max_seqlen
    # A lone sequence has no padding: views replace the scatter, the gather and the key mask
    # (a lone short request on a CPU is latency-bound, and these were a tenth of its layers).
    single = num_seqs == 1 and batch.num_tokens == length

    def to_padded(x: torch.Tensor) -> torch.Tensor:  # [T, H, d] -> [B, H, L, d]
        if single:
            return x[None].transpose(1, 2)
        padded = x.index_select(0, batch.padded_source)  # one gather: no zeroed buffer to scatter into
        return padded.view(num_seqs, length, x.shape[1], x.shape[2]).transpose(1, 2)

    mask = None if single else batch.key_padding_mask[:, None, None, :]  # [B, 1, 1, L]
    # query_rows come only where every key is seen (see packed_attention).
    seen = shape.mask(length, q.device) if query_rows is None else None
    if seen is not None:
        mask = seen if mask is None else mask & seen
    attn_mask = mask
    if bias is not None:
        rows = bias[None]  # [1, H, L, L]
        if query_rows is not None:  # each query's own row of the bias: [B, H, 1, L]
            rows = bias[:, batch.position_ids[query_rows].long()].transpose(0, 1)[:, :, None]
        attn_mask = rows.to(q.dtype)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask, torch.finfo(q.dtype).min)
    gqa = q.shape[1] != k.shape[1]
    queries = q[:, :, None] if query_rows is not None else to_padded(q)  # [B, H, 1 or L, d]
    out = F.scaled_dot_product_attention(
        queries, to_padded(k), to_padded(v), attn_mask=attn_mask, enable_gqa=gqa, scale=shape.scale
    )
    if query_rows is not None:
        return out[:, :, 0]
    out = out.transpose(1, 2).reshape(num_seqs * length, q.shape[1], q.shape[2])
    return out if single else out.index_select(0, batch.padded_index)


VarlenKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, PackedBatch, bool, int | None, float | None], torch.Tensor
]


@functools.lru_cache(maxsize=16)
def _varlen_kernel(
    device: torch.device, dtype: torch.dtype, head_dim: int, windowed: bool = False
) -> VarlenKernel | None:
    """Flash attention over `cu_seqlens` where this torch build and card run it, else None.

    This is the ATen op that `torch.nn.attention.varlen.varlen_attn` wraps, called directly: the
    wrapper's custom-op layers cost host time in every layer, and BERT-sized models are bound by
    host time when serving. The op also takes fewer key/value heads than query heads as they are
    (grouped-query attention), so nothing repeats them. One tiny call decides, once per device,
    dtype and head size, whether the kernel exists here (it needs Ampere or newer, and has a
    largest head size, and on older torch no window); where it does not, attention falls back
    to padded SDPA.
    """
    flash = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if flash is None:
        return None
    try:
        probe = torch.zeros(2, 1, head_dim, device=device, dtype=dtype)
        cu = torch.tensor([0, 2], dtype=torch.int32, device=device)
        # A windowed layer probes with a window: a torch whose kernel lacks the argument falls back.
        sides = {"window_size_left": 1, "window_size_right": 1} if windowed else {}
        flash(probe, probe, probe, cu, cu, 2, 2, 0.0, False, False, **sides)
    except (RuntimeError, TypeError) as exc:
        logger.warning(
            "no flash attention for %s, head size %d (%s): padded attention instead", dtype, head_dim, exc
        )
        return None

    def run(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: PackedBatch,
        causal: bool,
        window: int | None,
        scale: float | None,
    ) -> torch.Tensor:
        cu_k, max_k = batch.cu_seqlens, batch.max_seqlen
        cu_q, max_q = cu_k, max_k
        if q.shape[0] != k.shape[0]:  # one query per sequence (query_rows)
            cu_q, max_q = batch.one_per_sequence, 1
        # (query, key, value, cu_seqlens_q, cu_seqlens_k, max_q, max_k, dropout, causal, debug mask)
        sides = {}
        if window is not None:  # flash's window: keys from i - left to i + right
            sides = {"window_size_left": window, "window_size_right": 0 if causal else window}
        output: torch.Tensor = flash(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale, **sides
        )[0]
        return output

    return run

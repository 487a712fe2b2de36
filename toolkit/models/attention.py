"""Attention over packed sequences: each sequence attends only to itself.

On CUDA with half precision, `torch.nn.attention.varlen.varlen_attn` (flash attention over
`cu_seqlens`) runs on the packed tokens directly. Elsewhere (CPU, float32, or an additive bias
such as MPNet's relative positions) the tokens are scattered into a [B, H, L, d] layout for
`scaled_dot_product_attention` with a key-padding mask and gathered back; only attention sees
padding, every other layer runs on the packed tokens.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from toolkit.packing import PackedBatch


def packed_attention(
    q: torch.Tensor,  # [T, Hq, d]
    k: torch.Tensor,  # [T, Hkv, d]
    v: torch.Tensor,  # [T, Hkv, d]
    batch: PackedBatch,
    *,
    causal: bool,
    bias: torch.Tensor | None = None,  # [Hq, L, L] additive, shared by all sequences
) -> torch.Tensor:  # [T, Hq, d]
    # Checked in this order: importing the varlen module costs seconds (it pulls in
    # torch.compile's machinery), which a CPU server should not pay at start-up.
    if bias is None and q.is_cuda and q.dtype != torch.float32 and (varlen := _varlen_kernel()) is not None:
        return varlen(q, k, v, batch, causal)
    return _padded_sdpa(q, k, v, batch, causal=causal, bias=bias)


def _padded_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    *,
    causal: bool,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    num_seqs, length = batch.num_seqs, batch.max_seqlen
    index = batch.padded_index

    def to_padded(x: torch.Tensor) -> torch.Tensor:  # [T, H, d] -> [B, H, L, d]
        padded = x.new_zeros(num_seqs * length, x.shape[1], x.shape[2])
        padded[index] = x
        return padded.view(num_seqs, length, x.shape[1], x.shape[2]).transpose(1, 2)

    mask = batch.key_padding_mask[:, None, None, :]  # [B, 1, 1, L]
    if causal:
        mask = mask & _causal_mask(length, q.device)
    attn_mask: torch.Tensor = mask
    if bias is not None:
        attn_mask = bias[None].to(q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(
        to_padded(q), to_padded(k), to_padded(v), attn_mask=attn_mask, enable_gqa=gqa
    )
    out = out.transpose(1, 2).reshape(num_seqs * length, q.shape[1], q.shape[2])
    return out[index]


@functools.lru_cache(maxsize=8)
def _causal_mask(length: int, device: torch.device) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PackedBatch, bool], torch.Tensor]


@functools.lru_cache(maxsize=1)
def _varlen_kernel() -> VarlenKernel | None:
    """The flash varlen kernel of this torch build, adapted to one signature; None if absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    # torch 2.10/2.11 take `is_causal`; later releases express causality as a window.
    causal_kwarg = "is_causal" if "is_causal" in params else "window_size"
    has_gqa = "enable_gqa" in params

    def run(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, causal: bool
    ) -> torch.Tensor:
        if q.shape[1] != k.shape[1] and not has_gqa:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        kwargs: dict[str, object] = {}
        if causal_kwarg == "is_causal":
            kwargs["is_causal"] = causal
        elif causal:
            kwargs["window_size"] = (-1, 0)
        if has_gqa and q.shape[1] != k.shape[1]:
            kwargs["enable_gqa"] = True
        cu = batch.cu_seqlens
        length = batch.max_seqlen
        return varlen_attn(q, k, v, cu, cu, length, length, **kwargs)

    return run

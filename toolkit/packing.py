"""PackedBatch: the one contract between the scheduler and the model.

Inputs are concatenated without padding: `input_ids` and `position_ids` are flat (length T),
`cu_seqlens` marks where each of the B sequences starts (B+1 entries, first 0, last T), and
`seq_ids` says which sequence each token belongs to. Everything is built on the host in one go,
so moving a batch to a GPU is one asynchronous copy and nothing later waits for the device.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [T] int32
    position_ids: torch.Tensor  # [T] int32, restarting at 0 for every sequence
    seq_ids: torch.Tensor  # [T] int32, the sequence each token belongs to
    cu_seqlens: torch.Tensor  # [B+1] int32
    pool_starts: torch.Tensor  # [B] int32, leading tokens pooling skips (prompts); 0 mostly
    max_seqlen: int
    seqlens: list[int] = field(repr=False)  # host copy, so no device sync is needed to read it
    skips_tokens: bool = False  # whether any pool_starts is non-zero

    @property
    def num_seqs(self) -> int:
        return len(self.seqlens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @cached_property
    def seq_index(self) -> torch.Tensor:
        """[T] int64 view of `seq_ids`, as index operations want it."""
        return self.seq_ids.long()

    @cached_property
    def padded_index(self) -> torch.Tensor:
        """[T] int64: each token's slot in a [B, max_seqlen] padded layout."""
        return self.seq_index * self.max_seqlen + self.position_ids.long()

    @cached_property
    def one_per_sequence(self) -> torch.Tensor:
        """[B+1] int32 `cu_seqlens` of one token per sequence (the pooled-token queries)."""
        return torch.arange(self.num_seqs + 1, dtype=torch.int32, device=self.device)

    @cached_property
    def key_padding_mask(self) -> torch.Tensor:
        """[B, max_seqlen] bool: True where the padded layout holds a real token."""
        mask = torch.zeros(self.num_seqs * self.max_seqlen, dtype=torch.bool, device=self.device)
        mask[self.padded_index] = True
        return mask.view(self.num_seqs, self.max_seqlen)

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch on `device`: one pinned buffer, one non-blocking copy."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        parts = (self.input_ids, self.position_ids, self.seq_ids, self.cu_seqlens, self.pool_starts)
        staged = torch.cat(parts).pin_memory().to(device, non_blocking=True)
        ids, positions, seq_ids, cu, starts = staged.split([len(p) for p in parts])
        return PackedBatch(
            ids, positions, seq_ids, cu, starts, self.max_seqlen, self.seqlens, self.skips_tokens
        )


def pack(sequences: Sequence[Sequence[int]], pool_starts: Sequence[int] | None = None) -> PackedBatch:
    """Concatenate token-id sequences (each non-empty) into one PackedBatch on the CPU."""
    if not sequences:
        raise ValueError("cannot pack an empty batch")
    count = len(sequences)
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=count)
    if lengths.min() < 1:
        raise ValueError("cannot pack an empty sequence")
    total = int(lengths.sum())
    # numpy builds the flat arrays in C: no per-token Python work on the serving path.
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int32, count=total)
    cu_seqlens = np.zeros(count + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    positions = np.arange(total, dtype=np.int32) - np.repeat(cu_seqlens[:-1], lengths)
    seq_ids = np.repeat(np.arange(count, dtype=np.int32), lengths)
    starts = np.zeros(count, dtype=np.int32) if pool_starts is None else np.asarray(pool_starts, np.int32)
    return PackedBatch(
        input_ids=torch.from_numpy(flat),
        position_ids=torch.from_numpy(positions),
        seq_ids=torch.from_numpy(seq_ids),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        pool_starts=torch.from_numpy(starts),
        max_seqlen=int(lengths.max()),
        seqlens=lengths.tolist(),
        skips_tokens=bool(starts.any()),
    )

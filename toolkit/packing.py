"""PackedBatch: the one contract between the scheduler and the model.

Inputs are concatenated without padding: `input_ids` and `position_ids` are flat (length T),
`cu_seqlens` marks where each of the B sequences starts (B+1 entries, first 0, last T).
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
    cu_seqlens: torch.Tensor  # [B+1] int32
    max_seqlen: int
    seqlens: list[int] = field(repr=False)  # host copy, so no device sync is needed to read it

    @property
    def num_seqs(self) -> int:
        return len(self.seqlens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @cached_property
    def seq_index(self) -> torch.Tensor:
        """[T] int64: which sequence every token belongs to."""
        lengths = torch.tensor(self.seqlens, device=self.input_ids.device)
        return torch.repeat_interleave(torch.arange(self.num_seqs, device=lengths.device), lengths)

    @cached_property
    def padded_index(self) -> torch.Tensor:
        """[T] int64: each token's slot in a [B, max_seqlen] padded layout."""
        return self.seq_index * self.max_seqlen + self.position_ids.long()

    @cached_property
    def key_padding_mask(self) -> torch.Tensor:
        """[B, max_seqlen] bool: True where the padded layout holds a real token."""
        mask = torch.zeros(self.num_seqs * self.max_seqlen, dtype=torch.bool, device=self.device)
        mask[self.padded_index] = True
        return mask.view(self.num_seqs, self.max_seqlen)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=True),
            max_seqlen=self.max_seqlen,
            seqlens=self.seqlens,
        )


def pack(sequences: Sequence[Sequence[int]]) -> PackedBatch:
    """Concatenate token-id sequences (each non-empty) into one PackedBatch on the CPU."""
    if not sequences:
        raise ValueError("cannot pack an empty batch")
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    if lengths.min() < 1:
        raise ValueError("cannot pack an empty sequence")
    total = int(lengths.sum())
    # numpy builds the flat arrays in C: no per-token Python work on the serving path.
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int32, count=total)
    cu_seqlens = np.zeros(len(sequences) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    positions = np.arange(total, dtype=np.int32) - np.repeat(cu_seqlens[:-1], lengths)
    return PackedBatch(
        input_ids=torch.from_numpy(flat),
        position_ids=torch.from_numpy(positions),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_seqlen=int(lengths.max()),
        seqlens=lengths.tolist(),
    )

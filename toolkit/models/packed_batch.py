"""PackedBatch: the one contract between the scheduler and the model.

Inputs are concatenated without padding: `input_ids` and `position_ids` are flat (length T),
`cu_seqlens` marks where each of the B sequences starts (B+1 entries, first 0, last T), and
`seq_ids` says which sequence each token belongs to. `toolkit.execution.packing.pack` builds one
on the host in one go, so moving a batch to a GPU is one asynchronous copy and nothing later
waits for the device. On a CPU the last `fillers` sequences only pad the batch to a bounded
shape (toolkit.execution.row_buckets); their rows are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

# How much padding a length group may add to its real tokens (see PackedBatch.length_groups).
MAX_GROUP_PADDING = 0.3


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [T] int32
    position_ids: torch.Tensor  # [T] int32, restarting at 0 for every sequence
    seq_ids: torch.Tensor  # [T] int32, the sequence each token belongs to
    cu_seqlens: torch.Tensor  # [B+1] int32
    pool_starts: torch.Tensor  # [B] int32, leading tokens pooling skips (prompts); 0 mostly
    max_seqlen: int
    # A host copy of the lengths, so reading them needs no device sync. None where the lengths
    # change behind the batch (a CUDA graph's view of its static buffer, rewritten every replay).
    seqlens: list[int] | None = field(repr=False)
    skips_tokens: bool = False  # whether any pool_starts is non-zero
    token_types: torch.Tensor | None = None  # [T] int32 for pairs (0 first text, 1 second); else None
    fillers: int = 0  # the last sequences are fillers that only bound the batch's shape (CPU)

    @property
    def real_seqs(self) -> int:
        return self.num_seqs - self.fillers

    @property
    def num_seqs(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

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
    def padded_source(self) -> torch.Tensor:
        """[B * max_seqlen] int64: the token each slot of the padded layout reads. A padding slot
        reads its sequence's last token: a real value, so no zero-filled buffer is needed, and
        attention's key mask and the gather back drop it."""
        starts, ends = self.cu_seqlens[:-1].long(), self.cu_seqlens[1:].long()
        slots = torch.arange(self.max_seqlen, device=self.device)
        return torch.minimum(starts[:, None] + slots, ends[:, None] - 1).view(-1)

    @cached_property
    def one_per_sequence(self) -> torch.Tensor:
        """[B+1] int32 `cu_seqlens` of one token per sequence (the pooled-token queries)."""
        return torch.arange(self.num_seqs + 1, dtype=torch.int32, device=self.device)

    @cached_property
    def key_padding_mask(self) -> torch.Tensor:
        """[B, max_seqlen] bool: True where the padded layout holds a real token."""
        mask = torch.zeros(self.num_seqs * self.max_seqlen, dtype=torch.bool, device=self.device)
        # index_fill_ takes the value as a kernel argument; `mask[index] = True` would copy a
        # host scalar tensor, which CUDA graph capture refuses.
        mask.index_fill_(0, self.padded_index, True)
        return mask.view(self.num_seqs, self.max_seqlen)

    @cached_property
    def length_groups(self) -> list[SequenceGroup]:
        """Runs of neighbouring sequences of similar length, for attention over a padded layout:
        each run is padded only to its own longest sequence. A run grows while padding stays
        under MAX_GROUP_PADDING of its tokens; sorted by length, a batch of 16-512 tokens splits
        into about five runs, and its attention does about a third of the single layout's work.
        Without host lengths the batch is one run."""
        if self.seqlens is None:
            return [SequenceGroup(slice(0, self.num_seqs), slice(0, self.num_tokens), self)]
        groups: list[SequenceGroup] = []
        first_seq = first_token = tokens = longest = 0
        for index, length in enumerate(self.seqlens):
            count, widest = index - first_seq + 1, max(longest, length)
            if index > first_seq and count * widest > (1 + MAX_GROUP_PADDING) * (tokens + length):
                groups.append(self._group(first_seq, index, first_token))
                first_seq, first_token, tokens, widest = index, first_token + tokens, 0, length
            tokens, longest = tokens + length, widest
        groups.append(self._group(first_seq, self.num_seqs, first_token))
        return groups

    def _group(self, first_seq: int, end_seq: int, first_token: int) -> SequenceGroup:
        assert self.seqlens is not None
        seqlens = self.seqlens[first_seq:end_seq]
        seqs, tokens = slice(first_seq, end_seq), slice(first_token, first_token + sum(seqlens))
        if first_seq == 0 and end_seq == self.num_seqs:
            return SequenceGroup(seqs, tokens, self)
        batch = PackedBatch(
            input_ids=self.input_ids[tokens],
            position_ids=self.position_ids[tokens],
            seq_ids=self.seq_ids[tokens] - first_seq,
            cu_seqlens=self.cu_seqlens[first_seq : end_seq + 1] - first_token,
            pool_starts=self.pool_starts[seqs],
            max_seqlen=max(seqlens),
            seqlens=seqlens,
            skips_tokens=self.skips_tokens,
        )
        return SequenceGroup(seqs, tokens, batch)

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch on `device`: one pinned buffer, one non-blocking copy."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        buffer = self.host_buffer().pin_memory().to(device, non_blocking=True)
        moved = PackedBatch.from_buffer(
            buffer, self.num_seqs, self.max_seqlen, skips_tokens=self.skips_tokens, seqlens=self.seqlens
        )
        if self.token_types is not None:
            moved.token_types = self.token_types.to(device, non_blocking=True)
        return moved

    def host_buffer(self) -> torch.Tensor:
        """Ids, positions, sequence ids, cu_seqlens and pool starts end to end in one int32 tensor."""
        parts = (self.input_ids, self.position_ids, self.seq_ids, self.cu_seqlens, self.pool_starts)
        return torch.cat(parts)

    @staticmethod
    def from_buffer(
        buffer: torch.Tensor,
        num_seqs: int,
        max_seqlen: int,
        *,
        skips_tokens: bool,
        seqlens: list[int] | None,
    ) -> PackedBatch:
        """A batch whose tensors are views of `buffer`, laid out as `host_buffer` lays them."""
        num_tokens = (int(buffer.shape[0]) - 2 * num_seqs - 1) // 3
        ids, positions, seq_ids, cu, starts = buffer.split(buffer_layout(num_tokens, num_seqs))
        return PackedBatch(ids, positions, seq_ids, cu, starts, max_seqlen, seqlens, skips_tokens)


def buffer_layout(tokens: int, seqs: int) -> list[int]:
    """Sizes of the parts of `PackedBatch.host_buffer`: ids, positions, sequence ids, cu_seqlens,
    pool starts."""
    return [tokens, tokens, tokens, seqs + 1, seqs]


@dataclass(frozen=True)
class SequenceGroup:
    """Sequences `seqs` of a batch, which hold its tokens `tokens`, as a batch of their own."""

    seqs: slice
    tokens: slice
    batch: PackedBatch

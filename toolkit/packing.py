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
    seqlens: list[int] = field(repr=False)  # host copy, so no device sync is needed to read it
    skips_tokens: bool = False  # whether any pool_starts is non-zero
    # A CUDA graph's view of its static buffer: every replay writes other lengths into it, so
    # nothing may be derived from `seqlens` but their count (and `max_seqlen`, a bucket bound).
    fixed_shape: bool = False

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
        A graph's view is one run: its real lengths are only known on the device."""
        if self.fixed_shape:
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
        return PackedBatch.over(buffer, self.seqlens, self.max_seqlen, self.skips_tokens, self.fixed_shape)

    def host_buffer(self) -> torch.Tensor:
        """Ids, positions, sequence ids, cu_seqlens and pool starts end to end in one int32 tensor."""
        parts = (self.input_ids, self.position_ids, self.seq_ids, self.cu_seqlens, self.pool_starts)
        return torch.cat(parts)

    @staticmethod
    def over(
        buffer: torch.Tensor,
        seqlens: list[int],
        max_seqlen: int,
        skips_tokens: bool,
        fixed_shape: bool = False,
    ) -> PackedBatch:
        """A batch whose tensors are views of `buffer`, laid out as `host_buffer` lays them."""
        ids, positions, seq_ids, cu, starts = buffer.split(_layout(sum(seqlens), len(seqlens)))
        return PackedBatch(
            ids, positions, seq_ids, cu, starts, max_seqlen, seqlens, skips_tokens, fixed_shape
        )

    def padded(self, tokens: int, seqs: int, max_seqlen: int) -> PackedBatch:
        """This host batch grown to `tokens` tokens and `seqs` sequences (see `write_padded`)."""
        if max_seqlen < self.max_seqlen:
            raise ValueError(f"max_seqlen {max_seqlen} is below the batch's {self.max_seqlen}")
        buffer = np.empty(sum(_layout(tokens, seqs)), dtype=np.int32)
        self.write_padded(buffer, tokens, seqs)
        seqlens = self.seqlens + [0] * (seqs - self.num_seqs - 1) + [tokens - self.num_tokens]
        return PackedBatch.over(torch.from_numpy(buffer), seqlens, max_seqlen, self.skips_tokens)

    def write_padded(self, out: np.ndarray, tokens: int, seqs: int) -> None:
        """Write this host batch into `out` in the `host_buffer` layout, grown to exactly `tokens`
        tokens and `seqs` sequences: the shape a CUDA graph was captured at. The real sequences
        keep their rows; empty sequences follow, then one padding sequence holding the remaining
        tokens (at least one, so every sequence's first row exists). No row depends on another
        sequence's, so padding changes no real row; its own rows are garbage nobody reads.

        numpy only: the device thread runs this for every batch, and each torch call there hands
        the GIL to the busy event loop and waits to get it back."""
        real_tokens, real_seqs = self.num_tokens, self.num_seqs
        if tokens <= real_tokens or seqs <= real_seqs:
            raise ValueError(f"cannot pad {real_tokens} tokens, {real_seqs} sequences to a smaller shape")
        ids, positions, seq_ids, cu, starts = np.split(out, np.cumsum(_layout(tokens, seqs)[:-1]))
        # Padding tokens are token 0 at position 0: valid for every embedding table.
        ids[:real_tokens], ids[real_tokens:] = self.input_ids.numpy(), 0
        positions[:real_tokens], positions[real_tokens:] = self.position_ids.numpy(), 0
        seq_ids[:real_tokens], seq_ids[real_tokens:] = self.seq_ids.numpy(), seqs - 1
        cu[: real_seqs + 1], cu[real_seqs + 1 :] = self.cu_seqlens.numpy(), real_tokens
        cu[-1] = tokens
        starts[:real_seqs], starts[real_seqs:] = self.pool_starts.numpy(), 0


def _layout(tokens: int, seqs: int) -> list[int]:
    """Sizes of the parts of `PackedBatch.host_buffer`: ids, positions, sequence ids, cu_seqlens,
    pool starts."""
    return [tokens, tokens, tokens, seqs + 1, seqs]


@dataclass(frozen=True)
class SequenceGroup:
    """Sequences `seqs` of a batch, which hold its tokens `tokens`, as a batch of their own."""

    seqs: slice
    tokens: slice
    batch: PackedBatch


def pack(
    sequences: Sequence[Sequence[int] | np.ndarray], pool_starts: Sequence[int] | None = None
) -> PackedBatch:
    """Concatenate token-id sequences (each non-empty) into one PackedBatch on the CPU."""
    if not sequences:
        raise ValueError("cannot pack an empty batch")
    count = len(sequences)
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=count)
    if lengths.min() < 1:
        raise ValueError("cannot pack an empty sequence")
    total = int(lengths.sum())
    # numpy builds the flat arrays in C: no per-token Python work on the serving path. Inputs
    # from a front-end process arrive as int32 arrays already (see toolkit.ipc): joined as blocks.
    if isinstance(sequences[0], np.ndarray):
        flat = np.concatenate(sequences, dtype=np.int32)
    else:
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

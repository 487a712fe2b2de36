"""Turn a batch's token-id sequences into one `PackedBatch` on the host."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from toolkit.execution.row_buckets import FILLER_TOKEN
from toolkit.models.packed_batch import PackedBatch


def pack(
    sequences: Sequence[Sequence[int] | np.ndarray],
    pool_starts: Sequence[int] | None = None,
    segment_starts: Sequence[int] | None = None,
    fillers: Sequence[int] = (),
) -> PackedBatch:
    """Concatenate token-id sequences (each non-empty) into one PackedBatch on the CPU; token
    types where some sequence is a pair (a non-zero segment start). `fillers` are the lengths
    of filler sequences to append (toolkit.execution.row_buckets)."""
    if not sequences:
        raise ValueError("cannot pack an empty batch")
    if fillers:  # sequences of their own, outside every prompt and pair
        sequences = [*sequences, *([FILLER_TOKEN] * length for length in fillers)]
        pool_starts = None if pool_starts is None else [*pool_starts, *[0] * len(fillers)]
        segment_starts = None if segment_starts is None else [*segment_starts, *[0] * len(fillers)]
    count = len(sequences)
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=count)
    if lengths.min() < 1:
        raise ValueError("cannot pack an empty sequence")
    total = int(lengths.sum())
    # numpy builds the flat arrays in C: no per-token Python work on the serving path. Inputs
    # from a front-end process arrive as int32 arrays already (see toolkit.scheduling.wire).
    if isinstance(sequences[0], np.ndarray):
        flat = np.concatenate(sequences, dtype=np.int32)
    else:
        flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int32, count=total)
    cu_seqlens = np.zeros(count + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    positions = np.arange(total, dtype=np.int32) - np.repeat(cu_seqlens[:-1], lengths)
    seq_ids = np.repeat(np.arange(count, dtype=np.int32), lengths)
    starts = np.zeros(count, dtype=np.int32) if pool_starts is None else np.asarray(pool_starts, np.int32)
    token_types = None
    if segment_starts is not None and any(segment_starts):
        segments = np.asarray(segment_starts, np.int32)
        second = (positions >= np.repeat(segments, lengths)) & np.repeat(segments > 0, lengths)
        token_types = torch.from_numpy(second.astype(np.int32))
    return PackedBatch(
        input_ids=torch.from_numpy(flat),
        position_ids=torch.from_numpy(positions),
        seq_ids=torch.from_numpy(seq_ids),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        pool_starts=torch.from_numpy(starts),
        max_seqlen=int(lengths.max()),
        seqlens=lengths.tolist(),
        skips_tokens=bool(starts.any()),
        token_types=token_types,
        fillers=len(fillers),
    )

"""Packing and pooling invariants on hand-made tensors, checked against padded computations."""

from __future__ import annotations

import pytest
import torch

from toolkit.execution.cuda_graphs import padded
from toolkit.execution.packing import pack
from toolkit.execution.pooling import normalize, pool

SEQS = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]


def test_pack_layout() -> None:
    batch = pack(SEQS)
    assert batch.input_ids.dtype == batch.position_ids.dtype == batch.cu_seqlens.dtype == torch.int32
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert batch.position_ids.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 9]
    assert batch.max_seqlen == 5 and batch.num_seqs == 3 and batch.num_tokens == 9
    assert batch.seq_index.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    assert batch.pool_starts.tolist() == [0, 0, 0] and not batch.skips_tokens
    mask = batch.key_padding_mask
    assert mask.sum(dim=1).tolist() == [3, 1, 5]
    assert mask[0].tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("bad", [[], [[1], []]])
def test_pack_refuses_empty(bad: list[list[int]]) -> None:
    with pytest.raises(ValueError):
        pack(bad)


def padded_reference(hidden: torch.Tensor, lengths: list[int], mode: str, start: int = 0) -> torch.Tensor:
    """Pooling written the padded way: a [B, L, D] tensor and a 0/1 mask."""
    rows = list(torch.split(hidden, lengths))
    length = max(lengths)
    padded = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, length - len(r))) for r in rows])
    mask = torch.zeros(len(rows), length)
    for i, n in enumerate(lengths):
        mask[i, start:n] = 1
    if mode == "cls":
        return torch.stack([r[start if len(r) > start else 0] for r in rows])
    if mode == "lasttoken":
        return torch.stack([r[-1] for r in rows])
    if mode == "max":
        return padded.masked_fill(mask[..., None] == 0, -torch.inf).max(dim=1).values
    weights = mask * torch.arange(1, length + 1) if mode == "weightedmean" else mask
    sums = (padded * weights[..., None]).sum(dim=1)
    totals = weights.sum(dim=1, keepdim=True).clamp_min(1e-9)  # as sentence-transformers
    return sums / (totals.sqrt() if mode == "mean_sqrt_len_tokens" else totals)


@pytest.mark.parametrize("mode", ["cls", "lasttoken", "mean", "max", "mean_sqrt_len_tokens", "weightedmean"])
@pytest.mark.parametrize("start", [0, 2])
def test_packed_pooling_equals_padded(mode: str, start: int) -> None:
    torch.manual_seed(0)
    batch = pack(SEQS, [start] * len(SEQS))
    hidden = torch.randn(batch.num_tokens, 8)
    got = pool(hidden, batch, [mode])
    expected = padded_reference(hidden, batch.seqlens, mode, start)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_pooling_one_alone_equals_inside_batch() -> None:
    torch.manual_seed(1)
    batch = pack(SEQS)
    hidden = torch.randn(batch.num_tokens, 8)
    together = pool(hidden, batch, ["mean"])
    alone = pool(hidden[4:], pack([SEQS[2]]), ["mean"])
    torch.testing.assert_close(together[2:], alone, rtol=0, atol=1e-6)


def test_several_modes_concatenate_in_order() -> None:
    batch = pack(SEQS)
    hidden = torch.randn(batch.num_tokens, 4)
    both = pool(hidden, batch, ["cls", "mean"])
    assert both.shape == (3, 8)
    torch.testing.assert_close(both[:, :4], pool(hidden, batch, ["cls"]))


def test_normalize_gives_unit_rows() -> None:
    out = normalize(torch.randn(5, 7))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


def test_padded_layout() -> None:
    """A batch grown for a graph shape: real rows first, then empty sequences, then padding."""
    batch = padded(pack(SEQS, [1, 0, 2]), tokens=12, seqs=5, max_seqlen=8)
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 0, 0, 0]
    assert batch.position_ids.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4, 0, 0, 0]
    assert batch.seq_ids.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 4, 4, 4]
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 9, 9, 12]
    assert batch.pool_starts.tolist() == [1, 0, 2, 0, 0]
    assert batch.seqlens == [3, 1, 5, 0, 3] and batch.max_seqlen == 8 and batch.skips_tokens
    with pytest.raises(ValueError):
        padded(pack(SEQS), tokens=9, seqs=5, max_seqlen=8)  # no room for the padding sequence


@pytest.mark.parametrize("mode", ["mean", "max", "cls", "lasttoken", "weightedmean"])
def test_padding_changes_no_pooled_row(mode: str) -> None:
    batch = pack(SEQS, [1, 0, 2])
    grown = padded(batch, tokens=16, seqs=8, max_seqlen=8)
    hidden = torch.randn(grown.num_tokens, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pool(hidden, grown, [mode])[:3], pool(hidden[:9], batch, [mode]))


def test_graph_shapes_bound_the_padding() -> None:
    from toolkit.execution.cuda_graphs import GraphShape

    for lengths in ([1], [15], [16], [255], [256], [300, 2], [512] * 31 + [300], [100] * 300):
        batch = pack([[1] * n for n in lengths])
        shape = GraphShape.fitting(batch)
        assert shape.tokens > batch.num_tokens and shape.seqs > batch.num_seqs
        assert shape.max_seqlen >= batch.max_seqlen
        if batch.num_tokens >= 256:  # where the GPU works hard, at most 1/16 is padding
            assert shape.tokens - batch.num_tokens <= batch.num_tokens / 16


def test_length_groups_cover_the_batch_with_bounded_padding() -> None:
    from toolkit.models.packed_batch import MAX_GROUP_PADDING

    lengths = [200, 190, 150, 120, 90, 60, 59, 58, 30, 8, 7, 1]
    batch = pack([list(range(1, n + 1)) for n in lengths], list(range(len(lengths))))
    groups = batch.length_groups
    assert len(groups) > 1
    next_seq = next_token = 0
    for group in groups:
        sub = group.batch
        assert (group.seqs.start, group.tokens.start) == (next_seq, next_token)
        next_seq, next_token = group.seqs.stop, group.tokens.stop
        assert sub.seqlens == lengths[group.seqs] and sub.max_seqlen == max(sub.seqlens)
        assert sub.num_seqs == 1 or sub.num_seqs * sub.max_seqlen <= (1 + MAX_GROUP_PADDING) * sub.num_tokens
        # The group is a batch of its own: its tensors are the batch's, rebased.
        assert torch.equal(sub.input_ids, batch.input_ids[group.tokens])
        assert sub.cu_seqlens.tolist() == [
            c - group.tokens.start for c in batch.cu_seqlens.tolist()[group.seqs.start : group.seqs.stop + 1]
        ]
        assert sub.seq_index.tolist() == [
            i - group.seqs.start for i in batch.seq_index.tolist()[group.tokens]
        ]
        assert torch.equal(sub.pool_starts, batch.pool_starts[group.seqs])
    assert (next_seq, next_token) == (batch.num_seqs, batch.num_tokens)

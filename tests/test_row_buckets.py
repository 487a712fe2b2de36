"""Filler sequences bound the batch shapes a CPU forward meets (toolkit.execution.row_buckets):
memory grew with every new token count. Fillers must change no real row."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from toolkit import Engine
from toolkit.execution.row_buckets import SMALL_BATCH, bucket_seqs, bucket_tokens, filler_lengths
from toolkit.models.packed_batch import PackedBatch


def test_fillers_bring_every_batch_to_a_bounded_set_of_shapes() -> None:
    rng = random.Random(0)
    token_counts, seq_counts = set(), set()
    for _ in range(50_000):
        seqs = rng.randint(1, 300)
        tokens = rng.randint(seqs, 4096)
        longest = rng.choice([4, 64, 512])
        lengths = filler_lengths(tokens, seqs, longest)
        assert all(1 <= length <= longest for length in lengths)
        total, count = tokens + sum(lengths), seqs + len(lengths)
        if tokens <= SMALL_BATCH:  # a bounded set already: kept as it is
            assert not lengths
            continue
        assert bucket_tokens(total) == total and bucket_seqs(count) == count
        assert sum(lengths) - len(lengths) <= tokens // 7  # a small share of the batch
        token_counts.add(total)
        seq_counts.add(count)
    assert len(token_counts) <= 4 * 16 + (4096 - 1024) // 64 + 1 and len(seq_counts) <= 16 * 6
    assert filler_lengths(SMALL_BATCH, 3, 512) == []  # a short batch keeps its shape
    assert filler_lengths(128, 16, 512) == []  # already bucketed
    assert filler_lengths(1000, 999, 1) == []  # one-token inputs: no filler fits both buckets


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine(device="cpu") as started:
        yield started


def test_batches_reach_the_model_in_bucketed_shapes_and_fillers_change_no_row(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = engine.service.queue.runner  # type: ignore[attr-defined]
    seen: list[tuple[int, int]] = []
    forward = runner.model.forward

    def recording(batch: PackedBatch, rows: torch.Tensor | None) -> torch.Tensor:
        seen.append((batch.num_tokens, batch.num_seqs))
        return forward(batch, rows)

    monkeypatch.setattr(runner.model, "forward", recording)
    texts = [" ".join(["word"] * n) + f" {n}" for n in (3, 17, 40, 5, 90, 1, 33)]
    together = engine.encode(texts)
    assert seen[-1][0] > SMALL_BATCH and seen[-1][0] > sum(
        len(ids) for ids in engine.service.tokenizer.encode(texts)
    )
    alone = np.stack([engine.encode(text) for text in texts])
    assert all(bucket_tokens(t) == t and bucket_seqs(b) == b for t, b in seen)
    assert np.abs(together - alone).max() <= 1e-6

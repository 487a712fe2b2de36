"""Filler sequences that bring a CPU batch to one of a bounded set of shapes.

A packed batch brings a new token count almost every time, and a CPU server's memory grew with
the shapes it met: oneDNN, which runs bfloat16 products, keeps memory for every row count, and
in float32 the heap kept growing too. Padding each batch with short filler sequences to a
bucketed token count, and a bucketed count of sequences (the rows that pooled-token models and
heads compute), bounds the shapes; docs/performance.md ("Memory") has the figures. Fillers are
sequences of their own: no real token attends to them, and their rows are dropped after the
forward. Batches of up to SMALL_BATCH tokens, a bounded set already, keep their exact shape,
so a lone short request pays nothing.
"""

from __future__ import annotations

SMALL_BATCH = 64  # tokens; smaller batches get no fillers
FILLER_TOKEN = 0  # any id every vocabulary has; fillers' outputs are never read


def bucket_tokens(tokens: int) -> int:
    """16 counts per power of two up to 1,024 tokens (at most 1/16 of fillers), then multiples
    of 64."""
    if tokens <= SMALL_BATCH:
        return tokens
    return _round_up(tokens, min(64, _step(tokens)))


def bucket_seqs(seqs: int) -> int:
    """Exact up to 16, then 16 counts per power of two."""
    return _round_up(seqs, _step(seqs))


def filler_lengths(tokens: int, seqs: int, longest: int) -> list[int]:
    """Lengths of the filler sequences (each at most `longest` tokens) that bring a batch of
    `tokens` in `seqs` sequences to bucketed counts of both; [] where it has them already."""
    if tokens <= SMALL_BATCH or (bucket_tokens(tokens) == tokens and bucket_seqs(seqs) == seqs):
        return []
    if longest < 2:  # one-token fillers might never land on both buckets at once
        return []
    count = bucket_seqs(seqs) - seqs or bucket_seqs(seqs + 1) - seqs  # at least one filler
    while (total := bucket_tokens(tokens + count) - tokens) > count * longest:
        count = bucket_seqs(seqs + count + 1) - seqs
    base, extra = divmod(total, count)
    return [base + 1] * extra + [base] * (count - extra)


def _step(count: int) -> int:
    return 1 << max(0, (count - 1).bit_length() - 4)


def _round_up(count: int, step: int) -> int:
    return -(-count // step) * step

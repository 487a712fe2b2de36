"""Filler sequences that bring a CPU bfloat16 batch to one of a bounded set of shapes.

oneDNN, which runs bfloat16 products on a CPU, keeps memory for every row count it meets, and a
packed batch brings a new token count almost every time: a server's memory grew by gigabytes
over a few thousand batches (docs/performance.md, "Memory"). Padding each batch with short filler
sequences up to a multiple of TOKEN_STEP tokens, and to a bucketed count of sequences (the rows
that pooled-token models and heads compute), bounds the shapes. Fillers are sequences of their
own: no real token attends to them, and their rows are dropped after the forward.
"""

from __future__ import annotations

TOKEN_STEP = 64  # token counts: multiples of this
FILLER_TOKEN = 0  # any id every vocabulary has; fillers' outputs are never read


def bucket_tokens(tokens: int) -> int:
    return -(-tokens // TOKEN_STEP) * TOKEN_STEP


def bucket_seqs(seqs: int) -> int:
    """Up to 16 exact, then 16 counts per power of two: at most 1/16 of fillers."""
    step = max(1, 1 << max(0, (seqs - 1).bit_length() - 4))
    return -(-seqs // step) * step


def filler_lengths(tokens: int, seqs: int, longest: int) -> list[int]:
    """Lengths of the filler sequences (each at most `longest` tokens) that bring a batch of
    `tokens` in `seqs` sequences to bucketed counts of both; [] where it has them already."""
    if bucket_tokens(tokens) == tokens and bucket_seqs(seqs) == seqs:
        return []
    count = bucket_seqs(seqs) - seqs or bucket_seqs(seqs + 1) - seqs  # at least one filler
    while (total := bucket_tokens(tokens + count) - tokens) > count * longest:
        count = bucket_seqs(seqs + count + 1) - seqs
    base, extra = divmod(total, count)
    return [base + 1] * extra + [base] * (count - extra)

"""bfloat16 on a CPU: oneDNN's fused products, and the filler sequences that bound the batch
shapes oneDNN meets (each new row count kept memory: toolkit.execution.row_buckets)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toolkit import Engine
from toolkit.execution.row_buckets import TOKEN_STEP, bucket_seqs, bucket_tokens, filler_lengths
from toolkit.models import cpu_fusion
from toolkit.models.packed_batch import PackedBatch

needs_bf16_cpu = pytest.mark.skipif(
    not cpu_fusion.onednn_bf16(), reason="this CPU has no bfloat16 units for oneDNN"
)


def test_fillers_bring_every_batch_to_a_bounded_set_of_shapes() -> None:
    rng = random.Random(0)
    token_counts, seq_counts = set(), set()
    for _ in range(20_000):
        seqs = rng.randint(1, 300)
        tokens = rng.randint(seqs, 4096)
        longest = rng.choice([4, 64, 512])
        lengths = filler_lengths(tokens, seqs, longest)
        assert all(1 <= length <= longest for length in lengths)
        total, count = tokens + sum(lengths), seqs + len(lengths)
        assert bucket_tokens(total) == total and bucket_seqs(count) == count
        assert sum(lengths) < TOKEN_STEP + len(lengths) * (longest + 1)
        token_counts.add(total)
        seq_counts.add(count)
    assert len(token_counts) <= 4096 // TOKEN_STEP + 1 and len(seq_counts) <= 16 * 6
    assert filler_lengths(128, 16, 512) == []  # already bucketed: no fillers


def test_fusion_is_chosen_only_for_bfloat16_on_a_cpu() -> None:
    assert not cpu_fusion.fuses(torch.zeros(2, 2))
    assert cpu_fusion.fuses(torch.zeros(2, 2, dtype=torch.bfloat16)) == cpu_fusion.onednn_bf16()
    assert not cpu_fusion.onednn_runs(torch.nn.Linear(2, 2))


@needs_bf16_cpu
@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu", "silu"])
def test_fused_products_match_the_eager_ones(activation: str) -> None:
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(96, 160).to(torch.bfloat16)
    x = torch.randn(37, 96, generator=generator).to(torch.bfloat16)
    residual = torch.randn(37, 160, generator=generator).to(torch.bfloat16)
    eager = {
        "gelu": F.gelu,
        "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }[activation]
    x32, w32, b32 = x.float(), layer.weight.float(), layer.bias.float()
    fused = cpu_fusion.linear_activation(x, layer, activation, eager)
    # oneDNN applies the activation to the float32 sum, before rounding to bfloat16.
    assert (fused.float() - eager(F.linear(x32, w32, b32))).abs().max() <= 0.05
    added = cpu_fusion.linear_residual(x, layer, residual)
    assert (added.float() - (F.linear(x32, w32, b32) + residual.float())).abs().max() <= 0.05
    assert (cpu_fusion.linear(x, layer).float() - F.linear(x32, w32, b32)).abs().max() <= 0.05


@pytest.fixture(scope="module")
def bf16_engine() -> Engine:
    with Engine(device="cpu", dtype="bfloat16") as engine:
        yield engine


@needs_bf16_cpu
def test_batches_reach_the_model_in_bucketed_shapes_and_fillers_change_no_row(
    bf16_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = bf16_engine.service.queue.runner  # type: ignore[attr-defined]
    seen: list[tuple[int, int]] = []
    forward = runner.model.forward

    def recording(batch: PackedBatch, rows: torch.Tensor | None) -> torch.Tensor:
        seen.append((batch.num_tokens, batch.num_seqs))
        return forward(batch, rows)

    monkeypatch.setattr(runner.model, "forward", recording)
    texts = [" ".join(["word"] * n) + f" {n}" for n in (3, 17, 40, 5, 90, 1)]
    together = bf16_engine.encode(texts)
    alone = np.stack([bf16_engine.encode(text) for text in texts])
    assert seen and all(bucket_tokens(t) == t and bucket_seqs(b) == b for t, b in seen)
    cos = (together * alone).sum(-1) / np.linalg.norm(together, axis=-1) / np.linalg.norm(alone, axis=-1)
    assert cos.min() >= 0.999  # bfloat16: only the direction is held to a bar


@needs_bf16_cpu
def test_bfloat16_engine_stays_close_to_float32(bf16_engine: Engine) -> None:
    texts = [
        f"Sentence {i} about {'cats' if i % 3 else 'the stock market'} and more." * (1 + i % 7)
        for i in range(120)
    ]
    with Engine(device="cpu") as fp32:
        reference = fp32.encode(texts)
    ours = bf16_engine.encode(texts)
    cos = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(reference, axis=-1)
    assert cos.min() >= 0.9999

"""The shared layers: the exact GELU in bounded row blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from toolkit.models import layers
from toolkit.models.layers import GELU_MIN_BLOCK, gelu_


@pytest.mark.parametrize("rows", [1, 7, GELU_MIN_BLOCK, GELU_MIN_BLOCK + 1, 129, 1000, 4097])
def test_gelu_in_blocks_matches_torch(rows: int) -> None:
    x = torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows)) * 4
    expected = F.gelu(x)
    out = gelu_(x)
    assert out.data_ptr() == x.data_ptr()  # in place
    assert (out - expected).abs().max().item() <= 1e-6


def test_gelu_meets_few_shapes_whatever_the_row_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row count up to 5000 reaches the kernel in fewer than 80 shapes (oneDNN keeps one
    kernel per shape), and no call covers fewer rows than needed: the blocks tile the rows."""
    shapes: set[int] = set()

    class RecordingOps:
        @staticmethod
        def gelu_(x: torch.Tensor) -> torch.Tensor:
            shapes.add(x.shape[0])
            covered.append(x.shape[0])
            return x

    monkeypatch.setattr(layers.torch.ops, "aten", RecordingOps)
    for rows in range(1, 5001):
        covered: list[int] = []
        gelu_(torch.empty(rows, 2))
        assert sum(covered) == rows
        assert len(covered) <= 1 + (rows // GELU_MIN_BLOCK).bit_length()
    assert len(shapes) < 80

"""Packed oneDNN weights for short CPU batches give the products of the plain linear layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.model_zoo import build_tiny_model
from toolkit.models import load_model, short_batch_linear
from toolkit.models.short_batch_linear import PACKED_MAX_ROWS, ShortBatchLinear, pack_linear_weights


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(48, 96)
        self.block = nn.Sequential(nn.GELU(), nn.Linear(96, 40, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.up(x))


@pytest.mark.parametrize("rows", [1, 5, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_products_equal_the_plain_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(384, 1536, bias=bias)
    wrapped = ShortBatchLinear.wrap(linear)
    x = torch.randn(rows, 384)
    with torch.inference_mode():
        expected, got = F.linear(x, linear.weight, linear.bias), wrapped(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_row_alone_equals_it_inside_a_short_batch() -> None:
    torch.manual_seed(0)
    wrapped = ShortBatchLinear.wrap(nn.Linear(64, 128))
    x = torch.randn(9, 64)
    with torch.inference_mode():
        torch.testing.assert_close(wrapped(x[3:4]), wrapped(x)[3:4], rtol=0, atol=1e-6)


def test_packing_keeps_parameters_and_state_dict() -> None:
    model = _TwoLayers()
    before = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    x = torch.randn(7, 48)
    with torch.inference_mode():
        expected = model(x)
        assert pack_linear_weights(model)
        got = model(x)
    assert isinstance(model.up, ShortBatchLinear) and isinstance(model.block[1], ShortBatchLinear)
    assert {name: tensor.data_ptr() for name, tensor in model.state_dict().items()} == before
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_no_packing_past_the_memory_cap_or_off_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(short_batch_linear, "PACKED_MAX_BYTES", 48 * 96 * 4)  # the first weight only
    model = _TwoLayers()
    assert not pack_linear_weights(model)
    assert type(model.up) is nn.Linear
    monkeypatch.undo()
    half = _TwoLayers().to(torch.bfloat16)
    assert not pack_linear_weights(half)
    assert type(half.up) is nn.Linear


def test_loaded_cpu_model_packs_its_linear_layers(tmp_path: Path) -> None:
    model_dir = build_tiny_model("bert", tmp_path / "bert")
    loaded = load_model(model_dir, torch.device("cpu"), torch.float32)
    linears = [m for m in loaded.module.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, ShortBatchLinear) for m in linears)

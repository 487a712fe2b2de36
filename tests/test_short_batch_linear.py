"""Packed oneDNN weights for short CPU batches give the products of the plain linear layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.helpers.model_zoo import build_tiny_model
from toolkit.models import short_batch_linear
from toolkit.models.loader import load_model
from toolkit.models.short_batch_linear import (
    PACKED_MAX_ROWS,
    ShortBatchLinear,
    build_kernels,
    distinct_packed_layers,
    pack_linear_weights,
    packed_products_pay_off,
)


@pytest.fixture
def packing_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether packing pays is measured at load and differs by machine: decided here instead."""
    monkeypatch.setattr(short_batch_linear, "packed_products_pay_off", lambda layers: True)


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


def test_a_product_under_autograd_keeps_its_gradient() -> None:
    wrapped = ShortBatchLinear.wrap(nn.Linear(16, 8))
    x = torch.randn(3, 16, requires_grad=True)
    wrapped(x).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, wrapped.weight.sum(0).expand(3, 16))


def test_packing_keeps_parameters_and_state_dict(packing_pays: None) -> None:
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


def test_a_failing_onednn_leaves_the_plain_layers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(weight: torch.Tensor, *args: object) -> torch.Tensor:
        raise RuntimeError("no such kernel here")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", fail)
    model = _TwoLayers()
    assert not pack_linear_weights(model)
    assert type(model.up) is nn.Linear and type(model.block[1]) is nn.Linear
    assert "packed linear products failed" in caplog.text


@pytest.mark.parametrize("pays", [True, False])
def test_loaded_cpu_model_packs_where_it_pays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pays: bool
) -> None:
    monkeypatch.setattr(short_batch_linear, "packed_products_pay_off", lambda layers: pays)
    model_dir = build_tiny_model("bert", tmp_path / "bert")
    loaded = load_model(model_dir, torch.device("cpu"), torch.float32)
    linears = [m for m in loaded.module.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, ShortBatchLinear) == pays for m in linears)


@pytest.mark.parametrize(
    ("packed_s", "plain_s", "pays"), [(0.5, 1.0, True), (0.95, 1.0, False), (2.0, 1.0, False)]
)
def test_packing_pays_only_with_a_clear_margin(
    monkeypatch: pytest.MonkeyPatch, packed_s: float, plain_s: float, pays: bool
) -> None:
    calls: list[bool] = []

    def timed(layers: object, inputs: object, *, packed: bool) -> float:
        calls.append(packed)
        return packed_s if packed else plain_s

    monkeypatch.setattr(short_batch_linear, "_time_products", timed)
    assert packed_products_pay_off([ShortBatchLinear.wrap(nn.Linear(8, 8))], rounds=2) is pays
    assert calls == [True, False, True, False, True]  # a first packed run builds the kernels


def test_kernels_are_built_once_per_weight_shape_at_the_asked_row_count(
    packing_pays: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = nn.Sequential(_TwoLayers(), _TwoLayers())
    assert pack_linear_weights(model)
    layers = distinct_packed_layers(model)
    assert sorted((layer.in_features, layer.out_features) for layer in layers) == [(48, 96), (96, 40)]
    products: list[tuple[int, ...]] = []
    packed = torch.ops.mkldnn._linear_pointwise

    def recording(x: torch.Tensor, *args: object) -> torch.Tensor:
        products.append(tuple(x.shape))
        return packed(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", recording)
    build_kernels(layers, 5)
    assert sorted(products) == [(5, 48), (5, 96)]

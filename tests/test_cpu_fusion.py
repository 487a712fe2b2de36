"""Products with their epilogue fused on a CPU: in bfloat16 oneDNN's bias, activation and residual
add; in float32 the residual add accumulated into the product."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toolkit import Engine
from toolkit.models import cpu_fusion
from toolkit.models.short_batch_linear import ShortBatchLinear

needs_bf16_cpu = pytest.mark.skipif(
    not cpu_fusion.onednn_bf16(), reason="this CPU has no bfloat16 units for oneDNN"
)


def test_fusion_is_chosen_only_for_bfloat16_on_a_cpu() -> None:
    assert not cpu_fusion.fuses(torch.zeros(2, 2))
    assert cpu_fusion.fuses(torch.zeros(2, 2, dtype=torch.bfloat16)) == cpu_fusion.onednn_bf16()


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


@pytest.mark.parametrize("rows", [37, 300])
@torch.inference_mode()  # as the server runs: the packed product is for inference only
def test_float32_residual_products_match_the_eager_ones(rows: int) -> None:
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(96, 160)
    packed = ShortBatchLinear.wrap(torch.nn.Linear(96, 160))
    x = torch.randn(rows, 96, generator=generator)
    residual = torch.randn(rows, 160, generator=generator)
    before = residual.clone()
    for linear in (layer, packed):
        added = cpu_fusion.linear_residual(x, linear, residual)
        expected = F.linear(x, linear.weight, linear.bias) + residual
        assert (added - expected).abs().max() <= 1e-5
    assert residual.equal(before)  # the residual stream is read, never written
    # The short batch keeps the packed product; the long one accumulates into residual + bias.
    assert not cpu_fusion._accumulates(x[:37], packed)
    assert cpu_fusion._accumulates(x, layer) and cpu_fusion._accumulates(x[:37], layer)


@pytest.fixture(scope="module")
def bf16_engine() -> Engine:
    with Engine(device="cpu", dtype="bfloat16") as engine:
        yield engine


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


@needs_bf16_cpu
def test_the_encoder_takes_the_fused_products(bf16_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("linear", "linear_activation", "linear_residual"):
        original = getattr(cpu_fusion, name)
        monkeypatch.setattr(cpu_fusion, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    bf16_engine.encode(["one text", "and another, a little longer"])
    layers = 6  # MiniLM-L6
    assert sorted(set(calls)) == ["linear", "linear_activation", "linear_residual"]
    assert calls.count("linear_residual") == 2 * layers

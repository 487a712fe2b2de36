"""The encoder's MLP activation inside its first product (cuBLASLt's GELU epilogue on a GPU):
which layers and dtypes take it, and --exact-gelu keeping it out. On a CPU the same op applies
the exact GELU after the product, so these tests check the choice and the wiring; the GPU's
numbers are in docs/performance.md ("GELU inside the product")."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from toolkit import Engine
from toolkit.models.encoder import EncoderConfig, EncoderLayer, keep_gelu_exact
from toolkit.server_args import ServerArgs


def _layer(activation: str) -> EncoderLayer:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        vocab_size=10, dim=32, n_layers=1, n_heads=2, intermediate_size=64, max_positions=16,
        norm_eps=1e-12, activation=activation, position_offset=0, type_vocab_size=0, relative_buckets=0,
    )  # fmt: skip
    return EncoderLayer(cfg).eval()


@pytest.mark.parametrize(
    ("activation", "dtype", "fused"),
    [
        ("gelu", torch.bfloat16, True),
        ("gelu_new", torch.float16, True),
        ("gelu_pytorch_tanh", torch.bfloat16, True),
        ("gelu", torch.float32, False),  # float32 keeps the exact GELU: parity with the reference
        ("relu", torch.bfloat16, False),
        ("silu", torch.bfloat16, False),
    ],
)
def test_gelu_goes_into_the_product_only_for_a_gelu_in_half_precision(
    activation: str, dtype: torch.dtype, fused: bool
) -> None:
    layer = _layer(activation).to(dtype)
    x = torch.randn(7, 32, dtype=dtype)
    with (
        torch.inference_mode(),
        mock.patch.object(torch, "_addmm_activation", wraps=torch._addmm_activation) as in_product,
    ):
        out = layer.mlp_hidden(x)
    assert in_product.called is fused
    expected = layer.act(F.linear(x.float(), layer.ffn_in.weight.float(), layer.ffn_in.bias.float()))
    assert (out.float() - expected).abs().max().item() <= (0.05 if dtype != torch.float32 else 1e-5)


def test_exact_gelu_keeps_every_layer_out_of_the_product() -> None:
    body = torch.nn.Sequential(_layer("gelu"), _layer("gelu"), _layer("relu")).to(torch.bfloat16)
    assert keep_gelu_exact(body) == 2
    assert not any(layer.gelu_in_product for layer in body)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    with torch.inference_mode(), mock.patch.object(torch, "_addmm_activation") as in_product:
        body[0].mlp_hidden(x)
    assert not in_product.called


def test_the_flag_and_its_variable_reach_the_model() -> None:
    assert ServerArgs.from_cli(["--exact-gelu"], environ={}).exact_gelu
    assert ServerArgs.from_cli([], environ={"TOOLKIT_EXACT_GELU": "1"}).exact_gelu
    assert not ServerArgs.from_cli([], environ={}).exact_gelu
    with Engine(device="cpu", cpu_workers=1, dtype="bfloat16", exact_gelu=True) as engine:
        modules = engine.service.queue.runner.model.module.modules()
        layers = [m for m in modules if isinstance(m, EncoderLayer)]
        assert len(layers) == 6 and not any(layer.gelu_in_product for layer in layers)
        assert engine.encode("hello").shape == (384,)

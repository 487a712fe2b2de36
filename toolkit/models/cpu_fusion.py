"""Linear products with their bias, activation or residual add done inside the product's kernel.

On a CPU in bfloat16 the products themselves run on AMX or AVX512-BF16 units, so the separate
passes over their outputs (the bias copy, GELU, the residual add) cost a large share of a layer;
oneDNN applies them to the float32 accumulator as it writes each tile. In float32 on a CPU the
residual add goes into the product instead: the product accumulates onto residual + bias. Elsewhere
(CUDA, a torch without oneDNN) the helpers are the plain eager ops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from toolkit.models.short_batch_linear import ShortBatchLinear

# A model's hidden_act as oneDNN's post-op: (attr, algorithm).
ONEDNN_ACTIVATIONS = {
    "gelu": ("gelu", "none"),  # exact (erf) GELU
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
    "silu": ("swish", ""),
}


@functools.cache
def onednn_bf16() -> bool:
    """Whether this torch has oneDNN's fused linear and this CPU runs it in bfloat16."""
    ops = torch.ops.mkldnn
    try:
        return bool(torch.backends.mkldnn.is_available() and ops._is_mkldnn_bf16_supported()) and hasattr(
            ops, "_linear_pointwise"
        )
    except (AttributeError, RuntimeError):
        return False


def fuses(x: torch.Tensor) -> bool:
    return x.is_cpu and x.dtype == torch.bfloat16 and onednn_bf16()


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    if not fuses(x):
        return layer(x)
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")


def linear_activation(
    x: torch.Tensor, layer: nn.Linear, activation: str, eager: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """activation(layer(x)); `eager` is the activation applied after the product where oneDNN
    does not fuse it."""
    if not fuses(x) or activation not in ONEDNN_ACTIVATIONS:
        return eager(layer(x))
    attr, algorithm = ONEDNN_ACTIVATIONS[activation]
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, attr, [], algorithm)


def linear_residual(x: torch.Tensor, layer: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """layer(x) + residual."""
    if fuses(x):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, layer.weight, layer.bias, "add")
    if not _accumulates(x, layer):
        return layer(x) + residual
    # MKL's addmm copies the bias into a fresh output before the product; starting from
    # residual + bias and accumulating into it (beta=1) saves that pass and the add after it.
    out = residual + layer.bias if layer.bias is not None else residual.clone()
    return out.addmm_(x, layer.weight.t())


def _accumulates(x: torch.Tensor, layer: nn.Linear) -> bool:
    """Whether `linear_residual` accumulates into the residual: a 2-D CPU batch that does not take
    a short batch's packed product."""
    packed = isinstance(layer, ShortBatchLinear) and layer.takes_packed(x)
    return x.is_cpu and x.dim() == 2 and not packed

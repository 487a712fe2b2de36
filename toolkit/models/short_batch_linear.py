"""Linear layers that keep short CPU batches fast where oneDNN with packed weights beats MKL.

torch's CPU `linear` goes to MKL's sgemm, which repacks the weight on every call and, on a few
rows, barely uses a second core: a lone short text can spend most of its forward repacking. A copy
of each weight packed once for oneDNN avoids that on some CPUs and loses on others, so whether it
pays is measured at load, on the thread and thread count that serve a lone batch
(`packed_products_pay_off`). Figures: docs/performance.md ("Short batches on the CPU").

Only batches of up to `PACKED_MAX_ROWS` rows (packed tokens) take the packed copy: beyond a few
dozen rows MKL catches up. oneDNN builds a kernel for every new row count, weight shape and
thread count (once; its cache holds 1024), which `toolkit.execution.kernel_builder` does ahead of
requests. The copy doubles the memory of the linear weights, so only models whose linear weights
fit `PACKED_MAX_BYTES` get one. Packing comes last: the copy does not follow a later `.to()` or an
in-place change of the weight.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

PACKED_MAX_ROWS = 64
PACKED_MAX_BYTES = 512 * 2**20
# The packed products must take at most this share of MKL's time on a short batch to be kept:
# a margin over the noise of a few milliseconds' measurement.
PACKED_MAX_TIME_SHARE = 0.9
CALIBRATION_ROWS = 8  # a short text's tokens


class ShortBatchLinear(nn.Linear):
    """An `nn.Linear` (same parameters) with a oneDNN-packed copy of its weight for short batches."""

    packed_weight: torch.Tensor

    @classmethod
    def wrap(cls, linear: nn.Linear) -> ShortBatchLinear:
        with torch.device("meta"):
            wrapped = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        wrapped.weight, wrapped.bias = linear.weight, linear.bias
        # An opaque oneDNN tensor: kept out of the state dict and parameters on purpose.
        wrapped.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        return wrapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes_packed(x):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    @staticmethod
    def takes_packed(x: torch.Tensor) -> bool:
        """Whether `forward` runs `x` through the packed copy: a short 2-D batch, outside
        torch.compile (--compile on a CPU), which lowers the packed product only for frozen
        weights, and outside autograd, since the packed op has no backward."""
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            return False
        return x.dim() == 2 and x.shape[0] <= PACKED_MAX_ROWS


def pack_linear_weights(module: nn.Module) -> bool:
    """Swap every `nn.Linear` of an fp32 CPU model for a `ShortBatchLinear`, where that pays
    off on this machine. False, and no change, where the model has no plain linear layer, is
    not fp32 on a CPU, oneDNN is missing or fails, the copies would exceed `PACKED_MAX_BYTES`,
    or MKL is as fast on a short batch. Call it on the thread that will serve lone batches."""
    linears = [(name, child) for name, child in module.named_modules() if type(child) is nn.Linear]
    if not linears or not torch.backends.mkldnn.is_available():
        return False
    weights = [linear.weight for _, linear in linears]
    if any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights):
        return False
    if sum(w.numel() * w.element_size() for w in weights) > PACKED_MAX_BYTES:
        return False
    try:
        wrapped = [ShortBatchLinear.wrap(linear) for _, linear in linears]
        if not packed_products_pay_off(wrapped):
            return False
    except RuntimeError:  # a oneDNN build without these ops (other CPUs): serve with the plain ones
        logger.warning("oneDNN's packed linear products failed; short batches use torch's", exc_info=True)
        return False
    for (name, _), layer in zip(linears, wrapped, strict=True):
        parent_name, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(parent_name), attribute, layer)
    return True


def packed_products_pay_off(layers: list[ShortBatchLinear], rounds: int = 3) -> bool:
    """Whether the layers' packed products over a short batch take at most
    `PACKED_MAX_TIME_SHARE` of MKL's time (best of `rounds`, alternating)."""
    inputs = {layer.in_features: torch.randn(CALIBRATION_ROWS, layer.in_features) for layer in layers}
    _time_products(layers, inputs, packed=True)  # builds oneDNN's kernels for this row count
    best = {True: math.inf, False: math.inf}
    for _ in range(rounds):
        for packed in (False, True):
            best[packed] = min(best[packed], _time_products(layers, inputs, packed=packed))
    return best[True] <= PACKED_MAX_TIME_SHARE * best[False]


@torch.inference_mode()
def _time_products(layers: list[ShortBatchLinear], inputs: dict[int, torch.Tensor], *, packed: bool) -> float:
    started = time.perf_counter()
    for layer in layers:
        x = inputs[layer.in_features]
        if packed:
            layer(x)
        else:
            F.linear(x, layer.weight, layer.bias)
    return time.perf_counter() - started


def distinct_packed_layers(module: nn.Module) -> list[ShortBatchLinear]:
    """One packed layer per weight shape: oneDNN's kernels depend on the shape, not the weight."""
    layers: dict[tuple[int, int, bool], ShortBatchLinear] = {}
    for layer in module.modules():
        if isinstance(layer, ShortBatchLinear):
            layers.setdefault((layer.in_features, layer.out_features, layer.bias is not None), layer)
    return list(layers.values())


@torch.inference_mode()
def build_kernels(layers: list[ShortBatchLinear], rows: int) -> None:
    """Run each layer's packed product once over `rows` rows, so that oneDNN builds its kernels
    for that row count, at the calling thread's thread count, now rather than on a request."""
    for layer in layers:
        layer(torch.zeros(rows, layer.in_features))

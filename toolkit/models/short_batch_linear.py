"""Linear layers that keep short CPU batches fast: oneDNN with weights packed once at load.

torch's CPU `linear` goes to MKL's sgemm, which repacks the weight on every call and barely
uses a second core for a few rows. For a lone short text that repacking outweighs the product:
MiniLM's 24 products over 6 rows took 6.5 ms on 2 cores, against 3.0 ms through oneDNN with
weights packed in advance, and its whole 6-token forward 8.5 ms against 6.3 ms (fp32, 2-core
EPYC, in-process). From about 64 rows on the two are even, and MKL is a few per cent faster on
thousands of rows. oneDNN also builds a kernel for every new row count (about 1 ms per weight
shape, once; its cache holds 1024), so only batches of up to `PACKED_MAX_ROWS` rows take the
packed copy; larger ones keep MKL and the plain weight.

The packed copy doubles the memory of the linear weights, so only models whose linear weights
fit `PACKED_MAX_BYTES` get one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

PACKED_MAX_ROWS = 64
PACKED_MAX_BYTES = 512 * 2**20


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
        # torch.compile (--compile on a CPU) lowers the packed product only for frozen weights.
        if x.dim() != 2 or x.shape[0] > PACKED_MAX_ROWS or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        packed = torch.ops.mkldnn._linear_pointwise
        return packed(x.contiguous(), self.packed_weight, self.bias, "none", [], "")


def pack_linear_weights(module: nn.Module) -> bool:
    """Swap every `nn.Linear` of an fp32 CPU model for a `ShortBatchLinear`; False (and no
    change) where oneDNN is missing or the copies would exceed `PACKED_MAX_BYTES`."""
    linears = [(name, child) for name, child in module.named_modules() if type(child) is nn.Linear]
    if not linears or not torch.backends.mkldnn.is_available():
        return False
    weights = [linear.weight for _, linear in linears]
    if any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights):
        return False
    if sum(w.numel() * w.element_size() for w in weights) > PACKED_MAX_BYTES:
        return False
    for name, linear in linears:
        parent_name, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(parent_name), attribute, ShortBatchLinear.wrap(linear))
    return True

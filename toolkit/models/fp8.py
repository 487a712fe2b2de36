"""FP8 products on Hopper and Ada (`--quantization fp8`): the layers' large linear products take
float8 (e4m3) weights with one scale per output row, and float8 activations with one scale per
token, computed as each batch arrives; the product accumulates in float32 and comes out in
bfloat16 through `torch._scaled_mm`. Everything else (norms, attention, pooling) stays bfloat16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.errors import ModelLoadError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# float8 products need every dimension a multiple of 16: rows are padded up to it.
ALIGN = 16
MIN_CAPABILITY = (8, 9)


def check_fp8_device(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, with the reason, where float8 products cannot run: never a silent fallback."""
    if device.type != "cuda":
        raise ModelLoadError(
            f"--quantization fp8 needs an NVIDIA GPU (Hopper or Ada); this server runs on {device}"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY or not hasattr(torch, "_scaled_mm"):
        name = torch.cuda.get_device_name(device)
        raise ModelLoadError(
            f"--quantization fp8 needs compute capability 8.9 or newer (Ada, Hopper) and torch._scaled_mm; "
            f"{name} has {capability[0]}.{capability[1]}, torch {torch.__version__}"
        )
    if dtype != torch.bfloat16:
        raise ModelLoadError(
            f"--quantization fp8 runs its other layers in bfloat16; --dtype {dtype} was asked"
        )
    _probe(device)


def _probe(device: torch.device) -> None:
    """One tiny product as the layers will run it: a torch without row-wise scaled products here
    fails at start, not on a client's batch."""
    try:
        probe = Fp8Linear(nn.Linear(ALIGN, ALIGN, device=device, dtype=torch.bfloat16))
        probe(torch.ones(1, ALIGN, device=device, dtype=torch.bfloat16))
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(
            f"--quantization fp8: this torch ({torch.__version__}) cannot run it here: {exc}"
        ) from None


class Fp8Linear(nn.Module):
    """A linear layer whose weight is float8 with a scale per output row."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX  # [N, 1]
        self.weight = nn.Parameter((weight / scale).to(FP8), requires_grad=False)  # [N, K]
        self.weight_scale = nn.Parameter(scale.t().contiguous(), requires_grad=False)  # [1, N]
        bias = linear.bias
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        )
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        count = rows.shape[0]
        if count % ALIGN:
            rows = F.pad(rows, (0, 0, 0, ALIGN - count % ALIGN))
        amax = rows.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
        scale = amax / FP8_MAX  # [M, 1]
        # Scaled in the activations' dtype and clamped: float8 has no infinity, and a value past
        # its largest after rounding would become NaN.
        quantized = (rows * (FP8_MAX / amax).to(rows.dtype)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out = torch._scaled_mm(
            quantized,
            self.weight.t(),  # column-major [K, N], as the product wants its second operand
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=torch.bfloat16,
        )
        return out[:count].reshape(*x.shape[:-1], self.out_features)


def quantize_fp8(module: nn.Module) -> int:
    """Swap the linear layers inside `module.layers` for Fp8Linear where their shapes allow;
    returns how many were swapped. Heads and embeddings stay as they are."""
    layers = getattr(module, "layers", None) or getattr(getattr(module, "body", None), "layers", None)
    if layers is None:
        raise ModelLoadError("--quantization fp8 applies to the packed transformer families only")
    swapped = 0
    for layer in layers:
        for name, child in list(layer.named_children()):
            if (
                isinstance(child, nn.Linear)
                and child.in_features % ALIGN == 0
                and child.out_features % ALIGN == 0
            ):
                setattr(layer, name, Fp8Linear(child))
                swapped += 1
    return swapped

"""sentence-transformers' Dense modules over the pooled vectors: a linear layer and its activation
each, in float32 like the pooled vectors they take."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

from toolkit.errors import ModelLoadError
from toolkit.service.model_spec import DenseSpec


def load_dense(specs: tuple[DenseSpec, ...], device: torch.device) -> nn.Module | None:
    """The Dense modules as one module on `device`, or None where the model has none."""
    if not specs:
        return None
    layers: list[nn.Module] = []
    for spec in specs:
        weights_file = spec.path / "model.safetensors"
        if not weights_file.is_file():
            raise ModelLoadError(f"no model.safetensors in {spec.path} (only safetensors weights are loaded)")
        weights = load_file(str(weights_file))
        linear = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
        state = {"weight": weights["linear.weight"]} | ({"bias": weights["linear.bias"]} if spec.bias else {})
        try:
            linear.load_state_dict(state)
        except (KeyError, RuntimeError) as exc:
            raise ModelLoadError(f"the Dense weights in {spec.path} do not fit its config: {exc}") from None
        layers += [linear, getattr(nn, spec.activation)()]
    return nn.Sequential(*layers).to(device=device, dtype=torch.float32).eval().requires_grad_(False)

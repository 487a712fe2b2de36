"""sentence-transformers' Dense and LayerNorm modules over the pooled vectors, in float32 like the
pooled vectors they take."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

from toolkit.errors import ModelLoadError
from toolkit.service.model_spec import VectorModule


def load_vector_modules(specs: tuple[VectorModule, ...], device: torch.device) -> nn.Module | None:
    """The modules as one module on `device`, or None where the model has none."""
    if not specs:
        return None
    layers: list[nn.Module] = []
    for spec in specs:
        weights_file = spec.path / "model.safetensors"
        if not weights_file.is_file():
            raise ModelLoadError(f"no model.safetensors in {spec.path} (only safetensors weights are loaded)")
        weights = load_file(str(weights_file))
        module, prefix = _module(spec)
        state = {
            name: weights[f"{prefix}.{name}"]
            for name, _ in module.named_parameters()
            if f"{prefix}.{name}" in weights
        }
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"the {spec.kind} weights in {spec.path} do not fit its config: {exc}"
            ) from None
        layers += [module] if spec.kind == "LayerNorm" else [module, getattr(nn, spec.activation)()]
    return nn.Sequential(*layers).to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def _module(spec: VectorModule) -> tuple[nn.Module, str]:
    """The torch module of a spec, and the name sentence-transformers saves its weights under."""
    if spec.kind == "LayerNorm":
        return nn.LayerNorm(spec.in_features), "norm"
    return nn.Linear(spec.in_features, spec.out_features, bias=spec.bias), "linear"

"""The model families with a packed forward of our own, by `model_type` in `config.json`.

Torch-free: the request side reads it to choose a model's default pooling. Any other
`model_type` runs through `toolkit.models.hf_fallback`.
"""

from __future__ import annotations

from typing import Literal

Family = Literal["encoder", "decoder"]

FAMILIES: dict[str, Family] = {
    "bert": "encoder",
    "roberta": "encoder",
    "xlm-roberta": "encoder",
    "mpnet": "encoder",
    "llama": "decoder",
    "mistral": "decoder",
    "qwen2": "decoder",
    "qwen3": "decoder",
}


def family_of(model_type: str | None) -> Family | None:
    """The family of a `model_type`, or None when only the transformers fallback runs it."""
    return FAMILIES.get(model_type or "")

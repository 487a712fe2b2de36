"""The model families with a packed forward of our own, by `model_type` in `config.json`, and
whether a config is a cross-encoder.

Torch-free: the request side reads it to choose a model's default pooling. Any other
`model_type` runs through `toolkit.models.hf_fallback`.
"""

from __future__ import annotations

from typing import Any, Literal

Family = Literal["encoder", "decoder", "modernbert", "gemma3"]

FAMILIES: dict[str, Family] = {
    "bert": "encoder",
    "roberta": "encoder",
    "xlm-roberta": "encoder",
    "mpnet": "encoder",
    "llama": "decoder",
    "mistral": "decoder",
    "qwen2": "decoder",
    "qwen3": "decoder",
    "modernbert": "modernbert",
    "gemma3_text": "gemma3",
}


def family_of(model_type: str | None) -> Family | None:
    """The family of a `model_type`, or None when only the transformers fallback runs it."""
    return FAMILIES.get(model_type or "")


CLASSIFIER_SUFFIX = "ForSequenceClassification"


def is_classifier(hf: dict[str, Any]) -> bool:
    """Whether a transformers config describes a sequence classifier (a cross-encoder)."""
    return any(str(name).endswith(CLASSIFIER_SUFFIX) for name in hf.get("architectures") or ())


def num_labels(hf: dict[str, Any]) -> int:
    """A classifier's outputs: its label names, else `num_labels`, else transformers' default 2."""
    labels = hf.get("id2label")
    return len(labels) if isinstance(labels, dict) and labels else int(hf.get("num_labels", 2))

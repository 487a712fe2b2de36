"""Model loading: our own packed forward for the families that matter, transformers otherwise."""

from __future__ import annotations

from toolkit.models.loader import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]

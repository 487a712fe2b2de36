"""A model folder's JSON files (transformers', the tokenizer's, sentence-transformers'), read
torch-free, with one clear error for a malformed or missing file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit.errors import ModelLoadError

# transformers' `model_max_length` when a tokenizer was saved without one (int(1e30)).
_UNSET_MODEL_MAX_LENGTH = 10**18


def read_json(path: Path) -> dict[str, Any] | list[Any] | None:
    """The file's JSON, or None where there is no such file."""
    if not path.is_file():
        return None
    try:
        data: dict[str, Any] | list[Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    return data


def json_dict(path: Path, required: bool = False) -> dict[str, Any]:
    """The file's JSON object; {} for anything else, or for no file unless it is `required`."""
    data = read_json(path)
    if data is None and required:
        raise ModelLoadError(f"missing {path}")
    return as_dict(data)


def as_dict(data: object) -> dict[str, Any]:
    return data if isinstance(data, dict) else {}


def class_name(dotted: object) -> str:
    """The class a saved dotted path names ("sentence_transformers.models.Dense" -> "Dense")."""
    return str(dotted).rsplit(".", 1)[-1]


def saved_model_max_length(directory: Path, required: bool = False) -> int | None:
    """The tokenizer's saved `model_max_length`, where it was saved with one."""
    saved = json_dict(directory / "tokenizer_config.json", required).get("model_max_length")
    return saved if isinstance(saved, int) and 0 < saved < _UNSET_MODEL_MAX_LENGTH else None

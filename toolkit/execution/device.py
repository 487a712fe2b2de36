"""Which torch device and dtype a server runs on, from `--device` and `--dtype`."""

from __future__ import annotations

import torch

from toolkit.errors import ModelLoadError


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ModelLoadError(
            f"--device cuda was asked for, but torch {torch.__version__} ({build}) sees no CUDA device"
        )
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        # Half precision on GPUs (bf16 keeps float32's range); exact float32 on CPUs.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype: torch.dtype = getattr(torch, requested)
    return dtype

"""Which torch device and dtype a server runs on, from `--device` and `--dtype`."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from toolkit.errors import ModelLoadError

# CPU flags of hardware bfloat16 products (Intel AMX, AVX512-BF16, Arm's BF16 extension); without
# them torch emulates bfloat16, slower than float32.
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


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
    if dtype == torch.bfloat16 and device.type == "cpu":
        check_cpu_bf16(cpu_flags())
    return dtype


def check_cpu_bf16(flags: frozenset[str] | None) -> None:
    """Refuse bfloat16 on a CPU known to lack hardware for it (unknown flags: allowed)."""
    if flags is not None and not flags & set(BF16_FLAGS):
        raise ModelLoadError(
            "--dtype bfloat16 on this CPU would run emulated, slower than float32: it has none of "
            f"the flags {', '.join(BF16_FLAGS)} (lscpu lists its flags); use --dtype float32"
        )


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where the system does not say."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), None)
    return frozenset(line.split(":", 1)[1].split()) if line else None

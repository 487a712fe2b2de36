"""Precision flags that need hardware: FP8 (`--quantization fp8`) refused on a CPU, a GPU older than
Ada or a dtype other than bfloat16, and bfloat16 refused on a CPU without AMX or AVX512-BF16, each
with a clear error instead of a silent fallback; and what FP8 products compute, checked on the CPU
(torch runs float8 products there too) against the float products they replace."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.model_zoo import build_tiny_model
from toolkit.errors import ModelLoadError
from toolkit.execution.packing import pack
from toolkit.models import fp8
from toolkit.models.fp8 import Fp8Linear, check_fp8_device, quantize_fp8
from toolkit.models.loader import load_model
from toolkit.server_args import ServerArgs


def test_fp8_is_refused_on_a_cpu_server() -> None:
    from toolkit import Engine

    with pytest.raises(ModelLoadError, match="needs an NVIDIA GPU"):
        Engine(device="cpu", quantization="fp8")


def test_fp8_is_refused_below_ada_and_outside_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ModelLoadError, match=r"NVIDIA A100 has 8\.0"):
        check_fp8_device(cuda, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fp8, "_probe", lambda device: None)  # no GPU here to run the probe on
    check_fp8_device(cuda, torch.bfloat16)  # an H100: accepted
    with pytest.raises(ModelLoadError, match="bfloat16"):
        check_fp8_device(cuda, torch.float16)


def test_a_torch_that_cannot_run_the_products_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(*args: object, **kwargs: object) -> None:
        raise RuntimeError("row-wise scaling is not supported here")

    monkeypatch.setattr(torch, "_scaled_mm", unsupported)
    with pytest.raises(ModelLoadError, match="cannot run it here: row-wise scaling"):
        fp8._probe(torch.device("cpu"))


def test_the_flag_takes_only_known_schemes() -> None:
    assert ServerArgs.from_cli(["--quantization", "fp8"], environ={}).quantization == "fp8"
    assert ServerArgs.from_cli([], environ={}).quantization == "none"
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--quantization", "int4"], environ={})


@pytest.mark.parametrize("rows", [1, 16, 37])
def test_fp8_products_stay_close_to_the_float_product(rows: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 128).to(torch.bfloat16)
    x = torch.randn(rows, 256, dtype=torch.bfloat16) * torch.linspace(0.1, 10, rows)[:, None].bfloat16()
    expected = x.float() @ linear.weight.float().t() + linear.bias.float()
    got = Fp8Linear(linear)(x)
    assert got.shape == (rows, 128) and got.dtype == torch.bfloat16
    assert F.cosine_similarity(got.float(), expected, dim=-1).min() >= 0.998


@torch.inference_mode()
def test_a_quantized_model_embeds_like_the_float_model(tmp_path: Path) -> None:
    model_dir = build_tiny_model("qwen3", tmp_path)
    reference = load_model(model_dir, torch.device("cpu"), torch.bfloat16)
    quantized = load_model(model_dir, torch.device("cpu"), torch.bfloat16)
    assert quantize_fp8(quantized.module) == 2 * 4  # qkv, attn_out, gate_up, down in each layer
    batch = pack([list(range(5, 60)), list(range(100, 117))], [0, 0], [0, 0])
    rows = batch.cu_seqlens[1:].long() - 1  # last-token pooling, the tiny Qwen3's
    expected, got = reference.forward(batch, rows).float(), quantized.forward(batch, rows).float()
    # Random weights amplify rounding more than trained ones; the GPU figures are in
    # docs/performance.md (benchmarks/gpu_fidelity.py --quantization fp8).
    assert F.cosine_similarity(got, expected, dim=-1).min() >= 0.98


def test_cpu_bfloat16_is_refused_without_hardware_for_it() -> None:
    from toolkit.execution.device import check_cpu_bf16, cpu_flags

    with pytest.raises(ModelLoadError, match="none of the flags amx_bf16, avx512_bf16, bf16"):
        check_cpu_bf16(frozenset({"avx2", "fma", "avx512f"}))
    check_cpu_bf16(frozenset({"avx2", "amx_bf16", "amx_tile"}))  # a Sapphire Rapids Xeon
    check_cpu_bf16(frozenset({"avx512_bf16"}))  # a Cooper Lake or Zen 4
    check_cpu_bf16(frozenset({"asimd", "bf16", "sve"}))  # an Arm Neoverse V1 (Graviton3)
    check_cpu_bf16(None)  # flags unknown (not Linux): allowed
    flags = cpu_flags()
    assert flags is None or "fpu" in flags or "fp" in flags  # read from this machine's cpuinfo

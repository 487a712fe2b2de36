"""Our packed forward against transformers on full-size random-weight shapes, per dtype.

    python benchmarks/gpu_fidelity.py --shape gte-qwen2-1.5b --shape bert-base [--fp8]

For each shape: random token-id inputs of mixed lengths, embedded by the server's Runner (one
packed batch; compiled blocks where the server compiles them) in float32, bfloat16 and float16,
and by transformers AutoModel one input at a time (no padding) in float32 and in the same dtype.
Prints the minimum cosine and maximum absolute difference of the normalized embeddings.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.shapes import build_shape
from toolkit.execution.pooling import normalize
from toolkit.execution.runner import Runner
from toolkit.models.fp8 import quantize_fp8
from toolkit.models.loader import load_model
from toolkit.scheduling.work import WorkItem
from toolkit.service.model_spec import read_embedding_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.inference_mode()
def reference(model_dir: Path, inputs: list[list[int]], dtype: torch.dtype, device: str) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    mode = read_embedding_spec(model_dir).pooling_modes[0]
    rows = []
    for seq in inputs:
        hidden = model(input_ids=torch.tensor([seq], device=device)).last_hidden_state[0].float()
        rows.append(hidden[0] if mode == "cls" else hidden[-1] if mode == "lasttoken" else hidden.mean(0))
    del model
    torch.cuda.empty_cache()
    return normalize(torch.stack(rows))


def ours(
    model_dir: Path, inputs: list[list[int]], dtype: torch.dtype, device: str, fp8: bool = False
) -> torch.Tensor:
    """The served path: one packed batch through the Runner, compiled where the server compiles."""
    model = load_model(model_dir, torch.device(device), dtype)
    if fp8:
        quantize_fp8(model.module)
    compile_blocks = getattr(model.module, "compile_blocks", None)
    if device == "cuda" and model.compile_pays_off and compile_blocks is not None:
        compile_blocks()
    spec = read_embedding_spec(model_dir)
    runner = Runner(model, torch.device(device), spec.pooling_modes, spec.normalize)
    rows = runner.run([WorkItem(seq) for seq in inputs])
    runner.shutdown()
    del model, runner
    torch.cuda.empty_cache()
    return normalize(torch.from_numpy(np.stack(rows)).to(device))


def compare(a: torch.Tensor, b: torch.Tensor) -> str:
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
    return f"min cos {cos:.6f}  max abs {(a - b).abs().max().item():.2e}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", action="append", required=True)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache/toolkit-bench"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--fp8", action="store_true", help="also the --quantization fp8 path")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, of " + ",".join(DTYPES))
    args = parser.parse_args()
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"device: {card}, torch {torch.__version__}")
    rng = random.Random(0)
    for shape in args.shape:
        model_dir = build_shape(shape, Path(args.cache_dir) / shape, device=args.device)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        inputs = [[rng.randrange(1000, vocab) for _ in range(n)] for n in (1, 7, 64, 300, 512, 33, 128, 2)]
        ref32 = reference(model_dir, inputs, torch.float32, args.device)
        for name in args.dtypes.split(","):
            dtype = DTYPES[name]
            mine = ours(model_dir, inputs, dtype, args.device)
            line = f"{shape:15s} {name:9s} vs transformers fp32: {compare(mine, ref32)}"
            if dtype != torch.float32:
                same = reference(model_dir, inputs, dtype, args.device)
                line += f" | vs transformers {name}: {compare(mine, same)}"
                line += f" | transformers {name} vs fp32: {compare(same, ref32)}"
            print(line, flush=True)
        if args.fp8:
            mine = ours(model_dir, inputs, torch.bfloat16, args.device, fp8=True)
            print(f"{shape:15s} fp8       vs transformers fp32: {compare(mine, ref32)}", flush=True)


if __name__ == "__main__":
    main()

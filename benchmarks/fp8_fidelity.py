"""FP8 against float32 on trained weights and real text, where a GPU is not needed: torch runs
float8 products on the CPU too, with the same scales and float32 accumulation as on Hopper.

    python benchmarks/fp8_fidelity.py                    # the bundled MiniLM, and SmolLM2 if cached

Each model embeds the same texts (this repository's README and scaling page in 600-character
pieces) in float32, bfloat16, and bfloat16 with FP8 products; prints the
minimum and mean cosine of each against float32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.execution.runner import Runner
from toolkit.models.fp8 import quantize_fp8
from toolkit.models.loader import load_model
from toolkit.scheduling.work import WorkItem
from toolkit.service.model_files import read_model_files
from toolkit.service.model_source import bundled_model_dir

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    text[i : i + 600]
    for text in ((ROOT / "README.md").read_text(), (ROOT / "docs" / "scaling.md").read_text())
    for i in range(0, min(len(text), 9000), 600)
]
SMOLLM2 = Path.home() / ".cache" / "toolkit-tests" / "smollm2-135m-instruct"  # made by the tests


def embed(model_dir: Path, dtype: torch.dtype, fp8: bool = False) -> torch.Tensor:
    files = read_model_files(str(model_dir))
    model = load_model(files.spec.transformer_dir, torch.device("cpu"), dtype)
    if fp8:
        quantize_fp8(model.module)
    runner = Runner(model, torch.device("cpu"), files.spec.pooling_modes, files.spec.normalize)
    rows = runner.run([WorkItem(ids) for ids in files.tokenizer.encode_truncated(TEXTS, 256, "right")])
    runner.shutdown()
    return torch.from_numpy(np.stack(rows)).float()


def main() -> None:
    models = {"all-MiniLM-L6-v2": bundled_model_dir()}
    if SMOLLM2.is_dir():
        models["SmolLM2-135M"] = SMOLLM2
    print(f"torch {torch.__version__}; {len(TEXTS)} texts")
    for name, model_dir in models.items():
        reference = embed(model_dir, torch.float32)
        for label, kwargs in (("bfloat16", {}), ("fp8", {"fp8": True})):
            cosine = torch.nn.functional.cosine_similarity(
                embed(model_dir, torch.bfloat16, **kwargs), reference
            )
            print(f"  {name:18s} {label:9s} vs float32: min cos {cosine.min():.6f}, mean {cosine.mean():.6f}")


if __name__ == "__main__":
    main()

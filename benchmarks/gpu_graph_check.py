"""CUDA graph replays against the plain forward, on every attention path a graph can hold.

    python benchmarks/gpu_graph_check.py

CI has no GPU, so this is the end-to-end check of toolkit.execution.cuda_graphs. Tiny random models of the
test zoo (tests/model_zoo.py): BERT in bfloat16 (flash attention), MPNet in bfloat16 (padded
attention with its relative-position bias, CLS pooling), causal Qwen3 in float32 (padded
attention with a causal mask). Two Runners share each model, one with graphs and one without;
random batches are sent three times each to the first (seen, captured, replayed), so most shapes
are replayed with contents other than the ones they were captured on. Prints the worst
difference per model and exits 1 when one is off.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.model_zoo import build_tiny_model
from toolkit.execution.runner import Runner
from toolkit.models.loader import load_model
from toolkit.scheduling.work import WorkItem
from toolkit.service.model_spec import read_embedding_spec

CASES = [("bert", torch.bfloat16, None), ("mpnet", torch.bfloat16, "cls"), ("qwen3", torch.float32, None)]


def random_batches(rng: random.Random, vocab: int) -> list[list[WorkItem]]:
    batches = []
    for _ in range(40):
        count = rng.choice([1, 1, 2, 3, 5])
        batches.append(
            [WorkItem([rng.randrange(5, vocab) for _ in range(rng.randint(1, 40))]) for _ in range(count)]
        )
    return batches


def main() -> int:
    device = torch.device("cuda")
    failed = False
    for family, dtype, pooling in CASES:
        model_dir = build_tiny_model(family, Path(tempfile.mkdtemp()), pooling=pooling)
        spec = read_embedding_spec(model_dir)
        model = load_model(spec.transformer_dir, device, dtype)
        plain = Runner(model, device, spec.pooling_modes, spec.normalize)
        graphed = Runner(model, device, spec.pooling_modes, spec.normalize)
        graphed.capture_graphs([7, 8, 9], model.max_input_tokens)
        rng = random.Random(0)
        worst_abs, worst_cos = 0.0, 1.0
        vocab = json.loads((spec.transformer_dir / "config.json").read_text())["vocab_size"]
        for batch in random_batches(rng, vocab):
            expected = np.stack(plain.run(batch))
            for _ in range(3):
                got = np.stack(graphed.run(batch))
                worst_abs = max(worst_abs, float(np.abs(got - expected).max()))
                worst_cos = min(worst_cos, float((got * expected).sum(1).min()))
        stats = graphed.graphs.stats if graphed.graphs is not None else None
        # Graphs pad the batch, so matrix products see other row counts: rounding may differ.
        ok = (
            stats is not None
            and stats.replayed > 0
            and worst_cos >= (0.9999 if dtype == torch.float32 else 0.999)
        )
        failed |= not ok
        print(
            f"{family:6s} {dtype!s:15s} graphs: {stats.captured if stats else 0} captured, "
            f"{stats.replayed if stats else 0} replays; max abs diff {worst_abs:.2e}, min cos {worst_cos:.6f}"
            f" {'ok' if ok else 'FAILED'}",
            flush=True,
        )
        plain.shutdown()
        graphed.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

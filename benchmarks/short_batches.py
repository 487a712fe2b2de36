"""Lone short inputs on the CPU: oneDNN products with packed weights against torch's (MKL), in-process.

    python benchmarks/short_batches.py                      # bundled MiniLM, all cores
    python benchmarks/short_batches.py --lengths 6,30 --threads 1

Loads the bundled model twice: once with every linear layer packed for oneDNN
(`toolkit.models.short_batch_linear`, forced on), once with torch's plain products, the peer the
server used before and what transformers runs. Then, alternating between the two on this thread:
the forward of one input per length (median of `--repeats`), and the first forward of inputs of
lengths never seen before against a second one (oneDNN builds its kernels on first sight of a row
count), then the same once the kernels of every short row count are built, as the server does
after start-up. Also prints what the server's load-time measurement decides on this machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.serve import machine_description
from toolkit.execution.packing import pack
from toolkit.models import short_batch_linear
from toolkit.models.base import LoadedModel
from toolkit.models.loader import load_model
from toolkit.models.short_batch_linear import (
    ShortBatchLinear,
    build_kernels,
    distinct_packed_layers,
    packed_products_pay_off,
)
from toolkit.service.model_source import bundled_model_dir


def load(packed: bool) -> LoadedModel:
    """The bundled model with packing forced on or off, whatever the load-time measurement says."""
    saved = short_batch_linear.PACKED_MAX_BYTES, short_batch_linear.packed_products_pay_off
    short_batch_linear.PACKED_MAX_BYTES = saved[0] if packed else 0
    short_batch_linear.packed_products_pay_off = lambda layers: True  # type: ignore[assignment]
    try:
        return load_model(bundled_model_dir(), torch.device("cpu"), torch.float32)
    finally:
        short_batch_linear.PACKED_MAX_BYTES, short_batch_linear.packed_products_pay_off = saved


def token_ids(length: int, rng: random.Random) -> list[int]:
    return [101] + [rng.randrange(1000, 20000) for _ in range(length - 2)] + [102]


@torch.inference_mode()
def forward_seconds(model: LoadedModel, ids: list[int]) -> float:
    batch = pack([ids], [0])
    started = time.perf_counter()
    model.forward(batch, None)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="6,13,30,64", help="input lengths in tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--new-lengths", default="5-44", help="lengths LO-HI first seen in the last part")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {"packed": load(packed=True), "torch": load(packed=False)}
    layers = [m for m in models["packed"].module.modules() if isinstance(m, ShortBatchLinear)]
    print(f"{machine_description('cpu')}, {args.threads} threads")
    print(f"load-time measurement keeps the packed copy here: {packed_products_pay_off(layers)}")
    rng = random.Random(0)
    print(f"{'tokens':>7} {'packed ms':>10} {'torch ms':>9} {'speed-up':>9}")
    lengths = [int(x) for x in args.lengths.split(",")]
    for length in lengths:
        ids = token_ids(length, rng)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.repeats + 5):
            for name, model in models.items():
                times[name].append(forward_seconds(model, ids))
        packed_s, torch_s = (statistics.median(times[name][5:]) for name in models)
        print(f"{length:>7} {packed_s * 1e3:>10.2f} {torch_s * 1e3:>9.2f} {torch_s / packed_s:>8.2f}x")
    lo, hi = (int(x) for x in args.new_lengths.split("-"))
    new_lengths = [n for n in range(lo, hi + 1) if n not in lengths]
    print(f"lengths {lo}-{hi} but the above, each new: median ms of first sight / again (first's cost)")
    for name, model in models.items():
        report_first_sight(name, model, new_lengths[::2], rng)
    # What the server does after start-up (toolkit.execution.kernel_builder): build the kernels of every short
    # row count in advance. Measured on the other half of the lengths, still unseen.
    build_started = time.perf_counter()
    for rows in range(1, short_batch_linear.PACKED_MAX_ROWS + 1):
        build_kernels(distinct_packed_layers(models["packed"].module), rows)
    build_s = time.perf_counter() - build_started
    label = f"packed, kernels built first ({build_s:.2f} s)"
    report_first_sight(label, models["packed"], new_lengths[1::2], rng)


def report_first_sight(label: str, model: LoadedModel, lengths: list[int], rng: random.Random) -> None:
    first, again = [], []
    for length in lengths:
        ids = token_ids(length, rng)
        first.append(forward_seconds(model, ids))
        again.append(forward_seconds(model, ids))
    cost = statistics.median(f - a for f, a in zip(first, again, strict=True))
    print(
        f"  {label}: {statistics.median(first) * 1e3:.2f} / {statistics.median(again) * 1e3:.2f} "
        f"({cost * 1e3:.2f})"
    )


if __name__ == "__main__":
    main()

"""Where a forward pass spends its time, outside HTTP: one short input and one full batch.

    python benchmarks/profile_forward.py --shape gte-qwen2-1.5b

Times the runner's launch-to-result path (pack, copy, forward, pool, copy back) eager and
compiled, and prints the GPU kernels of the full batch grouped by name (where the device time
goes). In the server's configuration (compiled or not), both inputs again as CUDA graph replays,
with the short input's kernels.
"""

from __future__ import annotations

import argparse
import collections
import functools
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.shapes import SHAPES, build_shape
from toolkit.execution.runner import Runner
from toolkit.models.loader import load_model
from toolkit.scheduling.work import WorkItem
from toolkit.service.model_spec import read_embedding_spec


def timed(runner: Runner, items: list[WorkItem], repeats: int) -> float:
    runner.run(items)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        runner.run(items)
    return (time.perf_counter() - started) / repeats


def kernel_table(run: Callable[[], object], top: int = 14) -> None:
    """GPU kernel time of one call of `run`, grouped by kernel name, largest first."""
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.name[:80]].append(event.device_time)
    total = sum(sum(times) for times in by_name.values())
    print(f"  GPU kernels: {total / 1000:.2f} ms in all")
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"  {100 * sum(times) / total:5.1f}% {sum(times) / 1000:7.2f} ms x{len(times):4d}  {name}")


def graphs_report(
    runner: Runner, short: list[WorkItem], full: list[WorkItem], tokens: int, shape: str
) -> None:
    """The same two inputs again with CUDA graphs on: time, difference to no graph, kernels."""
    plain_short, plain_full = runner.run(short)[0], np.stack(runner.run(full))
    runner.capture_graphs(short[0].token_ids * 32, 512)
    assert runner.graphs is not None, "graphs are off"
    runner.run(full)  # a batch shape is captured when it comes a second time
    replayed = runner.graphs.stats.replayed
    graphed_short, graphed_full = runner.run(short)[0], np.stack(runner.run(full))
    full_graphed = runner.graphs.stats.replayed - replayed == 2
    short_s, full_s = timed(runner, short, 50), timed(runner, full, 5)
    print(
        f"{shape} graphs  : 8-token input {1000 * short_s:.2f} ms; {tokens}-token batch "
        f"{1000 * full_s:.1f} ms = {tokens / full_s:,.0f} tok/s "
        f"({'graphed' if full_graphed else 'over the graph limit, not graphed'}); max abs diff to no "
        f"graph {abs(plain_short - graphed_short).max():.2e} (input), "
        f"{abs(plain_full - graphed_full).max():.2e} (batch)",
        flush=True,
    )
    kernel_table(functools.partial(runner.run, short))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache/toolkit-bench"))
    args = parser.parse_args()
    model_dir = build_shape(args.shape, Path(args.cache_dir) / args.shape, device="cuda")
    spec = read_embedding_spec(model_dir)
    rng = random.Random(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    short = [WorkItem([rng.randrange(1000, vocab) for _ in range(8)])]
    full, tokens = [], 0
    while tokens < 32768 - 512:
        n = rng.randint(16, 512)
        full.append(WorkItem([rng.randrange(1000, vocab) for _ in range(n)]))
        tokens += n
    for compiled in (False, True):
        model = load_model(model_dir, torch.device("cuda"), torch.bfloat16)
        if compiled:
            model.module.compile_blocks()
        runner = Runner(model, torch.device("cuda"), spec.pooling_modes, spec.normalize)
        runner.run(short)
        runner.run(full)
        short_s, full_s = timed(runner, short, 50), timed(runner, full, 5)
        label = "compiled" if compiled else "eager"
        print(
            f"{args.shape} {label:8s}: 8-token input {1000 * short_s:.2f} ms; "
            f"{tokens}-token batch {1000 * full_s:.1f} ms = {tokens / full_s:,.0f} tok/s",
            flush=True,
        )
        kernel_table(functools.partial(runner.run, full))
        if compiled == model.compile_pays_off:  # the server's configuration: add CUDA graphs
            graphs_report(runner, short, full, tokens, args.shape)
        runner.shutdown()
        del model, runner
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

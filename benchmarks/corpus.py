"""Embedding a corpus: the in-process Engine, the server over HTTP and sentence-transformers, in one run.

    python benchmarks/corpus.py                          # 20k texts, the bundled MiniLM, this CPU
    python benchmarks/corpus.py --num-texts 5000 --memory 10000,100000
    python benchmarks/corpus.py --num-texts 600 --threads 1 --memory ''   # one core each

Each way embeds the same texts (5-200 words each): `SentenceTransformer.encode` (batch size 32,
as its users run it) and `toolkit.Engine.encode` in this process, taking turns for `--rounds`
rounds, then a server started with `launch_server_cmd` driven by 8 clients of 64 texts per request.
Prints the median texts/s and tokens/s of each, the ratios to sentence-transformers (each round's
too), the machine and its CPU flags. `--memory` then embeds each count of texts (5-30 words, to
keep the runs short) in a fresh process with `Engine.stream`, appending each part to a file as it
comes, and prints each one's peak RSS: streaming should keep it flat whatever the count.
`--threads N` gives both ways N torch threads (the Engine then runs one worker of N) and skips
the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.serve import drive, machine_description, payloads_for

WORDS = "the of and a to in is server vector model text search query document fast".split()


def corpus(count: int, seed: int = 0, longest: int = 200) -> Iterator[str]:
    """Texts of 5 to `longest` words, each word one token of MiniLM's, generated lazily."""
    rng = random.Random(seed)
    for _ in range(count):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, longest)))


def cpu_flags() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in info if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    return " ".join(flag for flag in wanted if flag in flags) or "no avx2"


def time_in_process(texts: list[str], rounds: int, workers: int | None = None) -> dict[str, list[float]]:
    """Seconds per round for `SentenceTransformer.encode` (batch size 32) and `Engine.encode`,
    both loaded once and taking turns, so that drift in the machine's speed hits both alike."""
    from sentence_transformers import SentenceTransformer

    from toolkit import Engine
    from toolkit.service.model_source import bundled_model_dir

    model = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    with Engine(device="cpu", cpu_workers=workers) as engine:
        ways = {
            "sentence-transformers": lambda batch: model.encode(batch, batch_size=32),
            "toolkit Engine (in-process)": engine.encode,
        }
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for encode in ways.values():
            encode(texts[:256])  # warm up
        for round_ in range(rounds):
            order = list(ways.items()) if round_ % 2 == 0 else list(ways.items())[::-1]
            for name, encode in order:
                started = time.perf_counter()
                encode(texts)
                seconds[name].append(time.perf_counter() - started)
    return seconds


def time_server(texts: list[str]) -> float:
    from toolkit.utils import launch_server_cmd, terminate_process, wait_for_server

    process, port = launch_server_cmd("python3 -m toolkit.launch_server --log-level warning")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, timeout=300, process=process)
        asyncio.run(drive(url, payloads_for(texts[:256], 64), 8))  # warm up
        return float(asyncio.run(drive(url, payloads_for(texts, 64), 8))["elapsed_s"])
    finally:
        terminate_process(process)


def peak_rss_mb(count: int) -> dict[str, float]:
    """Embed `count` texts with Engine.stream into a file, part by part, in a fresh process: its
    peak RSS, and its peak anonymous RSS (without file-backed pages)."""
    script = f"""
import sys, tempfile, threading, time, psutil, numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from benchmarks.corpus import corpus
from toolkit import Engine
peak, anonymous, done = 0, 0, False
def sample():
    global peak, anonymous
    process = psutil.Process()
    while not done:
        memory = process.memory_info()
        peak, anonymous = max(peak, memory.rss), max(anonymous, memory.rss - memory.shared)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
with Engine(device="cpu") as engine, tempfile.TemporaryFile() as file:
    for part in engine.stream(corpus({count}, seed=1, longest=30)):
        file.write(np.ascontiguousarray(part, dtype=np.float32).tobytes())
    file.flush()
done = True
print(peak / 2**20, anonymous / 2**20)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peak, anonymous = map(float, result.stdout.strip().splitlines()[-1].split())
    return {"rss": peak, "anonymous": anonymous}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-texts", type=int, default=20_000)
    parser.add_argument(
        "--memory", default="10000,100000", help="text counts for the peak-RSS runs ('' for none)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="turns of sentence-transformers and the Engine")
    parser.add_argument("--threads", type=int, help="torch threads for each way; skips the server")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # before toolkit reads the cores it may use
    texts = list(corpus(args.num_texts))
    tokens = sum(len(text.split()) + 2 for text in texts)
    rounds = time_in_process(texts, args.rounds, 1 if args.threads else None)
    if not args.threads:
        rounds["toolkit server (HTTP, 8 clients)"] = [time_server(texts)]
    seconds = {name: statistics.median(values) for name, values in rounds.items()}
    reference = rounds["sentence-transformers"]
    print(f"{machine_description('cpu')}; CPU flags: {cpu_flags()}; threads: {args.threads or 'all'}")
    print(f"{len(texts)} texts, {tokens} tokens (5-200 words each); medians of {args.rounds} rounds in turn")
    for name, values in rounds.items():
        elapsed = seconds[name]
        # In process, each round's ratio against sentence-transformers' time in the same round.
        ratios = []
        if len(values) == len(reference):
            ratios = [f"{ref / value:.2f}" for ref, value in zip(reference, values, strict=True)]
        print(
            f"  {name:34s} {len(texts) / elapsed:8.0f} texts/s {tokens / elapsed:9.0f} tok/s "
            f"{seconds['sentence-transformers'] / elapsed:5.2f}x sentence-transformers"
            + (f" (rounds: {' '.join(ratios)})" if ratios else "")
        )
    memory = {int(count): peak_rss_mb(int(count)) for count in args.memory.split(",") if count}
    for count, peak in memory.items():
        print(
            f"  Engine.stream, {count} texts: peak RSS {peak['rss']:.0f} MB, "
            f"anonymous {peak['anonymous']:.0f} MB"
        )
    if args.out:
        results = {
            "texts": len(texts),
            "tokens": tokens,
            "seconds": seconds,
            "rounds_s": rounds,
            "peak_rss_mb": memory,
        }
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

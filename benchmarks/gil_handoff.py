"""What a tokenization costs a request when its thread must win the GIL back from a busy event loop.

    python benchmarks/gil_handoff.py

A front end tokenizes a request on a worker thread; the tokenizer releases the GIL, but the thread
needs it again to hand the result back, and a thread running Python (here a spinning one, standing
in for an event loop at work) lets go of it only every switch interval. Prints the time to
tokenize 8 texts of 5-200 words with MiniLM's tokenizer alone and beside the busy thread, at
Python's default interval (5 ms) and at the front ends' (`GIL_SWITCH_INTERVAL_S`), with the share
of its speed the busy thread kept, and the machine.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.corpus import corpus, cpu_flags
from benchmarks.serve import machine_description

CALLS = 200
Encode = Callable[[list[str]], object]


def tokenize_seconds(encode: Encode, texts: list[str]) -> float:
    started = time.perf_counter()
    for _ in range(CALLS):
        encode(texts)
    return (time.perf_counter() - started) / CALLS


def beside_busy_thread(encode: Encode, texts: list[str]) -> tuple[float, float]:
    """(seconds per call beside a spinning Python thread, the share of its free rate it kept)."""
    count, stop = 0, False

    def spin() -> None:
        nonlocal count
        while not stop:
            count += 1

    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.1)
    before, started = count, time.perf_counter()
    time.sleep(0.3)
    free_rate = (count - before) / (time.perf_counter() - started)
    before, started = count, time.perf_counter()
    seconds = tokenize_seconds(encode, texts)
    busy_rate = (count - before) / (time.perf_counter() - started)
    stop = True
    thread.join()
    return seconds, busy_rate / free_rate


def main() -> None:
    from tokenizers import Tokenizer

    from toolkit.process.bootstrap import GIL_SWITCH_INTERVAL_S
    from toolkit.service.model_source import bundled_model_dir

    tokenizer = Tokenizer.from_file(str(bundled_model_dir() / "tokenizer.json"))
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    texts = list(corpus(8, seed=1))
    print(f"{machine_description('cpu')}; CPU flags: {cpu_flags()}")
    for interval in (0.005, GIL_SWITCH_INTERVAL_S):
        sys.setswitchinterval(interval)
        alone = tokenize_seconds(encode, texts)
        busy, kept = beside_busy_thread(encode, texts)
        print(
            f"  switch interval {interval * 1e3:.1f} ms: 8 texts tokenize in {alone * 1e3:.2f} ms alone, "
            f"{busy * 1e3:.2f} ms beside a busy Python thread (which kept {kept:.0%} of its speed)"
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

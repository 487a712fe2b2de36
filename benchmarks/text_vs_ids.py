"""What tokenization costs the server: the same workload sent as text (as users send it, the openai
client's way) and as the token ids of that text, in one run, on a full-size random-weight shape
with a real tokenizer.

    python benchmarks/text_vs_ids.py --shape bert-base --tokenizer .bench/tokenizers/minilm
    python benchmarks/text_vs_ids.py --shape gte-qwen2-1.5b --tokenizer .bench/tokenizers/smollm2 \\
        --server-args=--http-workers=4

The tokenizer folder's tokenizer.json replaces the shape's placeholder one (a WordPiece tokenizer
for BERT-base, a byte-level BPE for the Qwen shape; their ids fit the shapes' tables). Texts are
English-like sentences of random common words, cut to lengths in LO..HI tokens. Prints tokens/s
for each form at each concurrency, text as a share of ids, and the CPU seconds the server's
processes spent per second of each run (front ends and engine together).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.serve import drive, machine_description, payloads_for, resolve_device, start_server
from benchmarks.shapes import SHAPES, build_shape

WORDS = (
    "the of and to in is for on that with as was by at from it an be this are or which have has not "
    "but all were when we there can more one their will if about so what out up other into time only "
    "new some could these two may first then do any like my now over such our man me even most made "
    "after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year "
    "off come since against go came right used take three server vector embedding model search query "
    "document retrieval passage tokenizer batch latency throughput notebook python cluster memory"
).split()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--tokenizer", required=True, help="a folder holding tokenizer.json")
    parser.add_argument("--lengths", default="16-512")
    parser.add_argument("--num-inputs", type=int, default=20000)
    parser.add_argument("--inputs-per-request", type=int, default=8)
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--server-args", default="")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache/toolkit-bench"))
    parser.add_argument("--out", help="write results JSON here")
    return parser.parse_args()


def model_with_tokenizer(shape: str, tokenizer_dir: Path, cache: Path, device: str) -> Path:
    """The shape's checkpoint with the real tokenizer in place of its placeholder."""
    base = build_shape(shape, cache / shape, device=device)
    dest = cache / f"{shape}+{tokenizer_dir.name}"
    if not dest.exists():
        shutil.copytree(base, dest, symlinks=True)
    shutil.copy(tokenizer_dir / "tokenizer.json", dest / "tokenizer.json")
    # sentence-transformers 6 wants the pooled width (shapes cached before it was written lack it).
    pooling = dest / "1_Pooling" / "config.json"
    width = json.loads((dest / "config.json").read_text())["hidden_size"]
    pooling.write_text(json.dumps(json.loads(pooling.read_text()) | {"word_embedding_dimension": width}))
    return dest


def make_texts(tokenizer: Any, lengths: str, count: int) -> tuple[list[str], list[list[int]]]:
    """Sentences of common words whose token counts are uniform in LO..HI (special tokens included)."""
    lo, hi = (int(x) for x in lengths.split("-"))
    rng = random.Random(0)
    specials = len(tokenizer.encode("a").ids) - len(tokenizer.encode("a", add_special_tokens=False).ids)
    texts, ids = [], []
    for _ in range(count):
        target = rng.randint(lo, hi) - specials
        sentence = " ".join(rng.choice(WORDS) for _ in range(target)).capitalize() + "."
        offsets = tokenizer.encode(sentence, add_special_tokens=False).offsets
        text = sentence[: offsets[min(target, len(offsets)) - 1][1]]
        texts.append(text)
        ids.append(tokenizer.encode(text).ids)
    return texts, ids


def cpu_seconds(pid: int) -> float:
    """CPU time of the server process and its children so far."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def main() -> None:
    from tokenizers import Tokenizer

    args = parse_args()
    device = resolve_device(args.device)
    model_dir = model_with_tokenizer(args.shape, Path(args.tokenizer), Path(args.cache_dir), device)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # As the server does: MiniLM's tokenizer.json pads and cuts every input to 128 tokens.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    texts, ids = make_texts(tokenizer, args.lengths, args.num_inputs)
    tokens = sum(map(len, ids))
    machine = machine_description(device)
    print(f"machine: {machine}\nmodel: {args.shape}, tokenizer {args.tokenizer}", flush=True)
    print(f"workload: {len(ids)} inputs, {tokens} tokens, lengths {args.lengths}", flush=True)
    results: dict[str, Any] = {"machine": machine, "model": args.shape, "tokens": tokens, "runs": []}
    process, url = start_server(model_dir, args)
    try:
        asyncio.run(drive(url, payloads_for(texts[:256], args.inputs_per_request), 8))  # warm-up
        for concurrency in (int(x) for x in args.concurrency.split(",")):
            for form, inputs in (("ids", ids), ("text", texts)):
                before, started = cpu_seconds(process.pid), time.perf_counter()
                run = asyncio.run(drive(url, payloads_for(inputs, args.inputs_per_request), concurrency))
                busy = (cpu_seconds(process.pid) - before) / (time.perf_counter() - started)
                run |= {"form": form, "concurrency": concurrency, "tokens_per_s": tokens / run["elapsed_s"]}
                run["server_cpus_busy"] = busy
                results["runs"].append(run)
                print(
                    f"  {concurrency:4d} clients, {form:4s}: {run['tokens_per_s']:>12,.0f} tok/s, "
                    f"p50 {run['p50_ms']:.1f} ms, server CPUs busy {busy:.1f}, failures {run['failures']}",
                    flush=True,
                )
    finally:
        from toolkit.utils import terminate_process

        terminate_process(process)
    by = {(run["concurrency"], run["form"]): run["tokens_per_s"] for run in results["runs"]}
    for concurrency in sorted({c for c, _ in by}):
        print(
            f"  text at {concurrency} clients: {by[concurrency, 'text'] / by[concurrency, 'ids']:.0%} of ids"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

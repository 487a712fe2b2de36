"""Throughput and latency of the server over HTTP, against the reference on the same inputs.

    python benchmarks/serve.py                                  # bundled MiniLM on this CPU
    python benchmarks/serve.py --shape gte-qwen2-1.5b --lengths 16-512 --num-inputs 20000
    python benchmarks/serve.py --shape bert-base --concurrency 1,16,64

The reference (sentence-transformers for models with sentence-transformers files and a
tokenizer, else plain transformers AutoModel + pooling) runs first in this process: inputs sorted
by length, several batch sizes, the best one kept. Then the server is started as a subprocess
and driven by concurrent clients (asyncio + aiohttp, base64 responses as the openai client asks).
Once the server has stopped, the reference's best batch size runs once more, and its throughput is
the tokens over the mean time of the two passes: on a shared machine one pass moved by a sixth
between runs. Should that second pass fail, the first one stands alone.
Prints tokens/s, sequences/s, p50/p99 latency, ratios to the reference and to the device limit,
and the machine; `--out` saves everything as JSON for notebooks/benchmark.ipynb.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.shapes import SHAPES, build_shape


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", help="model directory (default: the bundled MiniLM)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of a real config")
    parser.add_argument(
        "--lengths", help="input lengths LO-HI: tokens for --shape (default 16-512), else words (5-200)"
    )
    parser.add_argument("--num-inputs", type=int, default=2000)
    parser.add_argument("--inputs-per-request", type=int, default=8)
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    parser.add_argument("--reference-batch-sizes", default="16,32,64,128")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--engine", action="store_true", help="also time the in-process toolkit.Engine on the same inputs"
    )
    parser.add_argument("--server-args", default="", help="extra server flags, e.g. '--no-compile'")
    parser.add_argument(
        "--py-spy", help="record the server with py-spy during the last run (raw stacks file)"
    )
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/toolkit-bench"))
    parser.add_argument("--out", help="write results JSON here")
    parser.add_argument(
        "--single-requests", type=int, default=200, help="lone short requests for p50 (0: none)"
    )
    return parser.parse_args()


def make_inputs(vocab_size: int, lengths: str, count: int, seed: int = 0) -> list[list[int]]:
    """Token-id inputs with lengths uniform in LO..HI; ids avoid the first 1000 (special tokens)."""
    lo, hi = (int(x) for x in lengths.split("-"))
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def machine_description(device: str) -> str:
    import torch

    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}); host {cpu}"
    return f"CPU {cpu} (torch {torch.__version__}, {torch.get_num_threads()} threads)"


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


# ---------------------------------------------------------------- reference


def run_reference(model_dir: Path, inputs: list[list[int]], device: str, dtype: str, batch_sizes: list[int]):
    """Plain transformers AutoModel + the model's pooling, length-sorted, best batch size."""
    import torch
    from transformers import AutoModel

    from toolkit.service.model_spec import read_embedding_spec

    torch_dtype = _torch_dtype(dtype, device)
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch_dtype).to(device).eval()
    mode = read_embedding_spec(model_dir).pooling_modes[0]
    ordered = sorted(inputs, key=len)
    results = {}
    for batch_size in batch_sizes:
        # An untimed pass over every shape first: cuDNN attention builds a plan per new shape,
        # which made a cold pass 3-5x slower than the steady state a long-running user sees.
        _reference_pass(model, ordered, batch_size, mode, device)
        started = time.perf_counter()
        _reference_pass(model, ordered, batch_size, mode, device)
        results[batch_size] = time.perf_counter() - started
        print(f"  reference batch {batch_size}: {results[batch_size]:.2f} s", flush=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    best = min(results, key=results.get)
    return best, results[best]


@__import__("torch").inference_mode()
def _reference_pass(model, inputs: list[list[int]], batch_size: int, mode: str, device: str) -> None:
    import torch

    pad = int(getattr(model.config, "pad_token_id", None) or 0)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        length = max(map(len, chunk))
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        if mode == "cls":
            pooled = hidden[:, 0]
        elif mode == "lasttoken":
            pooled = hidden[torch.arange(len(chunk), device=device), mask.sum(1) - 1]
        else:
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()


def run_sentence_transformers(model_dir: Path, texts: list[str], device: str, batch_sizes: list[int]):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device=device)
    model.encode(texts[:64], batch_size=32)
    results = {}
    for batch_size in batch_sizes:
        started = time.perf_counter()
        model.encode(texts, batch_size=batch_size)  # sorts by length internally
        results[batch_size] = time.perf_counter() - started
        print(f"  sentence-transformers batch {batch_size}: {results[batch_size]:.2f} s", flush=True)
    best = min(results, key=results.get)
    return best, results[best]


def reference_result(
    tokens: int,
    batch_size: int,
    seconds_before: float,
    time_reference: Callable[[list[int]], tuple[int, float]],
) -> dict[str, Any]:
    """The reference's figure: its first pass and, once the server has stopped, a second pass of the
    same batch size, combined as tokens over the mean time. A failed second pass (out of memory,
    say) leaves the first alone rather than losing the server's figures measured before it."""
    result: dict[str, Any] = {"batch_size": batch_size, "seconds": seconds_before}
    print("reference again, the server stopped:", flush=True)
    try:
        _, seconds_after = time_reference([batch_size])
    except Exception as exc:
        print(f"  the second pass failed ({exc!r}): the first pass stands alone", flush=True)
    else:
        result |= {
            "seconds": (seconds_before + seconds_after) / 2,
            "seconds_before": seconds_before,
            "seconds_after": seconds_after,
        }
    result["tokens_per_s"] = tokens / result["seconds"]
    return result


def _torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


# ---------------------------------------------------------------- server


def start_server(model_dir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    from toolkit.utils import launch_server_cmd, wait_for_server

    command = f"python3 -m toolkit.launch_server --model-path {model_dir} --log-level info"
    command += f" --dtype {args.dtype} --device {args.device}"
    if args.max_batch_tokens:
        command += f" --max-batch-tokens {args.max_batch_tokens}"
    command += f" {args.server_args}"
    process, port = launch_server_cmd(command, host="127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    wait_for_server(url, timeout=600, process=process)
    return process, url


async def drive(
    url: str, payloads: list[dict[str, Any]], concurrency: int, path: str = "/v1/embeddings"
) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    server_spans: dict[str, list[float]] = {}  # Server-Timing stages, milliseconds
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for payload in payloads:
        queue.put_nowait(payload)
    failures = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while not queue.empty():
            payload = queue.get_nowait()
            started = time.perf_counter()
            async with session.post(url + path, json=payload) as response:
                await response.read()
                if response.status != 200:
                    failures += 1
                for span in response.headers.get("server-timing", "").split(", "):
                    name, _, duration = span.partition(";dur=")
                    if duration:
                        server_spans.setdefault(name, []).append(float(duration))
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "elapsed_s": elapsed,
        "failures": failures,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "server_p50_ms": {name: statistics.median(spans) for name, spans in server_spans.items()},
    }


def payloads_for(inputs: list[Any], per_request: int) -> list[dict[str, Any]]:
    return [
        {"input": inputs[i : i + per_request], "encoding_format": "base64"}
        for i in range(0, len(inputs), per_request)
    ]


# ---------------------------------------------------------------- limit


def device_limit_tokens_per_s(
    model_dir: Path, inputs: list[list[int]], device: str
) -> tuple[float, float] | None:
    """(measured bf16 matmul TFLOP/s, tokens/s that rate allows for this model and these lengths)."""
    import torch

    if device != "cuda":
        return None
    cfg = json.loads((model_dir / "config.json").read_text())
    d, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or d // heads
    if cfg["model_type"] in ("bert", "xlm-roberta", "roberta", "mpnet"):
        linear = 4 * d * d + 2 * d * inter
    elif cfg["model_type"] == "modernbert":  # GeGLU: the input product is twice as wide
        linear = 4 * d * d + 3 * d * inter
    else:
        linear = d * (heads + 2 * kv) * head_dim + heads * head_dim * d + 3 * d * inter
    mean_len = sum(map(len, inputs)) / len(inputs)
    mean_sq = sum(len(x) ** 2 for x in inputs) / len(inputs)
    # Per token: 2 FLOPs per weight, plus QK^T and AV over the sequence (4 * L * d per layer).
    flops_per_token = layers * (2 * linear + 4 * (mean_sq / mean_len) * heads * head_dim)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    tflops = 20 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12
    return tflops, tflops * 1e12 / flops_per_token


# ---------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    args.lengths = args.lengths or ("16-512" if args.shape else "5-200")
    cache = Path(args.cache_dir)
    if args.shape:
        model_dir = build_shape(args.shape, cache / args.shape, device=device)
    elif args.model_path:
        model_dir = Path(args.model_path)
    else:
        from toolkit.service.model_source import bundled_model_dir

        model_dir = bundled_model_dir()
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    machine = machine_description(device)
    print(f"machine: {machine}\nmodel: {args.shape or model_dir}", flush=True)
    use_texts = not args.shape
    texts, inputs = _workload(model_dir, vocab, args, use_texts)
    tokens = sum(map(len, inputs))
    print(f"workload: {len(inputs)} inputs, {tokens} tokens, lengths {args.lengths}", flush=True)

    results: dict[str, Any] = {
        "machine": machine,
        "model": args.shape or args.model_path or "all-MiniLM-L6-v2 (bundled)",
        "tokens": tokens,
        "inputs": len(inputs),
        "lengths": args.lengths,
        "runs": [],
    }
    batch_sizes = [int(x) for x in args.reference_batch_sizes.split(",")]

    def time_reference(sizes: list[int]) -> tuple[int, float]:
        if use_texts:
            return run_sentence_transformers(model_dir, texts, device, sizes)
        return run_reference(model_dir, inputs, device, args.dtype, sizes)

    if not args.skip_reference:
        print("reference:", flush=True)
        results["reference_name"] = "sentence-transformers" if use_texts else "transformers"
        best_bs, seconds_before = time_reference(batch_sizes)
    limit = device_limit_tokens_per_s(model_dir, inputs, device)
    if limit is not None:
        results["matmul_tflops"], results["limit_tokens_per_s"] = limit

    process, url = start_server(model_dir, args)
    try:
        payload_inputs = texts if use_texts else inputs
        asyncio.run(drive(url, payloads_for(payload_inputs[:256], args.inputs_per_request), 8))  # warm-up
        levels = [int(x) for x in args.concurrency.split(",")]
        for concurrency in levels:
            spy = (
                _start_py_spy(process.pid, args.py_spy) if args.py_spy and concurrency == levels[-1] else None
            )
            run = asyncio.run(drive(url, payloads_for(payload_inputs, args.inputs_per_request), concurrency))
            run |= {
                "concurrency": concurrency,
                "tokens_per_s": tokens / run["elapsed_s"],
                "seqs_per_s": len(inputs) / run["elapsed_s"],
            }
            results["runs"].append(run)
            if spy is not None:
                spy.wait()
            print(f"  concurrency {concurrency}: {run['tokens_per_s']:,.0f} tok/s", flush=True)
        lone = "Once upon a time" if use_texts else inputs[0][:8]  # 6 tokens with MiniLM's specials
        if args.single_requests > 0:
            short = [{"input": lone} for _ in range(args.single_requests)]
            results["single_short_request"] = asyncio.run(drive(url, short, 1))
    finally:
        from toolkit.utils import terminate_process

        terminate_process(process)
    if not args.skip_reference:
        results["reference"] = reference_result(tokens, best_bs, seconds_before, time_reference)
    if args.engine:
        seconds = time_engine(model_dir, texts if use_texts else inputs, args)
        rate, best = tokens / seconds, max(run["tokens_per_s"] for run in results["runs"])
        results["engine"] = {"tokens_per_s": rate, "of_server_best": rate / best}
        print(f"  in-process Engine: {rate:,.0f} tok/s, {rate / best:.2f}x the server's best", flush=True)
    report(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def time_engine(model_dir: Path, inputs: list[Any], args: argparse.Namespace) -> float:
    """Seconds for toolkit.Engine to embed `inputs` in this process, after a warm-up pass."""
    from toolkit import Engine

    options = {"max_batch_tokens": args.max_batch_tokens} if args.max_batch_tokens else {}
    with Engine(str(model_dir), device=args.device, dtype=args.dtype, **options) as engine:
        engine.encode(inputs[:512])
        started = time.perf_counter()
        engine.encode(inputs)
        return time.perf_counter() - started


def _start_py_spy(pid: int, output: str) -> subprocess.Popen:
    """Sample every server thread for 8 s (GIL holders and idle threads alike) into a raw stacks file."""
    command = ["py-spy", "record", "--pid", str(pid), "--duration", "8", "--rate", "250"]
    command += ["--format", "raw", "--output", output, "--threads", "--idle", "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def _workload(model_dir: Path, vocab: int, args: argparse.Namespace, use_texts: bool):
    if not use_texts:
        return None, make_inputs(vocab, args.lengths, args.num_inputs)
    from toolkit.service.tokenization import TextTokenizer

    lo, hi = (int(x) for x in args.lengths.split("-"))
    rng = random.Random(0)
    # Words that are one token each, so a text of N words is N + 2 tokens.
    words = "the of and a to in is server vector model text search query document fast".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(args.num_inputs)]
    return texts, TextTokenizer.from_dir(model_dir).encode(texts)


def report(results: dict[str, Any]) -> None:
    print(f"\n{results['model']} on {results['machine']}")
    print(f"{results['inputs']} inputs, {results['tokens']} tokens, lengths {results['lengths']}")
    ref = results.get("reference")
    limit = results.get("limit_tokens_per_s")
    if ref:
        passes = ""
        if "seconds_after" in ref:
            rates = (f"{results['tokens'] / ref[k]:,.0f}" for k in ("seconds_before", "seconds_after"))
            passes = f" (tokens over the mean time of two passes at {', '.join(rates)} tok/s)"
        print(
            f"reference ({results['reference_name']}, sorted, batch {ref['batch_size']}): "
            f"{ref['tokens_per_s']:,.0f} tok/s{passes}"
        )
    if limit:
        print(
            f"limit (bf16 matmul {results['matmul_tflops']:.0f} TFLOP/s / FLOPs per token): "
            f"{limit:,.0f} tok/s"
        )
    header = ("clients", "tok/s", "seq/s", "p50 ms", "p99 ms", "vs ref", "vs limit")
    print("{:>8} {:>12} {:>9} {:>8} {:>8} {:>7} {:>8}".format(*header))
    for run in results["runs"]:
        vs_ref = f"{run['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        vs_limit = f"{run['tokens_per_s'] / limit:.0%}" if limit else "-"
        print(
            f"{run['concurrency']:>8} {run['tokens_per_s']:>12,.0f} {run['seqs_per_s']:>9,.1f} "
            f"{run['p50_ms']:>8.1f} {run['p99_ms']:>8.1f} {vs_ref:>7} {vs_limit:>8}"
        )
        if run["failures"]:
            print(f"         {run['failures']} failed requests")
    single = results.get("single_short_request")
    if not single:
        return
    print(f"one short request alone: p50 {single['p50_ms']:.2f} ms, p99 {single['p99_ms']:.2f} ms")
    stages = single.get("server_p50_ms", {})
    if stages:  # what the server itself saw (Server-Timing); the rest is the client and the network
        print("  server p50: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in stages.items()))


if __name__ == "__main__":
    main()

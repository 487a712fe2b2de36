"""Reranking over HTTP against sentence-transformers' CrossEncoder.predict, in one run.

    python benchmarks/rerank.py                                  # MiniLM-L6 reranker shape, this CPU
    python benchmarks/rerank.py --shape bert-base --requests 400 --concurrency 16,64

A random-weight cross-encoder of a real shape (ms-marco-MiniLM-L-6-v2's, or BERT-base's), with a
word-level tokenizer that frames pairs as BERT's does ([CLS] query [SEP] document [SEP], token
types 0 then 1), so that both sides get text. Each request is one query (8-16 words) and 32
documents of 16-256 words, one token each. The reference is `CrossEncoder.predict` over every
pair, sorted by length, at its best batch size, timed before and after the server (the mean of
the two passes). The server is driven by concurrent clients on /v1/rerank. Prints pairs/s,
pair-tokens/s and the ratio, p50/p99, and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.serve import drive, machine_description, resolve_device
from benchmarks.shapes import SHAPES

SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102}
DOCUMENTS_PER_REQUEST = 32


def build_reranker(shape: str, dest: Path, device: str) -> Path:
    """A random-weight BertForSequenceClassification (one label) of the shape, with its tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    if (dest / "model.safetensors").exists():
        return dest
    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("pooling", "architectures", "model_type")}
    config = BertConfig(**spec, num_labels=1, architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    with torch.device(device):
        model = BertForSequenceClassification(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    _save_pair_tokenizer(dest, config.vocab_size)
    return dest


def _save_pair_tokenizer(dest: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {f"t{i}": i for i in range(vocab_size)} | SPECIAL
    vocab = {word: index for word, index in vocab.items() if word in SPECIAL or index not in SPECIAL.values()}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 101), ("[SEP]", 102)],
    )
    tokenizer.save(str(dest / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 512,
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config))


def workload(requests: int, vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(f"t{rng.randrange(1000, vocab)}" for _ in range(rng.randint(low, high)))

    return [
        {
            "query": text(8, 16),
            "documents": [text(16, 256) for _ in range(DOCUMENTS_PER_REQUEST)],
            "return_documents": False,
        }
        for _ in range(requests)
    ]


def time_reference(model_dir: Path, pairs: list[tuple[str, str]], device: str, dtype: str, sizes: list[int]):
    """Seconds of CrossEncoder.predict over the pairs, longest first, at the best batch size."""
    import torch
    from sentence_transformers import CrossEncoder

    kwargs = {"torch_dtype": getattr(torch, dtype)} if device != "cpu" else {}
    model = CrossEncoder(str(model_dir), device=device, model_kwargs=kwargs)
    ordered = sorted(pairs, key=lambda pair: -len(pair[0]) - len(pair[1]))
    model.predict(ordered[:64], batch_size=32)  # warm up
    best: tuple[float, int] | None = None
    for size in sizes:
        started = time.perf_counter()
        model.predict(ordered, batch_size=size, show_progress_bar=False)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        best = (elapsed, size) if best is None or elapsed < best[0] else best
        print(f"  CrossEncoder.predict, batch {size}: {len(pairs) / elapsed:,.0f} pairs/s", flush=True)
    assert best is not None
    return best, model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="minilm-l6", choices=["minilm-l6", "bert-base"])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", default="4,16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="default: float32 on a CPU, bfloat16 on a GPU")
    parser.add_argument(
        "--batch-sizes", default=None, help="CrossEncoder batch sizes (default 32; GPU 32,128)"
    )
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "toolkit-bench"))
    parser.add_argument("--server-args", default="", help="extra server flags, e.g. '--http-workers 4'")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    sizes = [int(s) for s in (args.batch_sizes or ("32" if device == "cpu" else "32,128")).split(",")]
    model_dir = build_reranker(args.shape, Path(args.cache_dir) / f"reranker-{args.shape}", device)
    payloads = workload(args.requests, SHAPES[args.shape]["vocab_size"])
    pairs = [(p["query"], doc) for p in payloads for doc in p["documents"]]
    tokens = sum(len(query.split()) + len(doc.split()) + 3 for query, doc in pairs)
    machine = machine_description(device)
    print(f"machine: {machine}\nreranker shape: {args.shape} ({dtype})")
    print(f"workload: {len(payloads)} requests, {len(pairs)} pairs, {tokens} pair tokens", flush=True)
    (first, size), model = time_reference(model_dir, pairs, device, dtype, sizes)
    del model
    clients = [int(c) for c in args.concurrency.split(",")]
    runs = serve(model_dir, payloads, device, dtype, clients, args.server_args)
    (second, _), _ = time_reference(model_dir, pairs, device, dtype, [size])
    reference_s = (first + second) / 2
    print(f"\n{args.shape} reranker on {machine}; {len(pairs)} pairs, {tokens} pair tokens")
    print(
        f"  CrossEncoder.predict (batch {size}): {len(pairs) / reference_s:10,.0f} pairs/s "
        f"{tokens / reference_s:12,.0f} pair-tok/s"
    )
    for run in runs:
        elapsed = run["elapsed_s"]
        print(
            f"  server, {run['concurrency']:3d} clients:     {len(pairs) / elapsed:10,.0f} pairs/s "
            f"{tokens / elapsed:12,.0f} pair-tok/s {reference_s / elapsed:5.2f}x  "
            f"p50 {run['p50_ms']:.0f} ms  p99 {run['p99_ms']:.0f} ms  failures {run['failures']}"
        )
    if args.out:
        results = {
            "machine": machine,
            "shape": args.shape,
            "dtype": dtype,
            "pairs": len(pairs),
            "tokens": tokens,
            "reference_s": [first, second],
            "reference_batch": size,
            "runs": runs,
        }
        Path(args.out).write_text(json.dumps(results, indent=2))


def serve(
    model_dir: Path, payloads: list[dict[str, Any]], device: str, dtype: str, clients: list[int], extra: str
):
    from toolkit.utils import launch_server_cmd, terminate_process, wait_for_server

    command = (
        f"python3 -m toolkit.launch_server --model-path {model_dir} --device {device} --dtype {dtype} {extra}"
    )
    process, port = launch_server_cmd(command + " --log-level warning", host="127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, timeout=600, process=process)
        asyncio.run(drive(url, payloads[:8], 4, path="/v1/rerank"))  # warm up
        runs = []
        for concurrency in clients:
            run = asyncio.run(drive(url, payloads, concurrency, path="/v1/rerank"))
            runs.append(run | {"concurrency": concurrency})
            print(f"  server, {concurrency} clients: {run['elapsed_s']:.2f} s", flush=True)
        return runs
    finally:
        terminate_process(process)


if __name__ == "__main__":
    main()

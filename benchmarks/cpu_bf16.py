"""bfloat16 on a CPU: the in-process Engine against sentence-transformers, each in float32 and in
bfloat16, on the same texts in one run, with the fidelity of each bfloat16 against float32.

    python benchmarks/cpu_bf16.py                                   # the bundled MiniLM
    python benchmarks/cpu_bf16.py --shape bert-base --tokenizer .bench/tokenizers/minilm

CPUs with AMX (Sapphire Rapids and later Xeons) or AVX512-BF16 run bfloat16 products several times
faster than float32; the machine line prints which of those flags this CPU has.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.corpus import corpus
from benchmarks.serve import machine_description


def cpu_flags() -> str:
    flags = (
        Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0]
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    wanted = [
        flag for flag in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2") if f" {flag}" in flags
    ]
    return " ".join(wanted) or "unknown"


def time_st(model_dir: Path, texts: list[str], dtype: Any) -> tuple[float, Any]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", model_kwargs={"dtype": dtype})
    model.encode(texts[:64], batch_size=32)
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=32, convert_to_tensor=True)
    return time.perf_counter() - started, vectors.float()


def time_engine(model_dir: Path, texts: list[str], dtype: str) -> tuple[float, Any]:
    import torch

    from toolkit import Engine

    with Engine(str(model_dir), device="cpu", dtype=dtype) as engine:
        engine.encode(texts[:256])
        started = time.perf_counter()
        vectors = engine.encode(texts)
        return time.perf_counter() - started, torch.from_numpy(vectors)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path")
    parser.add_argument("--shape", help="a benchmarks/shapes.py shape, with --tokenizer")
    parser.add_argument("--tokenizer", help="a folder holding tokenizer.json, for --shape")
    parser.add_argument("--num-texts", type=int, default=4000)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache/toolkit-bench"))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.shape:
        from benchmarks.text_vs_ids import model_with_tokenizer

        model_dir = model_with_tokenizer(args.shape, Path(args.tokenizer), Path(args.cache_dir), "cpu")
    elif args.model_path:
        model_dir = Path(args.model_path)
    else:
        from toolkit.service.model_source import bundled_model_dir

        model_dir = bundled_model_dir()
    texts = list(corpus(args.num_texts))
    print(f"machine: {machine_description('cpu')}; CPU flags: {cpu_flags()}", flush=True)
    print(f"model: {args.shape or model_dir}; {len(texts)} texts of 5-200 words", flush=True)
    runs: dict[str, tuple[float, Any]] = {}
    for name, run in (
        ("sentence-transformers float32", lambda: time_st(model_dir, texts, torch.float32)),
        ("sentence-transformers bfloat16", lambda: time_st(model_dir, texts, torch.bfloat16)),
        ("Engine float32", lambda: time_engine(model_dir, texts, "float32")),
        ("Engine bfloat16", lambda: time_engine(model_dir, texts, "bfloat16")),
    ):
        runs[name] = run()
        print(f"  {name:32s} {len(texts) / runs[name][0]:8,.0f} texts/s", flush=True)
    base, st16 = runs["sentence-transformers float32"][0], runs["sentence-transformers bfloat16"][0]
    results = {}
    for name, (seconds, vectors) in runs.items():
        reference = runs[("Engine" if name.startswith("Engine") else "sentence-transformers") + " float32"][1]
        cosine = torch.nn.functional.cosine_similarity(vectors, reference, dim=-1).min().item()
        results[name] = {
            "texts_per_s": len(texts) / seconds,
            "vs_st_fp32": base / seconds,
            "vs_st_bf16": st16 / seconds,
            "min_cos_vs_fp32": cosine,
        }
        print(
            f"  {name:32s} {base / seconds:5.2f}x st fp32  {st16 / seconds:5.2f}x st bf16  "
            f"min cos vs fp32 {cosine:.6f}"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"machine": machine_description("cpu"), "flags": cpu_flags(), "runs": results}, indent=2
            )
        )


if __name__ == "__main__":
    main()

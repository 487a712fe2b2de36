"""Assemble a ready Engine from ServerArgs: find the model, read its files, load, warm up.

`prepare` does the quick checks that must fail before the server binds (a missing model is one
clear error line and a non-zero exit); `load` does the heavy part in the background.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.errors import ModelLoadError
from toolkit.model_source import resolve_model_dir
from toolkit.model_spec import EmbeddingSpec, read_embedding_spec
from toolkit.server_args import ServerArgs
from toolkit.tokenization import TextTokenizer

if TYPE_CHECKING:
    import torch

    from toolkit.device_threads import DeviceThreads
    from toolkit.engine import Engine
    from toolkit.models import LoadedModel
    from toolkit.runner import Runner

logger = logging.getLogger(__name__)

KERNEL_BUILD_DELAY_S = 1.0  # see `_build_short_batch_kernels`
KERNEL_BUILD_IDLE_POLL_S = 0.01


@dataclass(frozen=True)
class PreparedModel:
    model_dir: Path
    tokenizer_dir: Path
    spec: EmbeddingSpec
    tokenizer: TextTokenizer


def prepare(args: ServerArgs) -> PreparedModel:
    """Resolve the model and read its configuration and tokenizer; raises ModelLoadError."""
    model_dir = resolve_model_dir(args.model_path)
    if not (model_dir / "config.json").is_file() and not (model_dir / "modules.json").is_file():
        raise ModelLoadError(f"{model_dir} holds neither config.json nor modules.json")
    spec = read_embedding_spec(model_dir)
    if args.pooling is not None or args.normalize is not None:
        spec = _override(spec, args)
    tokenizer_dir = resolve_model_dir(args.tokenizer_path) if args.tokenizer_path else spec.transformer_dir
    tokenizer = TextTokenizer.from_dir(tokenizer_dir)
    return PreparedModel(model_dir, tokenizer_dir, spec, tokenizer)


def _override(spec: EmbeddingSpec, args: ServerArgs) -> EmbeddingSpec:
    modes = (args.pooling,) if args.pooling is not None else spec.pooling_modes
    normalize = spec.normalize if args.normalize is None else args.normalize
    return replace(spec, pooling_modes=modes, normalize=normalize)


def prepare_process_memory(args: ServerArgs) -> None:
    """On a CPU server, keep freed activations in the heap (`toolkit.heap`). Call on the main
    thread before the process starts any other thread (imports torch)."""
    from toolkit.runner import pick_device

    if pick_device(args.device).type == "cpu":
        from toolkit.heap import keep_freed_memory

        keep_freed_memory()


def load_engine(args: ServerArgs, prepared: PreparedModel) -> Engine:
    """Load weights onto the device and build the Engine (imports torch: server process only).

    The work runs on a thread that will serve batches (see `DeviceThreads`)."""
    from toolkit.device_threads import CORES, DeviceThreads
    from toolkit.runner import pick_device

    device = pick_device(args.device)
    device_threads = DeviceThreads(_cpu_workers(args, CORES) if device.type == "cpu" else 1)
    try:
        engine, module = device_threads.submit(
            _load_on_device_thread, args, prepared, device, device_threads
        ).result()
    except BaseException:
        device_threads.shutdown(wait=False)
        raise
    if args.warmup:
        _build_short_batch_kernels(module, device_threads)
    return engine


def _build_short_batch_kernels(module: torch.nn.Module, device_threads: DeviceThreads) -> None:
    """Where short CPU batches take packed oneDNN products, have oneDNN build their kernels for
    every short row count in the background: built on a request, they cost it 4-5 ms (MiniLM;
    `toolkit.models.short_batch_linear`), and all at start-up some 0.3-0.5 s. Building starts
    `KERNEL_BUILD_DELAY_S` after start-up (run at once, it took both cores from the first requests,
    and launch-to-first-embedding grew by 0.1-0.2 s), and goes one row count per job, only while
    every device thread is idle: on the first thread, at the thread count of a lone batch."""
    from toolkit.models.short_batch_linear import PACKED_MAX_ROWS, build_kernels, distinct_packed_layers

    layers = distinct_packed_layers(module)
    if not layers:
        return

    def build_all() -> None:
        time.sleep(KERNEL_BUILD_DELAY_S)
        started = time.perf_counter()
        for rows in range(1, PACKED_MAX_ROWS + 1):
            while not device_threads.idle:
                time.sleep(KERNEL_BUILD_IDLE_POLL_S)
            try:
                device_threads.submit(build_kernels, layers, rows).result()
            except Exception as exc:  # shutting down (jobs refused or cancelled), or a oneDNN error
                logger.debug("short-batch kernels built up to %d rows only: %r", rows - 1, exc)
                return
        logger.info("Short-batch kernels built in %.2f s.", time.perf_counter() - started)

    threading.Thread(target=build_all, name="kernel-builder", daemon=True).start()


def _cpu_workers(args: ServerArgs, cores: int) -> int:
    """--cpu-workers (at most one per core), else one per core on 2 cores: measured there (see
    toolkit.device_threads). Larger machines keep one worker on all cores: on 16 cores, 4
    workers served 1.24-1.33x the tokens at load, but a lone 400-512-token text took twice as
    long (48-51 against 23 ms), since an input that cannot be split runs on one worker's share."""
    if args.cpu_workers is not None:
        return min(args.cpu_workers, cores)
    return 2 if cores == 2 else 1


def _load_on_device_thread(
    args: ServerArgs, prepared: PreparedModel, device: torch.device, device_threads: DeviceThreads
) -> tuple[Engine, torch.nn.Module]:
    from toolkit.batcher import Batcher
    from toolkit.engine import Engine, EngineLimits
    from toolkit.models import load_model
    from toolkit.runner import Runner, RunnerStats, pick_dtype

    dtype = pick_dtype(args.dtype, device)
    started = time.perf_counter()
    model = load_model(prepared.spec.transformer_dir, device, dtype)
    logger.info(
        "Load weight end. implementation=%s, type=%s, dtype=%s, device=%s, %.2f s",
        model.implementation,
        type(model.module).__name__,
        dtype,
        device,
        time.perf_counter() - started,
    )
    spec = prepared.spec
    compile_blocks = getattr(model.module, "compile_blocks", None)
    compiled = False
    if _compile_wanted(args, device, model) and compile_blocks is not None:
        compile_blocks()
        compiled = True
    runner = Runner(model, device, spec.pooling_modes, spec.normalize, device_threads)
    context_length = _context_length(args, spec, model.max_input_tokens)
    if args.warmup:
        _warm_up(runner, prepared.tokenizer, context_length, compiled)
        runner.stats = RunnerStats()  # count serving only
    if device.type == "cuda" and args.cuda_graphs:
        sample = (prepared.tokenizer.encode(["warm up"])[0] * 256)[:256]
        runner.capture_graphs(sample, context_length)
    limits = EngineLimits(
        context_length=context_length,
        vocab_size=_vocab_rows(model.module, prepared.tokenizer),
        max_inputs_per_request=args.max_inputs_per_request,
        truncate=args.truncate,
        truncation_side=args.truncation_side,
        default_prompt_name=args.default_prompt_name or spec.default_prompt_name,
        max_tokens_per_request=args.max_tokens_per_request,
    )
    batch_tokens = args.max_batch_tokens or (32768 if device.type == "cuda" else 8192)
    batcher = Batcher(runner, batch_tokens, args.max_queued_tokens, args.max_queued_inputs)
    dim = model.hidden_size * len(spec.pooling_modes)
    return Engine(batcher, prepared.tokenizer, spec, limits, dim), model.module


def _compile_wanted(args: ServerArgs, device: torch.device, model: LoadedModel) -> bool:
    """--compile / --no-compile when given; else on CUDA where the model gains from it (for an
    encoder, only together with CUDA graphs)."""
    if args.compile is not None:
        return args.compile
    if device.type != "cuda" or not model.compile_pays_off:
        return False
    return args.cuda_graphs or not model.compile_needs_graphs


def _warm_up(runner: Runner, tokenizer: TextTokenizer, context_length: int, compiled: bool) -> None:
    """Run a short input, so the first client does not pay for lazy initialisation.

    With torch.compile, also the shapes that compile separately (one token; several
    sequences), so compiling happens here and not on a client's request.
    """
    from toolkit.runner import WorkItem

    started = time.perf_counter()
    short = tokenizer.encode(["warm up"])[0]
    runner.run([WorkItem(short)])
    if compiled:
        runner.run([WorkItem(short[:1])])
        runner.run([WorkItem((short * context_length)[:n]) for n in (2, 17, min(200, context_length))])
    logger.info("Warm-up done in %.2f s.", time.perf_counter() - started)


def _context_length(args: ServerArgs, spec: EmbeddingSpec, model_limit: int) -> int:
    wanted = args.context_length or spec.max_seq_length or model_limit
    if wanted > model_limit:
        logger.warning(
            "context length %d exceeds the model's %d positions: using %d",
            wanted,
            model_limit,
            model_limit,
        )
    return min(wanted, model_limit)


def _vocab_rows(module: object, tokenizer: TextTokenizer) -> int:
    """Valid token ids: rows of the input embedding, which may exceed the tokenizer's vocabulary."""
    get = getattr(module, "get_input_embeddings", None)
    embedding = get() if callable(get) else getattr(module, "tok_embeddings", None)
    rows = getattr(embedding, "num_embeddings", None)
    return int(rows) if rows else tokenizer.vocab_size

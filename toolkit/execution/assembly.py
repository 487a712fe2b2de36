"""The composition root of the device side: load a model onto its device threads, warm it up, and
put an `InferenceService` over a `Batcher` over a `Runner` on it.

`toolkit.service.model_files.read_model_files` has already found the model and read its spec and
tokenizer; this is the heavy part, run in the background once the server has bound its socket.
"""

from __future__ import annotations

import logging
import time

import torch

from toolkit.execution.cpu_policy import default_workers
from toolkit.execution.dense import load_vector_modules
from toolkit.execution.device import pick_device, pick_dtype
from toolkit.execution.device_threads import CORES, DeviceThreads
from toolkit.execution.kernel_builder import build_short_batch_kernels
from toolkit.execution.memory import trim_when_idle
from toolkit.execution.runner import Runner, RunnerStats
from toolkit.models.base import LoadedModel
from toolkit.models.encoder import keep_gelu_exact
from toolkit.models.fp8 import check_fp8_device, quantize_fp8
from toolkit.models.loader import Head, load_model
from toolkit.scheduling.batcher import Batcher
from toolkit.scheduling.work import WorkItem
from toolkit.server_args import ServerArgs
from toolkit.service.inference import InferenceService
from toolkit.service.model_files import ModelFiles
from toolkit.service.model_spec import EmbeddingSpec
from toolkit.service.tokenization import TextTokenizer

logger = logging.getLogger(__name__)

# A sparse model's batch holds a float32 row as wide as the vocabulary per input, on the device
# and in pinned host memory: its inputs per batch are capped to keep those rows within this.
SPARSE_BATCH_BYTES = 256 * 2**20


def load_service(args: ServerArgs, files: ModelFiles) -> InferenceService:
    """Load weights onto the device and build the service over them, not started yet.

    The work runs on a thread that will serve batches (see `DeviceThreads`)."""
    device = pick_device(args.device)
    device_threads = DeviceThreads(default_workers(args.cpu_workers, CORES) if device.type == "cpu" else 1)
    try:
        service, module = device_threads.submit(
            _load_on_device_thread, args, files, device, device_threads
        ).result()
    except BaseException:
        device_threads.shutdown(wait=False)
        raise
    if args.warmup:
        build_short_batch_kernels(module, device_threads)
    if device.type == "cpu":
        trim_when_idle(device_threads.idle_since)
    return service


def _load_on_device_thread(
    args: ServerArgs, files: ModelFiles, device: torch.device, device_threads: DeviceThreads
) -> tuple[InferenceService, torch.nn.Module]:
    dtype = pick_dtype(args.dtype, device)
    if args.quantization == "fp8":
        check_fp8_device(device, dtype)  # before the weights: a refusal costs no load
    started = time.perf_counter()
    model = load_model(files.spec.transformer_dir, device, dtype, _head(files.spec))
    logger.info(
        "Loaded the weights in %.2f s: %s (%s) in %s on %s.",
        time.perf_counter() - started,
        type(model.module).__name__,
        "packed forward" if model.implementation == "native" else "transformers, padded",
        str(dtype).removeprefix("torch."),
        device,
    )
    spec = files.spec
    if args.quantization == "fp8":
        logger.info("FP8: %d linear layers take float8 weights and activations.", quantize_fp8(model.module))
    if args.exact_gelu:
        logger.info("Exact GELU: %d encoder layers run it on its own.", keep_gelu_exact(model.module))
    compile_blocks = getattr(model.module, "compile_blocks", None)
    compiled = False
    if _compile_wanted(args, device, model, spec) and compile_blocks is not None:
        compile_blocks()
        compiled = True
    vector_modules = load_vector_modules(spec.vector_modules, device)
    runner = Runner(model, device, spec.pooling_modes, spec.normalize, device_threads, vector_modules)
    context_length = _context_length(args, spec, model.max_input_tokens)
    if args.warmup:
        _warm_up(runner, files.tokenizer, context_length, compiled)
        runner.stats = RunnerStats()  # count serving only
    # BERT pairs carry token types, which the graphs do not hold: a cross-encoder runs eagerly;
    # so does SPLADE, whose vocabulary-wide outputs graphs would hold for every batch shape.
    if device.type == "cuda" and args.cuda_graphs and spec.task == "embed":
        sample = (files.tokenizer.encode(["warm up"])[0] * 256)[:256]
        runner.capture_graphs(sample, context_length)
    limits = args.request_limits(spec, context_length, _vocab_rows(model.module, files.tokenizer))
    default_tokens = 32768 if device.type == "cuda" else device_threads.plan.batch_tokens
    batch_tokens = args.max_batch_tokens or default_tokens
    rows = max(1, SPARSE_BATCH_BYTES // (4 * model.hidden_size)) if model.pools_itself else None
    batcher = Batcher(runner, batch_tokens, args.max_queued_tokens, args.max_queued_inputs, rows)
    dim = model.hidden_size * (1 if model.pools_itself else len(spec.pooling_modes))
    dim = spec.vector_modules[-1].out_features if spec.vector_modules else dim
    return InferenceService(batcher, files.tokenizer, spec, limits, dim), model.module


def _head(spec: EmbeddingSpec) -> Head:
    """What reads the model's states, as the spec says."""
    sparse, prompted = spec.sparse, spec.prompted
    tokens = () if prompted is None else (prompted.true_token, prompted.false_token)
    return Head(
        classifier=spec.is_cross_encoder,
        splade=(sparse.pooling, sparse.activation) if sparse is not None else None,
        scored_tokens=tuple(token for token in tokens if token is not None),
    )


def _compile_wanted(args: ServerArgs, device: torch.device, model: LoadedModel, spec: EmbeddingSpec) -> bool:
    """--compile / --no-compile when given; else on CUDA where the model gains from it (for an
    encoder, only together with CUDA graphs)."""
    if args.compile is not None:
        return args.compile
    if device.type != "cuda" or not model.compile_pays_off:
        return False
    graphs = args.cuda_graphs and spec.task == "embed"
    return graphs or not model.compile_needs_graphs


def _warm_up(runner: Runner, tokenizer: TextTokenizer, context_length: int, compiled: bool) -> None:
    """Run a short input, so the first client does not pay for lazy initialisation.

    With torch.compile, also the shapes that compile separately (one token; several
    sequences), so compiling happens here and not on a client's request.
    """
    started = time.perf_counter()
    short = tokenizer.encode(["warm up"])[0]
    runner.run([WorkItem(short)])
    if compiled:
        runner.run([WorkItem(short[:1])])
        runner.run([WorkItem((short * context_length)[:n]) for n in (2, 17, min(200, context_length))])
    logger.debug("Warm-up done in %.2f s.", time.perf_counter() - started)


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

"""CUDA graphs over bucketed batch shapes: one graph launch instead of hundreds of kernel launches.

Serving BERT-sized models is bound by host time, not by the GPU: launching a 12-layer forward
costs the device thread about as long as the GPU takes to run it, and it shares the GIL with the
event loop. A lone short input is all launch overhead. So the whole embed step (forward, pooling,
normalization) is captured once per `GraphShape` and replayed.

A batch is padded up to its shape's bucket (`padded`, `write_padded`): the padding is a sequence
of its own, so no real row changes. Buckets are coarse where batches are small (powers of two)
and within 1/16 of the batch above 256 tokens.
A shape is captured the second time it is seen, so a one-off shape never pays for a capture;
lone inputs of up to 256 tokens are captured at start-up. All graphs share one memory pool: one
thread replays them one after another on one stream, and copies each output out before the next.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from toolkit.execution.packing import pack
from toolkit.models.packed_batch import PackedBatch, buffer_layout

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

logger = logging.getLogger(__name__)

# Graphs kept at once; the least recently replayed goes first. Under steady load a handful of
# shapes recur (full batches); the cap bounds capture work when traffic keeps changing shape.
# A graph's own memory is small (its buffers; activations live in the shared pool).
MAX_GRAPHS = 256
LONE_INPUT_TOKENS = 256  # lone inputs up to this length have their graphs captured at start-up
# Graphs pay off while launching a forward's kernels takes about as long as running them; past
# this many FLOPs of weight products per batch the GPU's time hides the next batch's launches,
# and a graph would only add padding and captures (docs/performance.md, "CUDA graphs").
MAX_GRAPH_BATCH_FLOPS = 30e12


@dataclass(frozen=True)
class GraphShape:
    tokens: int  # more than the batch's tokens: the rest form the padding sequence
    seqs: int  # more than the batch's sequences: empty ones, then the padding sequence
    max_seqlen: int

    @classmethod
    def fitting(cls, batch: PackedBatch) -> GraphShape:
        return cls(
            _token_bucket(batch.num_tokens), _power_of_two_above(batch.num_seqs), _seqlen_bucket(batch)
        )


def _power_of_two_above(n: int) -> int:
    return 1 << n.bit_length()


def _token_bucket(tokens: int) -> int:
    if tokens < LONE_INPUT_TOKENS:
        return max(16, _power_of_two_above(tokens))
    # 16 steps per doubling: at most 1/16 padding. Graphed batches are host-bound (see
    # MAX_GRAPH_BATCH_FLOPS), so padding costs GPU time they have to spare; finer steps made
    # so many shapes that captures took much of a benchmark.
    step = 1 << (tokens.bit_length() - 5)
    return (tokens // step + 1) * step


def _seqlen_bucket(batch: PackedBatch) -> int:
    return max(16, 1 << (batch.max_seqlen - 1).bit_length())


@dataclass
class GraphStats:
    captured: int = 0
    capture_s: float = 0.0  # device-thread time spent capturing
    replayed: int = 0


def graph_view(template: PackedBatch, buffer: torch.Tensor) -> PackedBatch:
    """The batch a graph is captured on: `template`'s shape over `buffer`, whose contents change
    at every replay. So it honours pool_starts (skips_tokens) whatever the batch, and has no host
    lengths (seqlens None). Flash attention computes only the first max_seqlen queries of each
    sequence; the padding sequence may be longer, and its remaining rows, never read by a real
    row, are left as they were."""
    return PackedBatch.from_buffer(
        buffer, template.num_seqs, template.max_seqlen, skips_tokens=True, seqlens=None
    )


def padded(batch: PackedBatch, tokens: int, seqs: int, max_seqlen: int) -> PackedBatch:
    """A host batch grown to `tokens` tokens and `seqs` sequences (see `write_padded`)."""
    if max_seqlen < batch.max_seqlen:
        raise ValueError(f"max_seqlen {max_seqlen} is below the batch's {batch.max_seqlen}")
    buffer = np.empty(sum(buffer_layout(tokens, seqs)), dtype=np.int32)
    write_padded(batch, buffer, tokens, seqs)
    assert batch.seqlens is not None
    seqlens = batch.seqlens + [0] * (seqs - batch.num_seqs - 1) + [tokens - batch.num_tokens]
    return PackedBatch.from_buffer(
        torch.from_numpy(buffer), seqs, max_seqlen, skips_tokens=batch.skips_tokens, seqlens=seqlens
    )


def write_padded(batch: PackedBatch, out: np.ndarray, tokens: int, seqs: int) -> None:
    """Write a host batch into `out` in the `host_buffer` layout, grown to exactly `tokens`
    tokens and `seqs` sequences: the shape a CUDA graph was captured at. The real sequences
    keep their rows; empty sequences follow, then one padding sequence holding the remaining
    tokens (at least one, so every sequence's first row exists). No row depends on another
    sequence's, so padding changes no real row; its own rows are garbage nobody reads.

    numpy only: the device thread runs this for every batch, and each torch call there hands
    the GIL to the busy event loop and waits to get it back."""
    real_tokens, real_seqs = batch.num_tokens, batch.num_seqs
    if tokens <= real_tokens or seqs <= real_seqs:
        raise ValueError(f"cannot pad {real_tokens} tokens, {real_seqs} sequences to a smaller shape")
    ids, positions, seq_ids, cu, starts = np.split(out, np.cumsum(buffer_layout(tokens, seqs)[:-1]))
    # Padding tokens are token 0 at position 0: valid for every embedding table.
    ids[:real_tokens], ids[real_tokens:] = batch.input_ids.numpy(), 0
    positions[:real_tokens], positions[real_tokens:] = batch.position_ids.numpy(), 0
    seq_ids[:real_tokens], seq_ids[real_tokens:] = batch.seq_ids.numpy(), seqs - 1
    cu[: real_seqs + 1], cu[real_seqs + 1 :] = batch.cu_seqlens.numpy(), real_tokens
    cu[-1] = tokens
    starts[:real_seqs], starts[real_seqs:] = batch.pool_starts.numpy(), 0


class _Graph:
    """One captured shape: a static input buffer on the device, the graph, and its output."""

    def __init__(self, shape: GraphShape, template: PackedBatch, device: torch.device) -> None:
        self.shape = shape
        self.template = template  # a padded host batch of this shape
        self.buffer = template.host_buffer().to(device)
        self.graph = torch.cuda.CUDAGraph()
        self.output: torch.Tensor | None = None

    def view(self) -> PackedBatch:
        """A fresh batch over the static buffer. Fresh, because a batch caches tensors derived
        from its fields (seq_index...): the captured graph must compute them itself."""
        return graph_view(self.template, self.buffer)

    def replay(self, batch: PackedBatch) -> torch.Tensor:
        """Three torch calls per batch: the padding is written by numpy into pinned memory (the
        host allocator keeps that block until the copy has run)."""
        assert self.output is not None
        staging = torch.empty(self.buffer.shape, dtype=torch.int32, pin_memory=True)
        write_padded(batch, staging.numpy(), self.shape.tokens, self.shape.seqs)
        self.buffer.copy_(staging, non_blocking=True)
        self.graph.replay()
        # Graphs share one memory pool: the next replay of any graph may overwrite this output,
        # so the caller copies it out (on this stream) before launching anything else.
        return self.output


class BatchGraphs:
    """The embed step's CUDA graphs, one per GraphShape, captured on demand."""

    def __init__(
        self, embed: Callable[[PackedBatch], torch.Tensor], device: torch.device, flops_per_token: float
    ) -> None:
        self.embed = embed
        self.device = device
        self.max_tokens = int(MAX_GRAPH_BATCH_FLOPS / flops_per_token)
        self.enabled = True
        self.stats = GraphStats()
        self._graphs: OrderedDict[GraphShape, _Graph] = OrderedDict()
        self._sightings: Counter[GraphShape] = Counter()
        self._pool: _POOL_HANDLE | None = None
        self._stream = torch.cuda.Stream(device)

    def capture_lone_inputs(self, sample_ids: list[int], max_tokens: int) -> None:
        """Capture the shapes of every lone input up to LONE_INPUT_TOKENS, so that the first
        short request is already fast."""
        for length in range(1, min(LONE_INPUT_TOKENS, max_tokens) + 1):
            batch = pack([(sample_ids * length)[:length] or [0] * length])
            shape = GraphShape.fitting(batch)
            if shape not in self._graphs and self.enabled:
                self._capture(shape, batch)

    def run(self, batch: PackedBatch) -> torch.Tensor | None:
        """Embeddings [B, D] of a host batch by graph replay, or None to run it without a graph."""
        if not self.enabled or batch.num_tokens > self.max_tokens:
            return None
        shape = GraphShape.fitting(batch)
        graph = self._graphs.get(shape)
        if graph is None:
            self._sightings[shape] += 1
            if self._sightings[shape] < 2:
                return None
            graph = self._capture(shape, batch)
            if graph is None:
                return None
        self._graphs.move_to_end(shape)
        self.stats.replayed += 1
        return graph.replay(batch)[: batch.num_seqs]

    @torch.inference_mode()
    def _capture(self, shape: GraphShape, batch: PackedBatch) -> _Graph | None:
        started = time.perf_counter()
        try:
            graph = _Graph(shape, padded(batch, shape.tokens, shape.seqs, shape.max_seqlen), self.device)
            # The first call (on the capture stream, like the capture) compiles what needs
            # compiling and settles the allocator; nothing of it may happen during capture.
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self.embed(graph.view())
                # thread_local: the finishing thread keeps synchronizing on earlier batches.
                graph.graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    graph.output = self.embed(graph.view())
                finally:
                    graph.graph.capture_end()
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        except torch.OutOfMemoryError:
            logger.warning("no memory for a CUDA graph of %s; batches this large run without one", shape)
            self.max_tokens = min(self.max_tokens, batch.num_tokens - 1)
            torch.cuda.empty_cache()
            return None
        except Exception:
            logger.warning("CUDA graph capture failed; serving without graphs", exc_info=True)
            self.enabled = False
            self._graphs.clear()
            return None
        self._pool = graph.graph.pool()
        self._graphs[shape] = graph
        self.stats.captured += 1
        self.stats.capture_s += time.perf_counter() - started
        if len(self._graphs) > MAX_GRAPHS:
            evicted, _ = self._graphs.popitem(last=False)
            self._sightings[evicted] = 0  # captured again only if it comes twice more
        return graph

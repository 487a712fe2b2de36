"""CUDA graphs for one short input: its latency is all kernel-launch overhead otherwise.

A lone short request launches a few hundred small kernels (28 layers of gte-Qwen2 took about
23 ms of host time on an H100 machine for 8 tokens), while the GPU work is well under a
millisecond. The whole embed step (forward, pooling, normalization) is captured once per token
bucket and replayed. The input is padded to the bucket as a second sequence of its own, so it
never attends to the padding and pooling reads only its own row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from toolkit.packing import PackedBatch, pack

logger = logging.getLogger(__name__)

BUCKETS = (16, 32, 64, 128, 256)


class _Graph:
    """One captured bucket: a static input buffer, the graph, and its output."""

    def __init__(self, bucket: int, device: torch.device) -> None:
        self.bucket = bucket
        # Layout as PackedBatch.to stages it: ids, positions, seq_ids (bucket each), cu (3), starts (2).
        self.staged = torch.zeros(3 * bucket + 5, dtype=torch.int32, device=device)
        self.graph = torch.cuda.CUDAGraph()
        self.output: torch.Tensor | None = None

    def view(self) -> PackedBatch:
        """A fresh batch over the static buffer. Fresh, because a batch caches tensors derived
        from its fields (seq_index...): the captured graph must compute them itself."""
        bucket = self.bucket
        ids, positions, seq_ids, cu, starts = self.staged.split([bucket, bucket, bucket, 3, 2])
        # skips_tokens=True: pooling honours pool_starts, which are 0 when there is no prompt.
        return PackedBatch(ids, positions, seq_ids, cu, starts, bucket, [1, bucket - 1], skips_tokens=True)

    def fill(self, batch: PackedBatch) -> None:
        """Copy a one-input batch into the static buffer (its tail becomes a padding sequence)."""
        length, bucket = batch.num_tokens, self.bucket
        host = np.zeros(3 * bucket + 5, dtype=np.int32)
        host[:length] = batch.input_ids.numpy()
        host[bucket : bucket + length] = np.arange(length)
        host[bucket + length : 2 * bucket] = np.arange(bucket - length)
        host[2 * bucket + length : 3 * bucket] = 1
        host[3 * bucket : 3 * bucket + 3] = (0, length, bucket)
        host[3 * bucket + 3] = int(batch.pool_starts[0])
        self.staged.copy_(torch.from_numpy(host).pin_memory(), non_blocking=True)


class SingleInputGraphs:
    def __init__(self, embed: Callable[[PackedBatch], torch.Tensor], device: torch.device) -> None:
        self.embed = embed
        self.device = device
        self.graphs: list[_Graph] = []

    def capture(self, sample_ids: list[int], max_tokens: int) -> None:
        """Capture every bucket that fits the model; on any failure serve without graphs."""
        pool = None
        try:
            for bucket in (b for b in BUCKETS if b <= max_tokens):
                graph = _Graph(bucket, self.device)
                graph.fill(pack([sample_ids[: bucket // 2] or [0]]))
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.inference_mode():
                    for _ in range(2):  # compile and settle allocations outside the capture
                        self.embed(graph.view())
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(graph.graph, pool=pool), torch.inference_mode():
                    graph.output = self.embed(graph.view())
                pool = graph.graph.pool()
                self.graphs.append(graph)
        except Exception:
            logger.warning("CUDA graph capture failed; serving without graphs", exc_info=True)
            self.graphs = []

    def run(self, batch: PackedBatch) -> torch.Tensor | None:
        """Embeddings [1, D] of a one-input batch by graph replay, or None when no bucket fits."""
        if batch.num_seqs != 1:
            return None
        graph = next((g for g in self.graphs if g.bucket > batch.num_tokens), None)
        if graph is None or graph.output is None:
            return None
        graph.fill(batch)
        graph.graph.replay()
        return graph.output[:1]

"""Embed a Ray Dataset: `EmbedBatches` is the callable class `Dataset.map_batches` runs in each
actor, over one `toolkit.Engine`; `embed_dataset` is that call with the usual arguments.

Ray schedules the actors, feeds them blocks and shows its own progress; each actor's engine
batches its blocks by tokens as the server does. On a CPU each actor gets the cores Ray gives it
(`num_cpus`, which Ray passes on as OMP_NUM_THREADS).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.data

from toolkit.process.embedded import Engine

BATCH_SIZE = 256  # rows per map_batches call: a few engine chunks, small blocks of output


class EmbedBatches:
    """`ds.map_batches(EmbedBatches, fn_constructor_kwargs={...}, compute=ActorPoolStrategy(size=2))`:
    adds `output_column`, the embeddings (float32, one row per text) of `text_column`."""

    def __init__(
        self,
        model_path: str | None = None,
        text_column: str = "text",
        output_column: str = "embedding",
        encode_options: dict[str, Any] | None = None,
        **engine_options: Any,
    ) -> None:
        self.text_column = text_column
        self.output_column = output_column
        self.encode_options = encode_options or {}
        self.engine = Engine(model_path, **engine_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.text_column not in batch:
            raise KeyError(f"the dataset has no column {self.text_column!r}; it has {sorted(batch)}")
        texts = [str(text) for text in batch[self.text_column]]
        batch[self.output_column] = self.engine.encode(texts, **self.encode_options)
        return batch


def embed_dataset(
    ds: ray.data.Dataset,
    model_path: str | None = None,
    *,
    text_column: str = "text",
    output_column: str = "embedding",
    concurrency: int = 1,
    num_cpus: float | None = None,
    num_gpus: float = 0,
    batch_size: int = BATCH_SIZE,
    encode_options: dict[str, Any] | None = None,
    **engine_options: Any,
) -> ray.data.Dataset:
    """`ds` with `output_column` added, embedded by `concurrency` actors (lazily, as Ray does).

    `num_gpus=1` puts each actor on a GPU of its own; `encode_options` go to `Engine.encode`
    (`prompt_name`, `dimensions`, `normalize`, `truncate`), `engine_options` to `Engine`."""
    resources: dict[str, Any] = {"num_gpus": num_gpus}
    if num_cpus is not None:
        resources["num_cpus"] = num_cpus
    return ds.map_batches(
        EmbedBatches,
        fn_constructor_kwargs={
            "model_path": model_path,
            "text_column": text_column,
            "output_column": output_column,
            "encode_options": encode_options,
            **engine_options,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        **resources,
    )

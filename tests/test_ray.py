"""toolkit.ray on a local Ray of two CPUs: a dataset embedded by two actors is the in-process
engine's result row for row, and two Serve replicas answer the openai client through one killed."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import ray
import requests
from ray import serve

from tests.helpers.api_calls import assert_openai_error
from toolkit import Engine
from toolkit.ray.data import EmbedBatches, embed_dataset
from toolkit.ray.serve import embedding_app

pytestmark = pytest.mark.subprocess  # Ray starts its own processes

TEXTS = [
    f"Document {i} about {'cats' if i % 3 else 'the stock market'}, part {i * 7 % 13}." for i in range(2000)
]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    with Engine(device="cpu") as engine:
        return engine.encode(TEXTS)


def _assert_same_rows(ours: np.ndarray, want: np.ndarray) -> None:
    cos = (ours * want).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(want, axis=-1)
    assert ours.shape == want.shape and cos.min() >= 0.999999 and np.abs(ours - want).max() <= 1e-6


def test_two_actors_embed_a_parquet_dataset_as_one_process_does(
    local_ray: None, reference: np.ndarray, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": range(len(TEXTS)), "text": TEXTS}), tmp_path / "corpus.parquet")
    ds = ray.data.read_parquet(str(tmp_path / "corpus.parquet")).repartition(8)  # a block per actor at least
    # Half a CPU each: two actors of one CPU would leave Ray's read and write tasks none.
    embed_dataset(ds, concurrency=2, num_cpus=0.5).write_parquet(str(tmp_path / "out"))

    table = pq.read_table(tmp_path / "out").sort_by("id")
    assert table.column("text").to_pylist() == TEXTS
    _assert_same_rows(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), reference)


def test_map_batches_takes_the_class_with_encode_options(local_ray: None, reference: np.ndarray) -> None:
    ds = ray.data.from_items([{"id": i, "body": text} for i, text in enumerate(TEXTS[:300])])
    out = ds.map_batches(
        EmbedBatches,
        fn_constructor_kwargs={
            "text_column": "body",
            "output_column": "v",
            "encode_options": {"dimensions": 64},
        },
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
        batch_size=128,
    )
    rows = sorted(out.take_all(), key=lambda row: row["id"])
    cut = reference[:300, :64] / np.linalg.norm(reference[:300, :64], axis=-1, keepdims=True)
    _assert_same_rows(np.stack([row["v"] for row in rows]), cut)


def test_a_missing_text_column_is_named(local_ray: None) -> None:
    ds = ray.data.from_items([{"body": "a"}])
    with pytest.raises(Exception, match=r"no column 'text'.*body"):
        embed_dataset(ds, num_cpus=1).take_all()


def test_wrong_option_names_fail_before_any_replica_starts() -> None:
    with pytest.raises(TypeError, match="unknown embedding_app options \\['max_batch'\\]"):
        embedding_app(max_batch=10)


@pytest.fixture(scope="module")
def served(local_ray: None) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        embedding_app(num_replicas=2, ray_actor_options={"num_cpus": 1}), name="embeddings", route_prefix="/"
    )
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _replicas() -> list[dict[str, Any]]:
    return [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if "toolkit-embeddings" in actor["name"]
    ]


def test_two_replicas_answer_the_openai_client_as_the_engine_does(served: str, reference: np.ndarray) -> None:
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused")
    answer = client.embeddings.create(model=MODEL, input=TEXTS[:40])
    _assert_same_rows(np.array([row.embedding for row in answer.data]), reference[:40])
    assert answer.usage.prompt_tokens > 0 and len(_replicas()) == 2


def test_errors_keep_the_openai_shape_through_ray(served: str) -> None:
    assert_openai_error(
        requests.post(f"{served}/v1/embeddings", json={"model": MODEL, "input": []}), 400, "input"
    )
    assert_openai_error(
        requests.post(f"{served}/v1/embeddings", json={"model": "other", "input": "a"}), 404, "model"
    )
    assert requests.get(f"{served}/health").status_code == 200
    assert "toolkit_requests_total" in requests.get(f"{served}/metrics").text


def test_the_app_serves_on_when_a_replica_is_killed(served: str, reference: np.ndarray) -> None:
    victim = _replicas()[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=3)
    for i in range(30):
        answer = client.embeddings.create(model=MODEL, input=[TEXTS[i]])
        _assert_same_rows(np.array([answer.data[0].embedding]), reference[i : i + 1])

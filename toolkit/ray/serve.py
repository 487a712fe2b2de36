"""Serve the embedding server's own HTTP app as Ray Serve replicas: `embedding_app(...)` is an
application for `serve.run`, each replica a model and the routes, errors, limits and metrics of
`toolkit.api`; Ray's proxy spreads the requests over the replicas and restarts a dead one.

A replica loads its model before it takes traffic and reports itself unhealthy once its inference
worker has died or stalled, so that Ray replaces it. Options are the server's flags by their
ServerArgs names; `host`/`allowed_hosts` say which Host names the app answers to, as for the
server (loopback names by default, as Ray's proxy listens on 127.0.0.1 unless told otherwise).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from toolkit.api.app import create_app
from toolkit.api.state import ServerState
from toolkit.execution.assembly import load_service
from toolkit.process.gguf import prepare_gguf
from toolkit.server_args import ServerArgs
from toolkit.service.inference import InferenceService

# Ray's default of 5 requests per replica would starve the token-budget batcher, which packs
# concurrent requests; the server's own queue limits answer 429 past its bounds.
MAX_ONGOING_REQUESTS = 512


class _Replica:
    async def __init__(self, model_path: str | None, options: dict[str, Any]) -> None:
        self.args = ServerArgs.from_options("embedding_app", model_path=model_path, **options)
        await asyncio.to_thread(prepare_gguf, model_path)
        files = self.args.model_files()
        self.state = ServerState(
            args=self.args, model_path=str(files.model_dir), tokenizer_path=str(files.tokenizer_dir)
        )
        self._service: InferenceService = await asyncio.to_thread(load_service, self.args, files)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.state, lambda: self._service)

    async def check_health(self) -> None:
        """Raise once the inference worker has died or stalled: Ray then replaces this replica."""
        if self.state.service is not None:  # set by the app's start-up, right after this replica's
            self.state.ready_service()


EmbeddingReplica = serve.deployment(name="toolkit-embeddings", max_ongoing_requests=MAX_ONGOING_REQUESTS)(
    serve.ingress()(_Replica)
)


def embedding_app(
    model_path: str | None = None,
    *,
    num_replicas: int | str | None = None,
    autoscaling_config: dict[str, Any] | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    **options: Any,
) -> Application:
    """The OpenAI-compatible embedding routes over `num_replicas` replicas (or Ray's
    `autoscaling_config`), each an actor with `ray_actor_options` (`{"num_gpus": 1}` for a GPU
    each): `serve.run(embedding_app(model_path, num_replicas=2), route_prefix="/")`."""
    ServerArgs.from_options(
        "embedding_app", model_path=model_path, **options
    )  # wrong names fail here, not in a replica
    deployment_options: dict[str, Any] = {
        "num_replicas": num_replicas,
        "autoscaling_config": autoscaling_config,
        "ray_actor_options": ray_actor_options,
    }
    chosen = {name: value for name, value in deployment_options.items() if value is not None}
    return EmbeddingReplica.options(**chosen).bind(model_path, options)

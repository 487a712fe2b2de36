"""What the HTTP app knows of the server: its arguments, admission, metrics and the service, which
loads in the background once the socket is bound."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from toolkit.api.drain import Admission
from toolkit.api.metrics import Metrics
from toolkit.errors import ModelLoadError, ServiceUnavailableError
from toolkit.server_args import ServerArgs
from toolkit.service.inference import InferenceService

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ServerState:
    args: ServerArgs
    model_path: str
    tokenizer_path: str
    service: InferenceService | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    admission: Admission = field(default_factory=Admission)
    metrics: Metrics = field(default_factory=Metrics)

    def ready_service(self) -> InferenceService:
        if self.service is None:
            raise ServiceUnavailableError("the model is still loading; retry shortly")
        if not self.service.alive:
            raise ServiceUnavailableError("the inference worker has stopped; restart the server")
        if self.service.stalled:
            raise ServiceUnavailableError("the inference worker is not making progress")
        return self.service

    def watch_gauges(self) -> None:
        """Feed the scrape-time gauges from the live state."""

        def queued(attribute: str) -> Callable[[], float]:
            return lambda: getattr(self.service, attribute) if self.service is not None else 0

        def ready() -> float:
            service = self.service
            working = service is not None and service.alive and not service.stalled
            return float(working and not self.admission.draining)

        self.metrics.watch(
            queue_inputs=queued("queued_inputs"),
            queue_tokens=queued("queued_tokens"),
            in_flight=lambda: self.admission.in_flight,
            ready=ready,
            engines=queued("engines_alive"),
        )


async def load_service(
    state: ServerState,
    load: Callable[[], InferenceService],
    on_fatal: Callable[[BaseException], None] | None,
) -> None:
    """Build the service in a daemon thread, start it on this loop, and make it the state's."""
    try:
        service = await _in_daemon_thread(load)
    except Exception as exc:
        if isinstance(exc, ModelLoadError):  # a known cause: one clear line
            logger.error("error: %s", exc)
        else:
            logger.exception("loading the model failed")
        if on_fatal is not None:
            on_fatal(exc)
        return
    service.start(on_batch=state.metrics.observe_batch)
    state.service = service
    logger.info(
        "Ready: %s, %d dimensions, up to %d tokens per input, at %s",
        state.args.model_name,
        service.embedding_dim,
        service.limits.context_length,
        state.args.url,
    )


async def _in_daemon_thread(work: Callable[[], T]) -> T:
    """`work()` on a daemon thread: unlike asyncio.to_thread's pool, one that a shutdown does not
    wait for. A server stopped while loading exits at once, and a front end stopped while it
    waits for its engine's HELLO is not held by the blocked read."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = work()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(_settle, answer, result, error)

    threading.Thread(target=run, name="load", daemon=True).start()
    return await answer


def _settle(answer: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if answer.done():  # the waiting task was cancelled
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(result)  # type: ignore[arg-type]  # no error: work() returned a T

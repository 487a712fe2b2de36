"""The server's Prometheus metrics, fed from each request's `RequestTiming` and each batch.

`Metrics` owns a private Prometheus registry (one per app, so several apps in one process do not
collide) and is fed once per request and once per batch: nothing on the hot path loops over tokens.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from toolkit.scheduling.timing import RequestTiming

EXPOSITION_CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets from half a millisecond (a cached tiny request on a GPU) to a minute (a full
# request of long inputs on a CPU).
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_POWERS_OF_TWO = tuple(float(2**i) for i in range(0, 18))  # 1 .. 131072


class Metrics:
    """The server's Prometheus metrics; `render()` is the body of GET /metrics."""

    def __init__(self) -> None:
        # The `_created` timestamp series double the page for nothing a dashboard uses; the
        # switch is process-wide, and this process is the server.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self._add_request_metrics(self.registry)
        self._add_batch_metrics(self.registry)
        self._add_gauges(self.registry)

    def _add_request_metrics(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "toolkit_requests",
            "HTTP requests answered, by route and status (499: the client went away first).",
            ("route", "status"),
            registry=registry,
        )
        self.request_seconds = Histogram(
            "toolkit_request_duration_seconds",
            "Time from receiving a request to starting its answer, by route.",
            ("route",),
            buckets=_SECONDS,
            registry=registry,
        )
        self.stage_seconds = {
            "tokenize": Histogram(
                "toolkit_tokenization_seconds",
                "Validation and tokenization time of successful embedding requests.",
                buckets=_SECONDS,
                registry=registry,
            ),
            "queue": Histogram(
                "toolkit_queue_wait_seconds",
                "Time from admission to the first input of a request entering a batch.",
                buckets=_SECONDS,
                registry=registry,
            ),
            "inference": Histogram(
                "toolkit_inference_seconds",
                "Time from the first input of a request entering a batch to its last embedding.",
                buckets=_SECONDS,
                registry=registry,
            ),
        }
        self.inputs = Counter("toolkit_embedded_inputs", "Inputs embedded.", registry=registry)
        self.tokens = Counter(
            "toolkit_prompt_tokens", "Tokens embedded (usage.prompt_tokens).", registry=registry
        )

    def _add_batch_metrics(self, registry: CollectorRegistry) -> None:
        self.batch_inputs = Histogram(
            "toolkit_batch_inputs", "Inputs per batch.", buckets=_POWERS_OF_TWO, registry=registry
        )
        self.batch_tokens = Histogram(
            "toolkit_batch_tokens", "Tokens per batch.", buckets=_POWERS_OF_TWO, registry=registry
        )
        self.batch_seconds = Histogram(
            "toolkit_batch_seconds",
            "Time from handing a batch to the device thread to having its results.",
            buckets=_SECONDS,
            registry=registry,
        )

    def _add_gauges(self, registry: CollectorRegistry) -> None:
        self.queue_inputs = Gauge("toolkit_queue_inputs", "Inputs waiting for a batch.", registry=registry)
        self.queue_tokens = Gauge("toolkit_queue_tokens", "Tokens waiting for a batch.", registry=registry)
        self.in_flight = Gauge(
            "toolkit_requests_in_flight",
            "Embedding requests admitted and not answered yet.",
            registry=registry,
        )
        self.engines = Gauge(
            "toolkit_engines_alive",
            "Engine processes taking work (1 for a server without --dp-size, 0 once it has failed).",
            registry=registry,
        )
        self.ready = Gauge(
            "toolkit_ready", "1 when the server embeds, 0 while loading or draining.", registry=registry
        )

    def watch(
        self,
        queue_inputs: Callable[[], float],
        queue_tokens: Callable[[], float],
        in_flight: Callable[[], float],
        ready: Callable[[], float],
        engines: Callable[[], float],
    ) -> None:
        """Gauges read at scrape time: nothing is counted on the hot path for them."""
        self.engines.set_function(engines)
        self.queue_inputs.set_function(queue_inputs)
        self.queue_tokens.set_function(queue_tokens)
        self.in_flight.set_function(in_flight)
        self.ready.set_function(ready)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_embedding(self, timing: RequestTiming, inputs: int, tokens: int) -> None:
        """A successful embedding request: its stages and its size."""
        for stage, seconds in timing.stages().items():
            self.stage_seconds[stage].observe(seconds)
        self.inputs.inc(inputs)
        self.tokens.inc(tokens)

    def observe_batch(self, inputs: int, tokens: int, seconds: float) -> None:
        self.batch_inputs.observe(inputs)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

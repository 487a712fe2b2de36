"""One request's timeline: moments that the HTTP layer, the service and the batcher stamp as the
request passes through them. Plain data with no dependency, so the batcher can carry it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    """Moments (time.perf_counter) in one request's life; None until the request gets there.

    received: the HTTP layer saw the request; service_called: the body is parsed and the service
    starts validating and tokenizing; admitted: the batcher queued its inputs; batched: its first
    input was taken into a batch; done: all its embeddings are back.
    """

    received: float = field(default_factory=time.perf_counter)
    service_called: float | None = None
    admitted: float | None = None
    batched: float | None = None
    done: float | None = None

    def stages(self) -> dict[str, float]:
        """Seconds spent in each stage the request completed: tokenize, queue, inference."""
        marks = (("tokenize", self.service_called, self.admitted), ("queue", self.admitted, self.batched))
        spans = {name: end - start for name, start, end in marks if start is not None and end is not None}
        if self.batched is not None and self.done is not None:
            spans["inference"] = self.done - self.batched
        return spans

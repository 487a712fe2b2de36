"""Refuse a large body by its counts before it is parsed whole.

Parsing JSON into Python objects holds the GIL for the whole body: a million nulls stall the
event loop and the device threads for tens of milliseconds, for a request that is refused for
its count anyway. For bodies over `PRESCAN_BYTES`, `prescan` first walks the JSON events of the
input fields with ijson's C parser, in a worker thread (a Python loop, so other threads get the
GIL between events), and stops at the first count over the limits: inputs per request, tokens per
token-id list, tokens per request. What it lets through is then parsed and checked in full.
"""

from __future__ import annotations

import ijson

from toolkit.errors import ContextLengthExceededError, InvalidRequestError
from toolkit.service.validation import RequestLimits

PRESCAN_BYTES = 256 * 1024
_VALUE_STARTS = frozenset(
    {"null", "boolean", "integer", "double", "number", "string", "start_array", "start_map"}
)


def prescan(raw: bytes, fields: tuple[str, ...], limits: RequestLimits) -> None:
    """Raise the client's 4xx if an input field of the JSON body `raw` exceeds a count limit."""
    counts: dict[str, _Count] = {}
    # Larger chunks for larger bodies: a long string spanning many small chunks is slow to join.
    for prefix, event, _ in ijson.parse(raw, buf_size=max(PRESCAN_BYTES, len(raw) // 8)):
        field, _, rest = prefix.partition(".")
        if field not in fields or event not in _VALUE_STARTS or not rest:
            continue
        count = counts.setdefault(field, _Count(field, limits))
        if rest == "item":
            count.element(event)
        elif rest == "item.item":
            count.token()


class _Count:
    """The running counts of one input field: its elements, and the ids of its current list."""

    def __init__(self, field: str, limits: RequestLimits) -> None:
        self.field, self.limits = field, limits
        self.elements = self.in_list = self.tokens = 0
        self.flat_ids: bool | None = None  # one list of token ids, as opposed to a list of inputs

    def element(self, event: str) -> None:
        if self.flat_ids is None:
            self.flat_ids = event in ("integer", "number")
        self.elements += 1
        self.in_list = 0
        if self.flat_ids and self.elements > self.limits.context_length:
            self._too_long(f"'{self.field}'", self.elements)
        if not self.flat_ids and self.elements > self.limits.max_inputs_per_request:
            raise InvalidRequestError(
                f"'{self.field}' holds more than {self.limits.max_inputs_per_request} inputs; at most "
                f"{self.limits.max_inputs_per_request} are allowed per request",
                param=self.field,
            )

    def token(self) -> None:
        self.in_list += 1
        self.tokens += 1
        if self.in_list > self.limits.context_length:
            self._too_long(f"{self.field}[{self.elements - 1}]", self.in_list)
        budget = self.limits.max_tokens_per_request
        if budget is not None and self.tokens > budget:
            raise InvalidRequestError(
                f"'{self.field}' holds more than {budget} tokens in all; at most {budget} are allowed "
                "per request",
                param=self.field,
                code="max_tokens_per_request_exceeded",
            )

    def _too_long(self, where: str, seen: int) -> None:
        raise ContextLengthExceededError(
            f"{where} has more than {seen - 1} tokens, more than this model's context length of "
            f"{self.limits.context_length}",
            param=self.field,
        )

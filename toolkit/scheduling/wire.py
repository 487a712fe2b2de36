"""The wire between HTTP front-end processes and the engine process: length-prefixed frames on a
Unix socket.

Every frame is a header (body length, kind, request id) and a body. Token ids and embeddings
travel as raw int32 / float32 arrays, so neither side walks them in Python: the engine's batcher
gets numpy views it can join in one copy (see `toolkit.execution.packing.pack`).

    front end -> engine   SUBMIT  inputs of one request      CANCEL  the client went away
    engine -> front end   HELLO   what the engine serves     RESULT  one row per input
                          ERROR   the request's error, as the server's own exception
                          BATCH   a batch finished: its size and time, and the queue after it
                                  (to every front end, for its /metrics)
                          LIVE    every second: the engine runs, and whether its batches progress
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit import errors
from toolkit.scheduling.work import WorkItem

HEADER = struct.Struct("<IBQ")  # body bytes, kind, request id
HELLO, SUBMIT, CANCEL, RESULT, ERROR, BATCH, LIVE = b"HSCREBL"
_COUNT = struct.Struct("<I")
_RESULT_HEAD = struct.Struct("<IId")  # rows, dimensions, seconds queued
_BATCH = struct.Struct("<IQdIQ")  # inputs, tokens, seconds; inputs and tokens queued after it
_LIVE = struct.Struct("<?")  # whether the engine's batcher has stalled

# Errors that may cross the wire as themselves; any other failure arrives as an InferenceError.
_WIRE_ERRORS: dict[str, type[errors.ToolkitError]] = {
    cls.__name__: cls
    for cls in (
        errors.InvalidRequestError,
        errors.ContextLengthExceededError,
        errors.OverloadedError,
        errors.InferenceError,
        errors.ServiceUnavailableError,
        errors.ShuttingDownError,
    )
}


@dataclass(frozen=True)
class Frame:
    kind: int
    request_id: int
    body: bytes


@dataclass(frozen=True)
class BatchReport:
    inputs: int
    tokens: int
    seconds: float
    queued_inputs: int
    queued_tokens: int


@dataclass(frozen=True)
class Rows:
    """A RESULT: the request's embeddings and how long they waited in the engine's queue."""

    rows: list[np.ndarray]
    queue_s: float


def frame(kind: int, request_id: int, body: bytes = b"") -> bytes:
    return HEADER.pack(len(body), kind, request_id) + body


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """The next frame; raises asyncio.IncompleteReadError when the peer has gone."""
    length, kind, request_id = HEADER.unpack(await reader.readexactly(HEADER.size))
    return Frame(kind, request_id, await reader.readexactly(length) if length else b"")


def encode_submit(request_id: int, items: Sequence[WorkItem]) -> bytes:
    count = len(items)
    lengths = np.fromiter((len(item.token_ids) for item in items), dtype=np.uint32, count=count)
    starts = np.fromiter((item.pool_start for item in items), dtype=np.uint32, count=count)
    segments = np.fromiter((item.segment_start for item in items), dtype=np.uint32, count=count)
    ids = [np.asarray(item.token_ids, dtype=np.int32) for item in items]
    flat = np.concatenate(ids) if ids else np.empty(0, dtype=np.int32)
    parts = (_COUNT.pack(count), lengths.tobytes(), starts.tobytes(), segments.tobytes(), flat.tobytes())
    body = b"".join(parts)
    return frame(SUBMIT, request_id, body)


def decode_submit(body: bytes) -> list[WorkItem]:
    (count,) = _COUNT.unpack_from(body)
    lengths = np.frombuffer(body, dtype=np.uint32, count=count, offset=_COUNT.size)
    starts = np.frombuffer(body, dtype=np.uint32, count=count, offset=_COUNT.size + 4 * count)
    segments = np.frombuffer(body, dtype=np.uint32, count=count, offset=_COUNT.size + 8 * count)
    ids = np.frombuffer(body, dtype=np.int32, offset=_COUNT.size + 12 * count)
    ends = np.cumsum(lengths, dtype=np.int64)
    if count and int(ends[-1]) != len(ids):
        raise ValueError(f"a SUBMIT frame announces {int(ends[-1])} token ids but holds {len(ids)}")
    begins = (ends - lengths).tolist()
    return [
        WorkItem(ids[begin:end], start, segment)
        for begin, end, start, segment in zip(
            begins, ends.tolist(), starts.tolist(), segments.tolist(), strict=True
        )
    ]


def encode_result(request_id: int, rows: Sequence[np.ndarray], queue_s: float) -> bytes:
    matrix = np.stack(rows).astype(np.float32, copy=False) if rows else np.empty((0, 0), np.float32)
    head = _RESULT_HEAD.pack(matrix.shape[0], matrix.shape[1], queue_s)
    return frame(RESULT, request_id, head + matrix.tobytes())


def decode_result(body: bytes) -> Rows:
    count, dim, queue_s = _RESULT_HEAD.unpack_from(body)
    matrix = np.frombuffer(body, dtype=np.float32, offset=_RESULT_HEAD.size).reshape(count, dim)
    return Rows(list(matrix), queue_s)


def encode_error(request_id: int, error: BaseException) -> bytes:
    if not isinstance(error, errors.ToolkitError) or type(error).__name__ not in _WIRE_ERRORS:
        error = errors.InferenceError("the model failed on this input; the server log has details")
    fields: dict[str, Any] = {
        "type": type(error).__name__,
        "message": error.message,
        "param": error.param,
        "code": error.code,
        "retry_after_s": getattr(error, "retry_after_s", None),
    }
    return frame(ERROR, request_id, json.dumps(fields).encode())


def decode_error(body: bytes) -> errors.ToolkitError:
    fields = json.loads(body)
    cls = _WIRE_ERRORS.get(fields["type"], errors.InferenceError)
    if cls is errors.OverloadedError:
        return errors.OverloadedError(fields["message"], retry_after_s=fields["retry_after_s"] or 1)
    return cls(fields["message"], param=fields["param"], code=fields["code"])


def encode_batch(report: BatchReport) -> bytes:
    body = _BATCH.pack(
        report.inputs, report.tokens, report.seconds, report.queued_inputs, report.queued_tokens
    )
    return frame(BATCH, 0, body)


def decode_batch(body: bytes) -> BatchReport:
    return BatchReport(*_BATCH.unpack(body))


def encode_hello(served: dict[str, Any]) -> bytes:
    return frame(HELLO, 0, json.dumps(served).encode())


def decode_hello(body: bytes) -> dict[str, Any]:
    served: dict[str, Any] = json.loads(body)
    return served


def encode_live(stalled: bool) -> bytes:
    return frame(LIVE, 0, _LIVE.pack(stalled))


def decode_live(body: bytes) -> bool:
    (stalled,) = _LIVE.unpack(body)
    return bool(stalled)

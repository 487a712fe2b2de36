"""Stop working for a client that has gone away.

Starlette keeps running a handler after its client disconnects, so a client that gives up (a
timeout, a closed notebook) would still have its inputs embedded. Once a handler has read its
body, the next ASGI `receive()` returns only when the client disconnects (or the response is
complete), so racing the work against it notices a departure at once, without polling. Cancelling
the engine's task makes the engine cancel its futures, and the batcher skips those entries: they
never reach the device.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.types import Receive

from toolkit.errors import ClientDisconnectedError

T = TypeVar("T")


async def cancel_on_disconnect(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnectedError.

    Call it only after the request body has been read in full: `receive` is then free to report
    the disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler is cancelled itself (server shutdown): leave nothing behind
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # the engine releases its queued inputs
    watcher.result()  # re-raises if receive() itself failed
    raise ClientDisconnectedError("the client closed the connection before its answer was ready")


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass

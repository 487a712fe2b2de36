"""Stop working for a client that has gone away.

Starlette keeps running a handler after its client disconnects, so a client that gives up (a
timeout, a closed notebook) would still have its inputs embedded. Once a handler has read its
body, the next ASGI `receive()` returns only when the client disconnects (or the response is
complete), so a task awaiting it notices a departure at once, without polling. Cancelling
the handler cancels the request's future, and the batcher skips its queued inputs: they
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
    the disconnect. The work runs in the calling task, and only the watcher is a task of its
    own: one task and no `asyncio.wait` per request, on an event loop that is the server's
    bottleneck with small models.
    """
    handler = asyncio.current_task()
    if handler is None:
        raise RuntimeError("cancel_on_disconnect must run inside a task")
    watching, cancelled_by_watcher = True, False

    def cancel_handler(watcher: asyncio.Future[None]) -> None:
        # Runs as a loop callback: after the work has finished, `watching` is False and a late
        # disconnect leaves the handler (by then sending its answer) alone.
        nonlocal cancelled_by_watcher
        if watching and not watcher.cancelled():
            cancelled_by_watcher = True
            handler.cancel()

    watcher = asyncio.ensure_future(_disconnected(receive))
    watcher.add_done_callback(cancel_handler)
    try:
        return await work
    except asyncio.CancelledError:
        if not cancelled_by_watcher or handler.uncancel() > 0:
            raise  # cancelled by someone else too (server shutdown): that cancel stands
        watcher.result()  # re-raises if receive() itself failed
        raise ClientDisconnectedError(
            "the client closed the connection before its answer was ready"
        ) from None
    finally:
        watching = False
        watcher.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass

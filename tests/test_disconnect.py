"""cancel_on_disconnect: a departing client cancels the work; a server shutdown's cancel stands."""

from __future__ import annotations

import asyncio

import pytest

from toolkit.api.disconnect import cancel_on_disconnect
from toolkit.errors import ClientDisconnectedError


async def _handle(trigger: str) -> str:
    """Run a handler whose work never ends on its own, then disconnect and/or cancel it."""
    gone = asyncio.Event()
    handler: asyncio.Task[str] | None = None
    work_cancelled = asyncio.Event()
    work_started = asyncio.Event()

    async def receive() -> dict[str, str]:
        await gone.wait()
        if trigger == "both":  # shutdown cancels the handler in the very loop step the client left
            assert handler is not None
            handler.cancel()
        return {"type": "http.disconnect"}

    async def work() -> str:
        work_started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            work_cancelled.set()
            raise
        return "answer"

    async def handle() -> str:
        try:
            return await cancel_on_disconnect(receive, work())
        except ClientDisconnectedError:
            return "client gone"

    handler = asyncio.ensure_future(handle())
    await asyncio.wait_for(work_started.wait(), 5)
    if trigger in ("disconnect", "both"):
        gone.set()
    else:
        handler.cancel()
    try:
        outcome = await asyncio.wait_for(handler, 5)
    except asyncio.CancelledError:
        outcome = "cancelled"
    assert work_cancelled.is_set(), "the work went on"
    return outcome


@pytest.mark.parametrize(
    ("trigger", "outcome"),
    [("disconnect", "client gone"), ("shutdown", "cancelled"), ("both", "cancelled")],
)
def test_disconnect_and_shutdown_cancel_the_work(trigger: str, outcome: str) -> None:
    assert asyncio.run(_handle(trigger)) == outcome


def test_a_late_disconnect_leaves_a_finished_answer_alone() -> None:
    async def scenario() -> str:
        gone = asyncio.Event()

        async def receive() -> dict[str, str]:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def work() -> str:
            gone.set()  # the client leaves while the answer is being made
            return "answer"

        answer = await cancel_on_disconnect(receive, work())
        for _ in range(3):  # the watcher's step and its callbacks run now: nothing may be cancelled
            await asyncio.sleep(0)
        return answer

    assert asyncio.run(scenario()) == "answer"

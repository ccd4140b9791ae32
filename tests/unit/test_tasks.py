"""shared.tasks: stopping background tasks."""

from __future__ import annotations

import asyncio

from shared.tasks import cancel_and_wait


async def test_every_task_is_cancelled_and_awaited_whatever_it_raises() -> None:
    async def forever() -> None:
        await asyncio.sleep(3600)

    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup went wrong") from None

    tasks = [asyncio.create_task(forever()), asyncio.create_task(fails_when_cancelled())]
    await asyncio.sleep(0)
    await cancel_and_wait([tasks[0], None, tasks[1]])
    assert all(task.done() for task in tasks)
    assert tasks[0].cancelled() and isinstance(tasks[1].exception(), RuntimeError)

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



async def test_the_callers_own_cancellation_ends_it_at_once() -> None:
    """A caller cancelled while its tasks are still ending (a `wait_for` past its timeout) ends
    cancelled at once. Awaiting a task directly would hand the cancellation to the task instead,
    and wait as long as the task's cleanup takes (forever, for a cleanup stuck on something)."""
    cleanup_may_end = asyncio.Event()
    carried_on = False

    async def slow_to_end() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await cleanup_may_end.wait()

    async def caller() -> None:
        nonlocal carried_on
        await cancel_and_wait([task])
        carried_on = True

    task = asyncio.create_task(slow_to_end())
    await asyncio.sleep(0)
    stopping = asyncio.create_task(caller())
    try:
        await asyncio.sleep(0)
        stopping.cancel()
        for _ in range(10):  # a few turns of the loop: no waiting on a clock
            await asyncio.sleep(0)
        assert stopping.done() and stopping.cancelled() and not carried_on
    finally:
        cleanup_may_end.set()
        await asyncio.wait([task, stopping])
    assert task.cancelled()

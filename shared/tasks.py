"""Stopping background tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None]) -> None:
    """Cancel every task (None entries skipped), then wait for each to end; what they raise
    while ending (their cancellation, an error) is not the caller's to handle.

    The caller's own cancellation is: it ends the wait at once and propagates. (Awaiting a task
    directly would pass that cancellation on to the task and then wait for as long as its
    cleanup takes, so a `wait_for` around a stop could outlive its timeout without bound.)"""
    pending = [task for task in tasks if task is not None]
    for task in pending:
        task.cancel()
    if not pending:
        return
    await asyncio.wait(pending)
    for task in pending:
        if not task.cancelled():
            task.exception()  # retrieved, so that asyncio does not report it as never retrieved

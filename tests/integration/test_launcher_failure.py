"""`threadline up` with a setting every service refuses: the start fails with the reason from the
service's log, and nothing it had started (nats-server, the other services) outlives it; and its
supervisor restarting crashed services each on its own back-off."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path

import pytest

from shared.subjects import PARTITIONS_VARIABLE
from threadline.cli import Launcher, LaunchError, ServiceProcess


async def test_a_start_that_fails_names_the_reason_and_stops_what_it_started(tmp_path: Path) -> None:
    launcher = Launcher(data_dir=str(tmp_path), host="127.0.0.1", port=0, nats_port=0, auto_ports=True,
                        extra_env={PARTITIONS_VARIABLE: "3"})
    launcher.say = lambda _text: None  # type: ignore[method-assign]
    with pytest.raises(LaunchError) as failed:
        await launcher.start()
    assert f"{PARTITIONS_VARIABLE} must be one of 1, 2, 4, 8, 16, got '3'" in str(failed.value)
    assert launcher.nats is not None and launcher.nats.process is None  # nats-server stopped…
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", launcher.nats.port), timeout=1).close()  # …and gone
    started = [svc for svc in launcher.services.values() if svc.process is not None]
    assert started and all(svc.process.returncode is not None for svc in started)  # type: ignore[union-attr]


async def test_a_service_in_a_long_back_off_does_not_hold_back_another_restart(tmp_path: Path) -> None:
    """The supervisor restarts each crashed service on its own back-off: one that crashed five
    times in a row (16 s to wait) does not delay the restart of another that crashed once."""
    launcher = Launcher(data_dir=str(tmp_path), host="127.0.0.1", port=0, nats_port=0)
    launcher.say = lambda _text: None  # type: ignore[method-assign]
    env = {**os.environ, PARTITIONS_VARIABLE: "3"}  # every start exits at once
    looping = ServiceProcess("identity", 0, env, str(tmp_path / "identity.log"), crashes=5)
    crashed = ServiceProcess("handoff", 0, env, str(tmp_path / "handoff.log"))
    launcher.services.update(identity=looping, handoff=crashed)  # the looping one comes first
    for svc in (looping, crashed):
        await svc.start()
        assert svc.process is not None
        assert await asyncio.wait_for(svc.process.wait(), 60) != 0
        svc.started_at = time.monotonic()  # crashed right after its start: no back-off reset
    stop = asyncio.Event()
    supervisor = asyncio.create_task(launcher._supervise(stop))
    try:
        deadline = time.monotonic() + 10  # the crashed one's back-off is 0.5 s
        while crashed.restarts == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert crashed.restarts == 1
        assert looping.restarts == 0  # still waiting out its 16 s
    finally:
        stop.set()
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        for svc in (looping, crashed):
            if svc.process is not None and svc.process.returncode is None:
                svc.process.kill()
                await svc.process.wait()

"""`threadline up` with a setting every service refuses: the start fails with the reason from the
service's log, and nothing it had started (nats-server, the other services) outlives it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from shared.subjects import PARTITIONS_VARIABLE
from threadline.cli import Launcher, LaunchError


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

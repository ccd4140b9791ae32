"""Starting a local nats-server: ready means this server is ready, not that something answers on
its port. A port chosen for it that another process took before it bound it (another test run's
server, chosen at the same moment) is chosen again; one given is refused at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from threadline import natsserver
from threadline.natsserver import NatsServer, PortTaken


def test_a_chosen_port_taken_before_the_bind_is_chosen_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = NatsServer(store_dir=str(tmp_path / "other")).start()
    try:
        choices = iter([other.port])
        real_free_port = natsserver.free_port
        monkeypatch.setattr(natsserver, "free_port", lambda: next(choices, None) or real_free_port())
        server = NatsServer(store_dir=str(tmp_path / "ours")).start()
        try:
            assert server.port != other.port
            assert server.process is not None and server.process.poll() is None
            assert "Server is ready" in Path(server.log_path or "").read_text()
        finally:
            server.stop()
    finally:
        other.stop()


def test_a_given_port_that_is_taken_is_refused_at_once(tmp_path: Path) -> None:
    other = NatsServer(store_dir=str(tmp_path / "other")).start()
    try:
        ours = NatsServer(store_dir=str(tmp_path / "ours"), port=other.port)
        with pytest.raises(PortTaken):
            ours.start()
        assert ours.process is None
    finally:
        other.stop()

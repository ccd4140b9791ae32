"""Ports the launchers choose for their services, and what they report when one fails to start."""

from __future__ import annotations

import socket
from pathlib import Path

from threadline.cli import log_tail
from threadline.natsserver import LOWEST_CHOSEN_PORT, ephemeral_port_range, free_port


def test_a_chosen_port_lies_below_the_ephemeral_range_where_outgoing_connections_cannot_take_it() -> None:
    low, high = ephemeral_port_range()
    assert 0 < low <= high <= 65535
    ports = {free_port() for _ in range(20)}
    if low - LOWEST_CHOSEN_PORT >= 1000:
        assert all(LOWEST_CHOSEN_PORT <= port < low for port in ports), ports
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))  # still free


def test_a_port_is_never_handed_out_twice_before_it_is_bound() -> None:
    ports = [free_port() for _ in range(500)]  # a random choice of 500 in ~22,000 repeats one at 99.6 %
    assert len(set(ports)) == len(ports)


def test_a_port_in_use_is_never_chosen() -> None:
    held = []
    try:
        for _ in range(30):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", free_port()))
            sock.listen()
            held.append(sock)
        taken = {sock.getsockname()[1] for sock in held}
        assert len(taken) == 30
        assert free_port() not in taken
    finally:
        for sock in held:
            sock.close()


def test_a_failed_service_is_reported_with_the_end_of_its_log(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    log.write_text("".join(f"line {n}\n" for n in range(100)) + "OSError: [Errno 98] address already in use\n")
    tail = log_tail(str(log), lines=3)
    assert tail.splitlines() == ["line 98", "line 99", "OSError: [Errno 98] address already in use"]
    assert "log unreadable" in log_tail(str(tmp_path / "missing.log"))

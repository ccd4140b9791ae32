"""Stream and bucket setup waits out a busy JetStream instead of failing the service's start."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest

from shared import bus as bus_module


async def test_setup_is_tried_again_while_jetstream_times_out_or_is_unavailable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bus_module, "SETUP_RETRY_PAUSE_SECONDS", 0.0)
    failures: list[Exception] = [nats.errors.TimeoutError(), nats.js.errors.ServiceUnavailableError()]
    calls = 0

    async def setup() -> str:
        nonlocal calls
        calls += 1
        if failures:
            raise failures.pop(0)
        return "bucket"

    assert await bus_module._retry_setup(setup) == "bucket"
    assert calls == 3


async def test_setup_gives_up_after_its_deadline_and_never_retries_a_real_refusal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bus_module, "SETUP_RETRY_PAUSE_SECONDS", 0.0)
    monkeypatch.setattr(bus_module, "SETUP_RETRY_SECONDS", 0.0)
    calls = 0

    async def timing_out() -> None:
        nonlocal calls
        calls += 1
        raise nats.errors.TimeoutError()

    with pytest.raises(nats.errors.TimeoutError):
        await bus_module._retry_setup(timing_out)
    assert calls <= 2

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise nats.js.errors.BadRequestError()

    calls = 0
    monkeypatch.setattr(bus_module, "SETUP_RETRY_SECONDS", 30.0)
    with pytest.raises(nats.js.errors.BadRequestError):
        await bus_module._retry_setup(refused)
    assert calls == 1

"""Stream and bucket setup waits out a busy JetStream; a KV mirror is ready only with every initial value."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.js.kv import KeyValue

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


class _ScriptedWatcher:
    """What nats-py's KV watcher yields, in an order it can yield under load."""

    def __init__(self, updates: list[KeyValue.Entry | None]) -> None:
        self.updates = updates
        self.stopped = False

    def __aiter__(self) -> _ScriptedWatcher:
        return self

    async def __anext__(self) -> KeyValue.Entry | None:
        while not self.updates:
            await asyncio.sleep(0)
        return self.updates.pop(0)

    async def stop(self) -> None:
        self.stopped = True


def _entry(key: str, value: bytes, revision: int) -> KeyValue.Entry:
    return KeyValue.Entry(bucket="b", key=key, value=value, revision=revision, delta=0,
                          created=None, operation=None)


async def test_kv_mirror_is_not_ready_on_an_early_end_marker() -> None:
    # The marker came before values already delivered (the consumer had nothing pending
    # while they were in flight): ready waits for the bucket's last revision.
    mirror = bus_module.KvMirror(None, "b", bytes.decode)  # type: ignore[arg-type]
    mirror._initial_revision = 2
    watcher = _ScriptedWatcher([None])
    task = asyncio.create_task(mirror._run(watcher))  # type: ignore[arg-type]
    for _ in range(10):
        await asyncio.sleep(0)
    assert not mirror.ready.is_set()
    watcher.updates.extend([_entry("a", b"1", 1), _entry("b", b"2", 2)])
    await asyncio.wait_for(mirror.ready.wait(), 1)
    assert mirror.values == {"a": "1", "b": "2"}
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert watcher.stopped


async def test_kv_mirror_starts_with_what_it_has_when_the_last_revision_never_comes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bus_module, "KV_MIRROR_CATCH_UP_SECONDS", 0.0)
    mirror = bus_module.KvMirror(None, "b", bytes.decode)  # type: ignore[arg-type]
    mirror._initial_revision = 5
    task = asyncio.create_task(mirror._run(_ScriptedWatcher([_entry("a", b"1", 1), None])))  # type: ignore[arg-type]
    await asyncio.wait_for(mirror.ready.wait(), 1)
    assert mirror.values == {"a": "1"}
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class _Bucket:
    """What `KvMirror` asks of a KV bucket: its state, and a watcher."""

    def __init__(self, watcher: Any, messages: list[int], last_seq: int) -> None:
        self.watcher = watcher
        self.messages = messages  # what each status() reports, in turn (the last one repeats)
        self.last_seq = last_seq

    async def status(self) -> Any:
        messages = self.messages.pop(0) if len(self.messages) > 1 else self.messages[0]
        state = SimpleNamespace(messages=messages, last_seq=self.last_seq)
        return SimpleNamespace(stream_info=SimpleNamespace(state=state))

    async def watchall(self) -> Any:
        return self.watcher


class _BusOf:
    def __init__(self, bucket: _Bucket) -> None:
        self.bucket = bucket

    async def key_value(self, _name: str) -> _Bucket:
        return self.bucket


async def test_kv_mirror_starts_when_the_values_pending_at_its_start_expire_undelivered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Two values when the watch began, both expired before delivery: no value and no end marker
    # ever come; the bucket, looked at again, is empty.
    monkeypatch.setattr(bus_module, "KV_MIRROR_CATCH_UP_SECONDS", 0.01)
    bucket = _Bucket(_ScriptedWatcher([]), messages=[2, 0], last_seq=2)
    mirror = bus_module.KvMirror(_BusOf(bucket), "b", bytes.decode)  # type: ignore[arg-type]
    await asyncio.wait_for(mirror.start(), 5)
    assert mirror.ready.is_set() and mirror.values == {}
    await mirror.stop()


class _FailingWatcher(_ScriptedWatcher):
    async def __anext__(self) -> KeyValue.Entry | None:
        raise nats.errors.ConnectionClosedError


async def test_kv_mirror_start_fails_when_its_watch_ends_before_the_values_are_in(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bus_module, "KV_MIRROR_CATCH_UP_SECONDS", 0.01)
    bucket = _Bucket(_FailingWatcher([]), messages=[3], last_seq=3)
    mirror = bus_module.KvMirror(_BusOf(bucket), "b", bytes.decode)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="watching KV bucket b ended"):
        await asyncio.wait_for(mirror.start(), 5)
    assert not mirror.ready.is_set() and bucket.watcher.stopped

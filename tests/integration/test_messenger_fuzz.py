"""Fuzzing the Messenger webhook: malformed, truncated, oversized, unsigned and signed-but-garbage
bodies get a 4xx (a signed notification whose only event is malformed: 200, the event reported and
not retried forever), nothing is published or stored, and the service keeps serving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import subjects
from shared.bus import Bus
from shared.signing import meta_signature
from tests.harness import System
from tests.integration.test_messenger_service import APP_SECRET, PAGE_ID, MsEnv, start_messenger

EVENT = {"sender": {"id": "6543210987654321"}, "recipient": {"id": PAGE_ID}, "timestamp": 1717000000050,
         "message": {"mid": "m_FUZZ", "text": "hi"}}
VALID = json.dumps({"object": "page", "entry": [{"id": PAGE_ID, "time": 1717000000123,
                                                 "messaging": [EVENT]}]}).encode()

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)


def _with_event(event: Any) -> bytes:
    doc = json.loads(VALID)
    doc["entry"][0]["messaging"] = [event]
    return json.dumps(doc).encode()


def _replace(key: str, value: Any) -> dict[str, Any]:
    event = {k: v for k, v in EVENT.items() if k != key}
    if value is not _DROP:
        event[key] = value
    return event


_DROP = object()
not_a_timestamp = st.text() | st.booleans() | st.none() | st.integers(max_value=-1) | st.lists(json_leaf)
not_an_object = json_leaf | st.lists(json_leaf, max_size=3)

broken_events = st.one_of(
    # an envelope part missing or of the wrong type
    st.sampled_from(["sender", "recipient", "timestamp"]).map(lambda key: _replace(key, _DROP)),
    st.tuples(st.sampled_from(["sender", "recipient"]), not_an_object).map(lambda kv: _replace(*kv)),
    not_a_timestamp.map(lambda value: _replace("timestamp", value)),
    # a message without its mid, or not an object
    st.dictionaries(st.sampled_from(["text", "attachments", "quick_reply", "reply_to"]), json_value, max_size=3)
      .map(lambda m: _replace("message", m)),
    # postbacks, referrals and receipts of the wrong shape
    st.tuples(st.sampled_from(["postback", "referral", "delivery", "read"]),
              not_an_object.filter(lambda v: v is not None))
      .map(lambda kv: {**_replace("message", _DROP), kv[0]: kv[1]}),
    st.sampled_from(["delivery", "read"]).map(lambda key: {**_replace("message", _DROP),
                                                           key: {"watermark": "soon"}}),
)

# (body, signed?) pairs that must never be accepted with content.
bad_bodies = st.one_of(
    st.tuples(st.binary(max_size=300), st.booleans()),  # arbitrary bytes
    st.tuples(st.integers(1, len(VALID) - 1).map(lambda n: VALID[:n]), st.booleans()),  # truncated
    st.tuples(json_value.map(lambda v: json.dumps(v).encode()), st.booleans()),  # JSON of any shape…
    st.tuples(st.just(VALID), st.just(False)),  # a genuine body without a valid signature
    st.tuples(broken_events.map(_with_event), st.just(True)),  # signed, broken event
    st.tuples(st.integers(100 * 1024 + 1, 300 * 1024).map(lambda n: b"{" + b" " * n + b"}"), st.booleans()),
)


@pytest.fixture
async def ms(system: System, bus: Bus) -> AsyncIterator[MsEnv]:
    yield await start_messenger(system, bus)


def _empty_notification(body: bytes) -> bool:
    """A well-formed notification that carries no event we act on may be answered 200."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("object") == "page"


async def test_webhook_fuzz_never_accepts_garbage(ms: MsEnv) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=bad_bodies)
    def cases(case: tuple[bytes, bool]) -> None:
        collected.append(case)

    collected: list[tuple[bytes, bool]] = []
    cases()
    assert len(collected) >= 30
    rejected = 0
    async with httpx.AsyncClient(timeout=10) as http:
        for body, signed in collected:
            headers = {"Content-Type": "application/json"}
            if signed:
                headers["X-Hub-Signature-256"] = meta_signature(APP_SECRET, body)
            elif body:
                headers["X-Hub-Signature-256"] = meta_signature("not-the-secret", body)
            resp = await http.post(ms.webhook_url, content=body, headers=headers)
            if signed and _empty_notification(body) and resp.status_code == 200:
                continue
            assert 400 <= resp.status_code < 500 and resp.status_code != 404, (resp.status_code, body[:200])
            rejected += 1
        assert rejected >= len(collected) // 2
        for stream in (subjects.INBOUND, subjects.STATUS):
            info = await ms.bus.js.stream_info(stream.name)
            assert info.state.messages == 0
        store = ms.service.store
        assert store is not None
        assert await store.db.fetchval("SELECT COUNT(*) FROM windows") == 0
        assert (await http.get(f"{ms.system.service_url('messenger')}/healthz")).status_code == 200
        assert (await http.get(f"{ms.system.base_url}/_svc/messenger/readyz")).status_code == 200
        # …and a genuine notification still goes through.
        ok = await http.post(ms.webhook_url, content=VALID, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": meta_signature(APP_SECRET, VALID)})
        assert ok.status_code == 200
    assert len(await ms.inbound()) == 1

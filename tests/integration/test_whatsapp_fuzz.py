"""Fuzzing the webhook: malformed, truncated, oversized, unsigned and signed-but-garbage bodies are
answered 4xx (a signed notification whose only message is malformed: 200, the message reported and
not retried forever), publish nothing, and leave the service healthy."""

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
from tests.fakes.whatsapp_env import APP_SECRET, WaEnv, start_whatsapp
from tests.harness import System

VALID = json.dumps({
    "object": "whatsapp_business_account",
    "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": "1122334455667"},
        "contacts": [{"profile": {"name": "Ada"}, "wa_id": "15551234567", "user_id": "US.1"}],
        "messages": [{"from": "15551234567", "id": "wamid.FUZZ", "timestamp": "1717000000", "type": "text",
                      "text": {"body": "hi"}}]}}]}],
}).encode()

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)


def _broken_message(message: Any) -> bytes:
    """The valid envelope with its message replaced (must not be a well-formed message)."""
    doc = json.loads(VALID)
    doc["entry"][0]["changes"][0]["value"]["messages"] = [message]
    return json.dumps(doc).encode()


# (body, signed?) pairs whose content must never be accepted.
bad_bodies = st.one_of(
    st.tuples(st.binary(max_size=300), st.booleans()),  # arbitrary bytes
    st.tuples(st.integers(1, len(VALID) - 1).map(lambda n: VALID[:n]), st.booleans()),  # truncated
    st.tuples(json_value.map(lambda v: json.dumps(v).encode()), st.booleans()),  # JSON of any shape…
    st.tuples(st.just(VALID), st.just(False)),  # a genuine body without a valid signature
    st.tuples(st.dictionaries(st.sampled_from(["id", "timestamp", "type", "text", "image", "from"]), json_leaf,
                              max_size=3)
              .filter(lambda m: not {"id", "timestamp", "type"} <= m.keys())
              .map(_broken_message), st.just(True)),  # signed, broken message
    st.tuples(st.integers(100 * 1024 + 1, 300 * 1024).map(lambda n: b"{" + b" " * n + b"}"), st.booleans()),
)


@pytest.fixture
async def wa(system: System, bus: Bus) -> AsyncIterator[WaEnv]:
    yield await start_whatsapp(system, bus)


def _acceptable(body: bytes) -> bool:
    """JSON that happens to be a valid (empty or message-less) notification is fine to accept."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("object") == "whatsapp_business_account"


async def test_webhook_fuzz_never_accepts_garbage(wa: WaEnv) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=bad_bodies)
    def cases(case: tuple[bytes, bool]) -> None:
        collected.append(case)

    collected: list[tuple[bytes, bool]] = []
    cases()
    assert collected
    async with httpx.AsyncClient(timeout=10) as http:
        for body, signed in collected:
            headers = {"Content-Type": "application/json"}
            if signed:
                headers["X-Hub-Signature-256"] = meta_signature(APP_SECRET, body)
            elif body:
                headers["X-Hub-Signature-256"] = meta_signature("not-the-secret", body)
            resp = await http.post(wa.webhook_url, content=body, headers=headers)
            if signed and _acceptable(body) and resp.status_code == 200:
                continue  # a well-formed notification with nothing in it
            assert 400 <= resp.status_code < 500, (resp.status_code, body[:200])
            assert resp.status_code != 404
        info = await wa.bus.js.stream_info(subjects.INBOUND.name)
        assert info.state.messages == 0
        status_info = await wa.bus.js.stream_info(subjects.STATUS.name)
        assert status_info.state.messages == 0
        health = await http.get(f"{wa.system.service_url('whatsapp')}/healthz")
        assert health.status_code == 200
        ready = await http.get(f"{wa.system.base_url}/_svc/whatsapp/readyz")
        assert ready.status_code == 200

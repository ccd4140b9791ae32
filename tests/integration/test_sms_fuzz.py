"""Fuzzing the Twilio webhooks: malformed, truncated, oversized, unsigned, wrongly signed and
signed-but-broken forms are always answered 4xx, publish nothing, and leave the service healthy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from shared import subjects
from shared.bus import Bus
from shared.twilio_wire import SIGNATURE_HEADER
from tests.harness import System
from tests.integration.test_sms_service import AUTH_TOKEN, SmsEnv, inbound_form, start_sms

VALID = inbound_form("SM" + "a" * 32, "hello")
FIELDS = sorted({name for name, _ in VALID} | {"NumMedia", "MediaUrl0", "MessageStatus", "ErrorCode"})

# (body, how it is signed, endpoint): signing "right" = valid signature over the public URL,
# "wrong" = another token, "none" = no header; endpoint "message" or "status" (the callback URL).
Case = tuple[bytes, str, str]
endpoint = st.sampled_from(["message", "status"])

text = st.text(max_size=30)
bad_cases = st.one_of(
    st.tuples(st.binary(max_size=300), st.sampled_from(["right", "wrong", "none"]), endpoint),
    # A genuine form cut anywhere, never correctly signed (a cut form could still be well formed).
    st.tuples(st.integers(1, len(urlencode(VALID)) - 1).map(lambda n: urlencode(VALID).encode()[:n]),
              st.sampled_from(["wrong", "none"]), endpoint),
    # The genuine form, unsigned or signed with another token.
    st.tuples(st.just(urlencode(VALID).encode()), st.sampled_from(["wrong", "none"]), endpoint),
    # Signed forms that lack what a message needs (a SID and a sender) or carry broken values.
    st.tuples(st.lists(st.tuples(st.sampled_from(FIELDS), text), max_size=6)
              .filter(lambda form: not ({"MessageSid", "From"} <= {k for k, _ in form}))
              .map(lambda form: urlencode(form).encode()), st.just("right"), endpoint),
    st.tuples(st.sampled_from([
        [*VALID, ("NumMedia", "3")],
        [(k, "x" if k == "MessageSid" else v) for k, v in VALID],
        [(k, "" if k == "From" else v) for k, v in VALID],
        [(k, "AC" + "f" * 32 if k == "AccountSid" else v) for k, v in VALID],
        [*VALID, ("NumMedia", "1"), ("MediaUrl0", "javascript:alert(1)")],
    ]).map(lambda form: urlencode([(k, v) for k, v in form if not (k == "NumMedia" and v == "0")]).encode()),
        st.just("right"), st.just("message")),  # (a signed `received` status would rightly be a 200 no-op)
    # Oversized bodies.
    st.tuples(st.integers(64 * 1024 + 1, 200 * 1024).map(lambda n: b"Body=" + b"x" * n),
              st.sampled_from(["right", "none"]), endpoint),
)


def headers_for(body: bytes, signing: str, url: str) -> dict[str, str]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if signing == "none":
        return headers
    try:
        params: dict[str, list[str]] = {}
        for name, value in parse_qsl(body.decode("utf-8"), keep_blank_values=True):
            params.setdefault(name, []).append(value)
    except (UnicodeDecodeError, ValueError):
        params = {}

    class Multi(dict[str, list[str]]):
        def getall(self, name: str) -> list[str]:
            return self[name]

    token = AUTH_TOKEN if signing == "right" else "some-other-token-123456"
    headers[SIGNATURE_HEADER] = RequestValidator(token).compute_signature(url, Multi(params))
    return headers


@pytest.fixture
async def sms(system: System, bus: Bus) -> AsyncIterator[SmsEnv]:
    yield await start_sms(system, bus)


async def test_webhook_fuzz_never_accepts_garbage(sms: SmsEnv) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=bad_cases)
    def cases(case: Case) -> None:
        collected.append(case)

    collected: list[Case] = []
    cases()
    assert len(collected) >= 30
    async with httpx.AsyncClient(timeout=10) as http:
        for body, signing, target in collected:
            url = sms.webhook_url if target == "message" else f"{sms.webhook_url}/status"
            resp = await http.post(url, content=body, headers=headers_for(body, signing, url))
            assert 400 <= resp.status_code < 500, (resp.status_code, url, signing, body[:200])
            assert resp.status_code != 404
        inbound = await sms.bus.js.stream_info(subjects.INBOUND.name)
        statuses = await sms.bus.js.stream_info(subjects.STATUS.name)
        assert inbound.state.messages == 0 and statuses.state.messages == 0
        health = await http.get(f"{sms.system.service_url('sms')}/healthz")
        assert health.status_code == 200
        ready = await http.get(f"{sms.system.base_url}/_svc/sms/readyz")
        assert ready.status_code == 200
        # …and it still takes a genuine message.
        sent = await sms.script("/inbound", {"from": "+15551234567", "text": "still alive"})
        assert sent["webhookStatus"] == 200

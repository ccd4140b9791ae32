"""The inbound side every platform channel shares, run against each channel behind the front door
with its sandbox fake and a real nats-server: a platform's redelivery is one message, an unsigned or
forged delivery is refused and queues nothing, the HTTP errors (unknown integration, wrong type,
oversized, wrong shape) carry SunCo's error body, and a fuzz of hostile bodies is never accepted
and leaves the service healthy and still taking genuine messages.

What a channel adds of its own (its message kinds, its batch reports, Twilio's signed-URL warnings,
Telegram's webhook registration) is tested beside the channel."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from services.messenger.handlers import MAX_WEBHOOK_BODY as MESSENGER_MAX_BODY
from services.sms.handlers import MAX_WEBHOOK_BODY as SMS_MAX_BODY
from services.telegram.handlers import MAX_WEBHOOK_BODY as TELEGRAM_MAX_BODY
from services.whatsapp.handlers import MAX_WEBHOOK_BODY as WHATSAPP_MAX_BODY
from shared import subjects
from shared.bus import Bus
from shared.ids import new_id
from shared.signing import meta_signature
from shared.sunco import TextContent
from shared.twilio_wire import SIGNATURE_HEADER
from tests.fakes.whatsapp_env import APP_SECRET as WA_SECRET
from tests.fakes.whatsapp_env import PHONE_NUMBER_ID, start_whatsapp
from tests.harness import System
from tests.integration.test_messenger_service import APP_SECRET as MS_SECRET
from tests.integration.test_messenger_service import PAGE_ID, PSID, start_messenger
from tests.integration.test_sms_service import AUTH_TOKEN, inbound_form, start_sms
from tests.integration.test_telegram_service import SECRET as TG_SECRET
from tests.integration.test_telegram_service import SECRET_HEADER, USER, start_telegram

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


class ChannelEnv(Protocol):
    system: System
    bus: Bus

    @property
    def webhook_url(self) -> str: ...

    async def inbound(self) -> list[Any]: ...


def _meta_headers(body: bytes, url: str, secret: str | None) -> dict[str, str]:
    headers = {"Content-Type": JSON}
    if secret is not None:
        headers["X-Hub-Signature-256"] = meta_signature(secret, body)
    return headers


def _telegram_headers(body: bytes, url: str, secret: str | None) -> dict[str, str]:
    headers = {"Content-Type": JSON}
    if secret is not None:
        headers[SECRET_HEADER] = secret
    return headers


def _twilio_headers(body: bytes, url: str, secret: str | None) -> dict[str, str]:
    """Twilio's own RequestValidator signs the public URL and the form's fields."""
    headers = {"Content-Type": FORM}
    if secret is None:
        return headers
    try:
        fields: dict[str, list[str]] = {}
        for name, value in parse_qsl(body.decode("utf-8"), keep_blank_values=True):
            fields.setdefault(name, []).append(value)
    except (UnicodeDecodeError, ValueError):
        fields = {}

    class Multi(dict[str, list[str]]):
        def getall(self, name: str) -> list[str]:
            return self[name]

    headers[SIGNATURE_HEADER] = RequestValidator(secret).compute_signature(url, Multi(fields))
    return headers


json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)


def _json_with(genuine: bytes, place: Callable[[dict[str, Any], Any], None]) -> Callable[[Any], bytes]:
    def build(item: Any) -> bytes:
        doc = json.loads(genuine)
        place(doc, item)
        return json.dumps(doc).encode()
    return build


# --- the four channels -----------------------------------------------------------------------------

WA_GENUINE = json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
    "field": "messages", "value": {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": PHONE_NUMBER_ID},
        "contacts": [{"profile": {"name": "Ada"}, "wa_id": "15551234567", "user_id": "US.1"}],
        "messages": [{"from": "15551234567", "id": "wamid.GENUINE", "timestamp": "1717000000", "type": "text",
                      "text": {"body": "genuine"}}]}}]}]}).encode()
WA_BROKEN = (st.dictionaries(st.sampled_from(["id", "timestamp", "type", "text", "image", "from"]), json_leaf,
                             max_size=3)
             .filter(lambda m: not {"id", "timestamp", "type"} <= m.keys())
             .map(_json_with(WA_GENUINE, lambda doc, m: doc["entry"][0]["changes"][0]["value"].update(messages=[m]))))

MS_EVENT = {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": 1717000000050,
            "message": {"mid": "m_GENUINE", "text": "genuine"}}
MS_GENUINE = json.dumps({"object": "page", "entry": [{"id": PAGE_ID, "time": 1717000000123,
                                                      "messaging": [MS_EVENT]}]}).encode()
_DROP = object()


def _ms_event(key: str, value: Any) -> dict[str, Any]:
    event = {k: v for k, v in MS_EVENT.items() if k != key}
    if value is not _DROP:
        event[key] = value
    return event


_not_an_object = json_leaf | st.lists(json_leaf, max_size=3)
MS_BROKEN = st.one_of(
    st.sampled_from(["sender", "recipient", "timestamp"]).map(lambda key: _ms_event(key, _DROP)),
    st.tuples(st.sampled_from(["sender", "recipient"]), _not_an_object).map(lambda kv: _ms_event(*kv)),
    (st.text() | st.booleans() | st.none() | st.integers(max_value=-1) | st.lists(json_leaf))
    .map(lambda value: _ms_event("timestamp", value)),
    st.dictionaries(st.sampled_from(["text", "attachments", "quick_reply", "reply_to"]), json_value, max_size=3)
    .map(lambda m: _ms_event("message", m)),
    st.tuples(st.sampled_from(["postback", "referral", "delivery", "read"]),
              _not_an_object.filter(lambda v: v is not None))
    .map(lambda kv: {**_ms_event("message", _DROP), kv[0]: kv[1]}),
    st.sampled_from(["delivery", "read"]).map(lambda key: {**_ms_event("message", _DROP), key: {"watermark": "soon"}}),
).map(_json_with(MS_GENUINE, lambda doc, event: doc["entry"][0].update(messaging=[event])))

SMS_FORM = inbound_form("SM" + "a" * 32, "genuine")
SMS_GENUINE = urlencode(SMS_FORM).encode()
_SMS_FIELDS = sorted({name for name, _ in SMS_FORM} | {"NumMedia", "MediaUrl0", "MessageStatus", "ErrorCode"})
SMS_BROKEN = st.one_of(
    # forms that lack what a message needs (a SID and a sender)…
    st.lists(st.tuples(st.sampled_from(_SMS_FIELDS), st.text(max_size=30)), max_size=6)
    .filter(lambda form: not ({"MessageSid", "From"} <= {k for k, _ in form}))
    .map(lambda form: urlencode(form).encode()),
    # …or carry broken values
    st.sampled_from([
        [*SMS_FORM, ("NumMedia", "3")],
        [(k, "x" if k == "MessageSid" else v) for k, v in SMS_FORM],
        [(k, "" if k == "From" else v) for k, v in SMS_FORM],
        [(k, "AC" + "f" * 32 if k == "AccountSid" else v) for k, v in SMS_FORM],
        [*SMS_FORM, ("NumMedia", "1"), ("MediaUrl0", "javascript:alert(1)")],
    ]).map(lambda form: urlencode([(k, v) for k, v in form if not (k == "NumMedia" and v == "0")]).encode()),
)

TG_GENUINE = json.dumps({"update_id": 900000001, "message": {
    "message_id": 5, "from": {"id": USER, "is_bot": False, "first_name": "Ada"},
    "chat": {"id": USER, "first_name": "Ada", "type": "private"}, "date": 1717000000, "text": "genuine"}}).encode()
TG_BROKEN = (st.dictionaries(st.sampled_from(["message_id", "date", "chat", "text", "photo", "from"]), json_leaf,
                             max_size=3)
             .filter(lambda m: not {"message_id", "date", "chat"} <= m.keys())
             .map(_json_with(TG_GENUINE, lambda doc, m: doc.update(message=m))))


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _meta_notification(kind: str) -> Callable[[bytes], bool]:
    """A well-formed notification that carries nothing the gateway acts on may be answered 200."""
    return lambda body: (_json_object(body) or {}).get("object") == kind


def _empty_update(body: bytes) -> bool:
    """An Update of a kind the gateway does not handle (`{"update_id": 3}`) may be acknowledged."""
    doc = _json_object(body)
    return (doc is not None and type(doc.get("update_id")) is int
            and "message" not in doc and "callback_query" not in doc)


async def _messenger_windows(ms: Any) -> int:
    count: int = await ms.service.store.db.fetchval("SELECT COUNT(*) FROM windows")
    return count


@dataclass(frozen=True)
class IngressCase:
    """What the suite needs to know of one channel's webhook."""

    name: str  # the integration type, as in /webhooks/{name}/{integrationId}
    service: str
    start: Callable[[System, Bus], Awaitable[Any]]
    genuine: bytes  # a delivery of one text message saying "genuine"
    secret: str
    headers: Callable[[bytes, str, str | None], dict[str, str]]  # (body, public URL, secret or unsigned)
    missing_status: int  # no signature at all…
    forged_status: int  # …or one made with another secret
    wrong_shape: bytes  # parseable, correctly signed, not this platform's shape
    max_body: int
    broken: st.SearchStrategy[bytes]  # signed deliveries whose item is malformed
    may_accept: Callable[[bytes], bool] = lambda body: False  # signed garbage that is rightly a 200 no-op
    oversized: Callable[[int], bytes] = lambda n: b"{" + b" " * n + b"}"
    truncated_signed: bool = True  # a cut JSON body is never valid; a cut form may be
    extra_paths: tuple[str, ...] = ()  # other webhook endpoints of the integration
    body_signed: bool = True  # the signature covers the body (not so Telegram's secret header)
    kept_elsewhere: Callable[[Any], Awaitable[int]] | None = None  # rows the channel stores of its own


CASES = [
    IngressCase("whatsapp", "whatsapp", start_whatsapp, WA_GENUINE, WA_SECRET, _meta_headers, 401, 401,
                json.dumps({"object": "page", "entry": []}).encode(), WHATSAPP_MAX_BODY, WA_BROKEN,
                may_accept=_meta_notification("whatsapp_business_account")),
    IngressCase("messenger", "messenger", start_messenger, MS_GENUINE, MS_SECRET, _meta_headers, 401, 403,
                json.dumps({"object": "whatsapp_business_account", "entry": []}).encode(), MESSENGER_MAX_BODY,
                MS_BROKEN, may_accept=_meta_notification("page"), kept_elsewhere=_messenger_windows),
    IngressCase("twilio", "sms", start_sms, SMS_GENUINE, AUTH_TOKEN, _twilio_headers, 403, 403,
                urlencode([(k, v) for k, v in SMS_FORM if "Sid" not in k or k == "AccountSid"]).encode(),
                SMS_MAX_BODY, SMS_BROKEN, oversized=lambda n: b"Body=" + b"x" * n, truncated_signed=False,
                extra_paths=("/status",)),
    IngressCase("telegram", "telegram", start_telegram, TG_GENUINE, TG_SECRET, _telegram_headers, 401, 401,
                b'{"update_id":"x"}', TELEGRAM_MAX_BODY, TG_BROKEN, may_accept=_empty_update, body_signed=False),
]


@dataclass
class Env:
    case: IngressCase
    channel: ChannelEnv

    @property
    def url(self) -> str:
        return self.channel.webhook_url

    def post(self, http: httpx.AsyncClient, body: bytes, secret: str | None = "", url: str | None = None,
             content_type: str | None = None) -> Awaitable[httpx.Response]:
        """POST `body` signed with the integration's secret (default), another secret, or none."""
        target = url or self.url
        headers = self.case.headers(body, target, self.case.secret if secret == "" else secret)
        if content_type is not None:
            headers["Content-Type"] = content_type
        return http.post(target, content=body, headers=headers)

    async def stored(self) -> int:
        total = 0
        for stream in (subjects.INBOUND, subjects.STATUS):
            total += (await self.channel.bus.js.stream_info(stream.name)).state.messages
        return total


@pytest.fixture(params=CASES, ids=lambda case: case.name)
async def env(request: pytest.FixtureRequest, system: System, bus: Bus) -> AsyncIterator[Env]:
    case: IngressCase = request.param
    yield Env(case, await case.start(system, bus))


async def test_the_same_delivery_twice_is_one_message(env: Env) -> None:
    async with httpx.AsyncClient() as http:
        first = await env.post(http, env.case.genuine)
        again = await env.post(http, env.case.genuine)  # the platform's retry
    assert first.status_code == again.status_code == 200
    [message] = await env.channel.inbound()
    assert message.content == TextContent(text="genuine")


async def test_unsigned_or_forged_deliveries_are_refused_and_queue_nothing(env: Env) -> None:
    genuine = env.case.genuine
    forged = genuine.replace(b"genuine", b"forged!")
    async with httpx.AsyncClient() as http:
        signed = env.case.headers(genuine, env.url, env.case.secret)
        missing = await env.post(http, forged, secret=None)
        other_secret = await env.post(http, forged, secret="not-the-secret-0123456789")
        # A genuine signature over another body (Telegram's secret is a header that signs no body.)
        old_signature = await http.post(env.url, content=forged, headers=signed) if env.case.body_signed else None
        assert await env.stored() == 0
        accepted = await http.post(env.url, content=genuine, headers=signed)
    assert missing.status_code == env.case.missing_status
    assert missing.json()["errors"][0]["code"] == ("forbidden" if env.case.missing_status == 403 else "unauthorized")
    assert other_secret.status_code == env.case.forged_status
    if old_signature is not None:
        assert old_signature.status_code == env.case.forged_status
    assert accepted.status_code == 200
    [only] = await env.channel.inbound()
    assert only.content == TextContent(text="genuine")


async def test_http_errors_carry_suncos_error_body(env: Env) -> None:
    case = env.case
    unknown_url = f"{env.channel.system.base_url}/webhooks/{case.name}/{new_id()}"
    async with httpx.AsyncClient() as http:
        unknown = await env.post(http, case.genuine, url=unknown_url)
        wrong_type = await env.post(http, case.genuine, content_type="text/plain")
        too_big = await env.post(http, case.oversized(case.max_body + 1))
        wrong_shape = await env.post(http, case.wrong_shape)
        get = await http.get(env.url)
    assert (unknown.status_code, wrong_type.status_code, too_big.status_code, wrong_shape.status_code) == (
        404, 415, 413, 400)
    for refused in (unknown, wrong_type, too_big, wrong_shape):
        [error] = refused.json()["errors"]
        assert error["code"] and error["title"]
    assert wrong_shape.json()["errors"][0]["code"] == "bad_request"
    assert get.status_code in (403, 405)  # Meta's GET is the subscription handshake, without its token
    assert await env.stored() == 0


def _hostile_bodies(case: IngressCase) -> st.SearchStrategy[tuple[bytes, bool]]:
    """(body, signed?) pairs whose content must never be accepted."""
    genuine = case.genuine
    truncated_signing = st.booleans() if case.truncated_signed else st.just(False)
    return st.one_of(
        st.tuples(st.binary(max_size=300), st.booleans()),  # arbitrary bytes
        st.tuples(st.integers(1, len(genuine) - 1).map(lambda n: genuine[:n]), truncated_signing),
        st.tuples(json_value.map(lambda v: json.dumps(v).encode()), st.booleans()),  # JSON of any shape
        st.tuples(st.just(genuine), st.just(False)),  # a genuine body without a valid signature
        st.tuples(case.broken, st.just(True)),  # signed, one malformed item
        st.tuples(st.integers(case.max_body + 1, case.max_body * 3).map(case.oversized), st.booleans()),
    )


async def test_webhook_fuzz_never_accepts_garbage(env: Env) -> None:
    case = env.case
    collected: list[tuple[bytes, bool]] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(hostile=_hostile_bodies(case))
    def draw(hostile: tuple[bytes, bool]) -> None:
        collected.append(hostile)

    draw()
    assert len(collected) >= 30
    urls = [env.url + path for path in ("", *case.extra_paths)]
    rejected = 0
    async with httpx.AsyncClient(timeout=10) as http:
        for index, (body, signed) in enumerate(collected):
            url = urls[index % len(urls)]
            resp = await env.post(http, body, secret="" if signed else "not-the-secret-0123456789", url=url)
            if signed and case.may_accept(body) and resp.status_code == 200:
                continue
            assert 400 <= resp.status_code < 500 and resp.status_code != 404, (resp.status_code, url, body[:200])
            rejected += 1
        assert rejected >= len(collected) // 2
        assert await env.stored() == 0
        if case.kept_elsewhere is not None:
            assert await case.kept_elsewhere(env.channel) == 0
        base = env.channel.system
        assert (await http.get(f"{base.service_url(case.service)}/healthz")).status_code == 200
        assert (await http.get(f"{base.base_url}/_svc/{case.service}/readyz")).status_code == 200
        assert (await env.post(http, case.genuine)).status_code == 200  # …and it still takes a genuine one
    [message] = await env.channel.inbound()
    assert message.content == TextContent(text="genuine")

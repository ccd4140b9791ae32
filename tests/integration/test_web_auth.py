"""The web service's SDK API alone (identity + web, the integration record put in KV as
`conversations` publishes it, and `conversations.history` answered for the one conversation the
tokens name, as `conversations` answers a participant): auth, origin checks, durable message
posts, activity, statics."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.msg import Msg

from shared import subjects
from shared.bus import Bus
from shared.messages import channel
from shared.messages import conversation as conv
from shared.records import ENCODER as RECORD_ENCODER
from shared.records import IntegrationRecord
from shared.sdk import ErrorFrame, decode_frame
from shared.sdk_service import SdkSettings, issue_tokens, new_session_claims
from shared.sunco import ConversationRef
from tests.harness import SDK_TOKEN_SECRET

APP = "64b000000000000000000001"
WEB = "64b0000000000000000000a1"


async def put_integration(bus: Bus, record: IntegrationRecord) -> None:
    kv = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
    await kv.put(record.id, RECORD_ENCODER.encode(record))


SETTINGS = SdkSettings(token_secret=SDK_TOKEN_SECRET, ping_interval=20, socket_queue_size=256, request_timeout=5)


def token(conversation: str = "c" * 24, app: str = APP, integration: str = WEB,
          secret: str = SDK_TOKEN_SECRET) -> str:
    claims = new_session_claims(app, integration, "cu-1", time.time(), user="u" * 24, client="k" * 24,
                                conversation=conversation)
    return issue_tokens(dataclasses.replace(SETTINGS, token_secret=secret), claims, time.time()).session_token


async def inbound_messages(bus: Bus, integration: str = WEB) -> list[tuple[Any, str | None]]:
    """Everything on the integration's inbound subject so far (decoded, with its Nats-Msg-Id)."""
    sub = await bus.js.subscribe(subjects.integration_subjects("inbound", "web", integration), ordered_consumer=True)
    out: list[tuple[Any, str | None]] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.3)
            except TimeoutError:
                return out
            out.append((channel.decode(msg.data), (msg.headers or {}).get("Nats-Msg-Id")))
    finally:
        await sub.unsubscribe()


async def answer_history(msg: Msg) -> None:
    """`conversations.history` as `conversations` answers it: the tokens' conversation exists and
    its user is a participant; any other is not found."""
    request = conv.decode_request(msg.data)
    assert isinstance(request, conv.GetHistory)
    if request.conversation_id == "c" * 24 and request.user_id == "u" * 24:
        reply: conv.ConversationRequest = conv.HistoryPage(
            conversation=ConversationRef(id=request.conversation_id, type="personal"), messages=[])
    else:
        reply = conv.ConversationError(status=404, code="conversation_not_found", title="Conversation not found")
    await msg.respond(conv.ENCODER.encode(reply))


@pytest.fixture
async def web(system: Any, bus: Bus) -> Any:
    await bus.nc.subscribe(subjects.CONVERSATIONS_HISTORY, cb=answer_history)
    await put_integration(bus, IntegrationRecord(id=WEB, app_id=APP, type="web",
                                                 config={"originWhitelist": ["https://shop.example"]}))
    await put_integration(bus, IntegrationRecord(id="64b0000000000000000000b2", app_id=APP, type="whatsapp"))
    await system.start("identity", "web")
    return system


async def test_requests_without_a_valid_token_are_401(web: Any) -> None:
    base = f"{web.base_url}/sdk/v1/apps/{APP}/conversations/{'c' * 24}"
    forged = token(secret="not-the-server-secret-000000")
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer nonsense"}, {"Authorization": f"Bearer {forged}"},
                        {"Authorization": f"Bearer {token(app='64b000000000000000000009')}"}):
            async with http.get(f"{base}/messages", headers=headers) as resp:
                assert resp.status == 401
                body = await resp.json()
                assert body["errors"][0]["code"] == "unauthorized"
            async with http.post(f"{base}/messages", headers=headers,
                                 json={"clientMessageId": str(uuid.uuid4()), "text": "hi"}) as resp:
                assert resp.status == 401
        # The socket reports it in-band (browsers cannot see a refused handshake's status):
        # an error frame, then close code 4000 + status (asserted on the service itself, as the
        # front door's proxy does not relay close codes).
        for socket_base in (base, base.replace(web.base_url, web.service_url("web"))):
            async with http.ws_connect(f"{socket_base}/socket?token=nonsense") as ws:
                frame = decode_frame((await ws.receive(timeout=5)).data)
                assert isinstance(frame, ErrorFrame) and frame.status == 401
                closing = await ws.receive(timeout=5)
                assert closing.type == aiohttp.WSMsgType.CLOSE
        async with http.ws_connect(f"{web.service_url('web')}/sdk/v1/apps/{APP}/conversations/{'c' * 24}"
                                   "/socket?token=nonsense") as ws:
            await ws.receive(timeout=5)
            closing = await ws.receive(timeout=5)
            assert closing.data == 4401
        async with http.get(f"{base}/socket?token=nonsense") as resp:  # not an upgrade
            assert resp.status == 401


async def test_session_refused_for_unknown_or_non_web_integration(web: Any) -> None:
    async with aiohttp.ClientSession() as http:
        for integration in ("64b0000000000000000000ff", "64b0000000000000000000b2", "../../etc"):
            async with http.post(f"{web.base_url}/sdk/v1/apps/{APP}/integrations/{integration}/sessions") as resp:
                assert resp.status == 404
        other_app = "64b000000000000000000009"
        async with http.post(f"{web.base_url}/sdk/v1/apps/{other_app}/integrations/{WEB}/sessions") as resp:
            assert resp.status == 404  # the integration belongs to another app


async def test_origin_whitelist_is_enforced(web: Any) -> None:
    url = f"{web.base_url}/sdk/v1/apps/{APP}/conversations/{'c' * 24}/messages"
    body = {"clientMessageId": str(uuid.uuid4()), "text": "hi"}
    auth = {"Authorization": f"Bearer {token()}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body, headers={**auth, "Origin": "https://evil.example"}) as resp:
            assert resp.status == 403
        async with http.post(f"{web.base_url}/sdk/v1/apps/{APP}/integrations/{WEB}/sessions",
                             headers={"Origin": "https://evil.example"}) as resp:
            assert resp.status == 403
        async with http.post(url, json=body, headers={**auth, "Origin": "https://shop.example"}) as resp:
            assert resp.status == 202
            assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
        async with http.options(url, headers={"Origin": "https://shop.example",
                                              "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": "authorization,content-type"}) as resp:
            assert resp.status == 204
            assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]


async def test_post_message_is_durable_and_idempotent(web: Any, bus: Bus) -> None:
    conversation = "c" * 24
    url = f"{web.base_url}/sdk/v1/apps/{APP}/conversations/{conversation}/messages"
    client_message_id = str(uuid.uuid4())
    auth = {"Authorization": f"Bearer {token(conversation)}"}
    async with aiohttp.ClientSession() as http:
        answers = []
        for _ in range(2):  # a retried POST
            async with http.post(url, json={"clientMessageId": client_message_id, "text": "hello"},
                                 headers=auth) as resp:
                assert resp.status == 202
                answers.append(await resp.json())
        assert [a.get("duplicate", False) for a in answers] == [False, True]
        for bad in ({"clientMessageId": str(uuid.uuid4()), "text": "x" * 4097},
                    {"clientMessageId": str(uuid.uuid4()), "text": ""},
                    {"clientMessageId": "no", "text": "hi"},
                    {"text": "hi"}):
            async with http.post(url, json=bad, headers=auth) as resp:
                assert resp.status == 400
        async with http.post(url, data=b"{" + b" " * (101 * 1024) + b"}", headers={
                **auth, "Content-Type": "application/json"}) as resp:
            assert resp.status == 413
        async with http.post(url.replace("/messages", "/activity"), json={"type": "typing:start"},
                             headers=auth) as resp:
            assert resp.status == 202
        async with http.post(url.replace("/messages", "/activity"), json={"type": "dancing"},
                             headers=auth) as resp:
            assert resp.status == 400
    seen = await inbound_messages(bus)
    assert len(seen) == 2
    message, msg_id = seen[0]
    assert isinstance(message, channel.InboundMessage)
    assert msg_id == f"web:{client_message_id}"
    assert (message.channel, message.client_type, message.provider_message_id) == ("web", "sdk", client_message_id)
    assert (message.user_id, message.client_id, message.conversation_id) == ("u" * 24, "k" * 24, conversation)
    assert (message.channel_user_id, message.app_id, message.integration_id) == ("cu-1", APP, WEB)
    assert msgspec.to_builtins(message.content) == {"type": "text", "text": "hello"}
    activity, _ = seen[1]
    assert isinstance(activity, channel.InboundActivity)
    assert (activity.activity, activity.conversation_id, activity.user_id) == ("typing:start", conversation, "u" * 24)


async def test_widget_files_are_served(web: Any) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{web.base_url}/widget/threadline.js") as resp:
            assert resp.status == 200
            assert resp.content_type == "application/javascript"
            assert "Threadline" in await resp.text()
        async with http.get(f"{web.base_url}/widget/nope.js") as resp:
            assert resp.status == 404


async def test_integration_created_after_start_is_found(web: Any, bus: Bus) -> None:
    fresh = "64b0000000000000000000c3"
    await put_integration(bus, IntegrationRecord(id=fresh, app_id=APP, type="web", display_name="Fresh shop"))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{web.base_url}/sdk/v1/apps/{APP}/integrations/{fresh}/config") as resp:
            assert resp.status == 200
            # With the largest file the widget may upload (THREADLINE_SDK_MAX_UPLOAD_BYTES).
            assert await resp.json() == {"integrationId": fresh, "displayName": "Fresh shop",
                                         "maxUploadBytes": 25 * 1024 * 1024}

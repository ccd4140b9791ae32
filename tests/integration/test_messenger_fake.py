"""The fake Messenger Platform on its own (no NATS): pywa's validator proves its webhook signatures,
its Send API answers like Graph (bodies checked against Meta's limits, errors, the window, sender
actions), whatever the messenger channel renders passes those checks, and `sync` follows the records."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web
from pywa.utils import HUB_SIG, webhook_updates_validator

from services.messenger import handlers as messenger_handlers
from services.sandbox.messenger_fake import FakeMessenger, gateway_base, points_at_sandbox
from shared.ids import new_id
from shared.records import IntegrationRecord
from shared.sunco import (
    BuyAction,
    CarouselContent,
    FormContent,
    FormField,
    ImageContent,
    Item,
    LinkAction,
    ListContent,
    LocationRequestAction,
    PostbackAction,
    ReplyAction,
    TextContent,
    WebviewAction,
)
from threadline.natsserver import free_port

APP_SECRET = "fake-ms-secret-0123456789"
TOKEN = "EAAfakepagetoken0123456789"
PAGE_ID = "104857600999999"
VERIFY_TOKEN = "verify-me"
PSID = "7000000000000001"
INTEGRATION = "int1"


@dataclass
class Receiver:
    """A loopback webhook receiver that records what the fake posts."""

    port: int
    bodies: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[tuple[bytes, dict[str, str]]]:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.bodies) >= count), timeout)
        return list(self.bodies)


@dataclass
class Served:
    fake: FakeMessenger
    base: str  # the sandbox prefix URL

    @property
    def send_url(self) -> str:
        return f"{self.base}/messenger-graph/v23.0/{PAGE_ID}/messages"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver(free_port())

    async def hook(request: web.Request) -> web.Response:
        if request.method == "GET":
            ok = request.query.get("hub.verify_token") == VERIFY_TOKEN
            return web.Response(text=request.query.get("hub.challenge", "") if ok else "Forbidden",
                                status=200 if ok else 403)
        body = await request.read()
        async with recv.arrived:
            recv.bodies.append((body, dict(request.headers)))
            recv.arrived.notify_all()
        return web.Response(text="EVENT_RECEIVED")

    app = web.Application()
    app.router.add_route("*", "/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", recv.port).start()
    try:
        yield recv
    finally:
        await runner.cleanup()


@pytest.fixture
async def served(receiver: Receiver) -> AsyncIterator[Served]:
    fake = FakeMessenger("http://gateway.invalid")
    fake.add_account(INTEGRATION, PAGE_ID, APP_SECRET, TOKEN, receiver.url, verify_token=VERIFY_TOKEN)
    app = web.Application()
    app.router.add_routes(fake.routes("/sandbox"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Served(fake, f"http://127.0.0.1:{port}/sandbox")
    finally:
        await fake.close()
        await runner.cleanup()


async def test_webhooks_are_signed_as_pywa_expects(served: Served, receiver: Receiver) -> None:
    result = await served.fake.send_inbound(INTEGRATION, {"from": PSID, "text": "café 😮"})
    assert result["webhookStatus"] == 200
    [(body, headers)] = await receiver.wait_for(1)
    assert webhook_updates_validator(APP_SECRET, body, headers[HUB_SIG])
    assert not webhook_updates_validator("another-secret", body, headers[HUB_SIG])
    assert not webhook_updates_validator(APP_SECRET, body + b" ", headers[HUB_SIG])
    # Meta's escaping: lowercase \u escapes, emoji as a surrogate pair, signed over those bytes.
    assert b"caf\\u00e9 \\ud83d\\ude2e" in body
    legacy = "sha1=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha1).hexdigest()
    assert headers["X-Hub-Signature"] == legacy
    assert headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert doc["object"] == "page"
    [entry] = doc["entry"]
    assert entry["id"] == PAGE_ID and isinstance(entry["time"], int)
    [event] = entry["messaging"]
    assert event["sender"] == {"id": PSID} and event["recipient"] == {"id": PAGE_ID}
    assert abs(event["timestamp"] / 1000 - time.time()) < 5  # milliseconds
    assert event["message"]["mid"] == result["mid"] and result["mid"].startswith("m_")
    assert event["message"]["text"] == "café 😮"


async def test_ref_postback_referral_and_quick_reply_shapes(served: Served, receiver: Receiver) -> None:
    await served.fake.send_inbound(INTEGRATION, {"from": PSID, "ref": "abc-123"})
    await served.fake.send_inbound(INTEGRATION, {"from": PSID, "ref": "def_456"})
    await served.fake.send_inbound(INTEGRATION, {"from": PSID, "text": "Yes", "quickReply": "Y"})
    deliveries = await receiver.wait_for(3)
    for body, headers in deliveries:
        assert webhook_updates_validator(APP_SECRET, body, headers[HUB_SIG])
    events = [json.loads(body)["entry"][0]["messaging"][0] for body, _ in deliveries]
    assert events[0]["postback"]["payload"] == "GET_STARTED"
    assert events[0]["postback"]["referral"] == {"ref": "abc-123", "source": "SHORTLINK", "type": "OPEN_THREAD"}
    assert events[1]["referral"] == {"ref": "def_456", "source": "SHORTLINK", "type": "OPEN_THREAD"}
    assert "postback" not in events[1] and "message" not in events[1]
    assert events[2]["message"]["quick_reply"] == {"payload": "Y"} and events[2]["message"]["text"] == "Yes"


async def test_verify_handshake_driver(served: Served) -> None:
    assert await served.fake.verify_webhook(INTEGRATION, "987") == (200, "987")
    status, _ = await served.fake.verify_webhook(INTEGRATION, "987", verify_token="wrong")
    assert status == 403


async def test_send_api_json_and_form_bodies(served: Served, receiver: Receiver) -> None:
    await served.fake.send_inbound(INTEGRATION, {"from": PSID, "text": "hi"})
    async with httpx.AsyncClient() as http:
        by_bearer = await http.post(served.send_url, headers={"Authorization": f"Bearer {TOKEN}"}, json={
            "recipient": {"id": PSID}, "messaging_type": "RESPONSE", "message": {"text": "hello, world"}})
        # Meta's curl example: form fields holding JSON strings, token in the query, `/me/`.
        by_form = await http.post(f"{served.base}/messenger-graph/v23.0/me/messages",
                                  params={"access_token": TOKEN},
                                  data={"recipient": json.dumps({"id": PSID}), "messaging_type": "RESPONSE",
                                        "message": json.dumps({"text": "form body"})})
        typing = await http.post(served.send_url, params={"access_token": TOKEN}, json={
            "recipient": {"id": PSID}, "sender_action": "typing_on"})
    assert by_bearer.status_code == 200 and by_form.status_code == 200
    assert set(by_bearer.json()) == {"recipient_id", "message_id"}
    assert by_bearer.json()["recipient_id"] == PSID and by_bearer.json()["message_id"].startswith("m_")
    assert typing.json() == {"recipient_id": PSID}
    assert [b["message"]["text"] for b in served.fake.outbox(INTEGRATION, PSID)] == ["hello, world", "form body"]
    # Each accepted message is followed by a signed delivery receipt naming it.
    deliveries = await receiver.wait_for(3)
    receipts = [json.loads(b)["entry"][0]["messaging"][0] for b, _ in deliveries[1:]]
    assert {r["delivery"]["mids"][0] for r in receipts} == {by_bearer.json()["message_id"],
                                                            by_form.json()["message_id"]}


def _error(resp: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = resp.json()["error"]
    assert error["type"] == "OAuthException" and error["fbtrace_id"]
    return error


async def test_send_api_errors_in_graph_envelope(served: Served) -> None:
    body = {"recipient": {"id": PSID}, "messaging_type": "RESPONSE", "message": {"text": "x"}}
    async with httpx.AsyncClient() as http:
        no_token = await http.post(served.send_url, json=body)
        bad_token = await http.post(served.send_url, params={"access_token": "nope"}, json=body)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        unknown_user = await http.post(served.send_url, headers=auth, json=body)
        served.fake.person(INTEGRATION, PSID)  # known, but never wrote: the window is closed
        closed = await http.post(served.send_url, headers=auth, json=body)
        no_type = await http.post(served.send_url, headers=auth, json={"recipient": {"id": PSID},
                                                                       "message": {"text": "x"}})
        too_long = await http.post(served.send_url, headers=auth, json={**body, "message": {"text": "x" * 2001}})
        served.fake.fail_next(INTEGRATION, 613)
        limited = await http.post(served.send_url, headers=auth, json=body)
    assert no_token.status_code == bad_token.status_code == 401
    assert _error(no_token)["code"] == 190
    assert unknown_user.status_code == 400
    assert (_error(unknown_user)["code"], _error(unknown_user)["error_subcode"]) == (100, 2018001)
    window = _error(closed)
    assert closed.status_code == 400 and (window["code"], window["error_subcode"]) == (10, 2018278)
    assert window["message"].startswith("(#10) This message is sent outside of allowed window.")
    assert _error(no_type)["code"] == 100 and "messaging_type" in _error(no_type)["message"]
    assert _error(too_long)["code"] == 100
    assert _error(limited)["code"] == 613
    assert served.fake.outbox(INTEGRATION, PSID) == []


async def test_window_enforcement_standard_and_human_agent(served: Served) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    text = {"recipient": {"id": PSID}, "message": {"text": "late"}}
    served.fake.person(INTEGRATION, PSID).last_user_at = time.time() - 30 * 3600
    async with httpx.AsyncClient() as http:
        response = await http.post(served.send_url, headers=auth, json={**text, "messaging_type": "RESPONSE"})
        agent = await http.post(served.send_url, headers=auth,
                                json={**text, "messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT"})
        served.fake.person(INTEGRATION, PSID).last_user_at = time.time() - 8 * 86400
        agent_late = await http.post(served.send_url, headers=auth,
                                     json={**text, "messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT"})
        update = await http.post(served.send_url, headers=auth,
                                 json={**text, "messaging_type": "MESSAGE_TAG", "tag": "ACCOUNT_UPDATE"})
        bad_tag = await http.post(served.send_url, headers=auth,
                                  json={**text, "messaging_type": "MESSAGE_TAG", "tag": "PROMO"})
    assert response.status_code == 400 and _error(response)["code"] == 10
    assert agent.status_code == 200
    assert agent_late.status_code == 400 and _error(agent_late)["error_subcode"] == 2018278
    assert update.status_code == 200
    assert bad_tag.status_code == 400 and _error(bad_tag)["code"] == 100


async def test_scripting_routes_and_outbox(served: Served, receiver: Receiver) -> None:
    prefix = f"{served.base}/messenger/{INTEGRATION}"
    async with httpx.AsyncClient() as http:
        sent = await http.post(f"{prefix}/inbound", json={"from": PSID, "text": "hi", "name": "Ada"})
        assert sent.status_code == 200 and sent.json()["webhookStatus"] == 200
        ok = await http.post(served.send_url, headers={"Authorization": f"Bearer {TOKEN}"}, json={
            "recipient": {"id": PSID}, "messaging_type": "RESPONSE", "message": {"text": "answer"}})
        assert ok.status_code == 200
        outbox = await http.get(f"{prefix}/outbox", params={"to": PSID})
        assert outbox.json() == {"messages": [{"recipient": {"id": PSID}, "messaging_type": "RESPONSE",
                                               "message": {"text": "answer"}}]}
        thread = (await http.get(f"{prefix}/thread", params={"to": PSID})).json()
        assert [m["direction"] for m in thread["messages"]] == ["in", "out"] and thread["person"]["name"] == "Ada"
        read = await http.post(f"{prefix}/read", json={"to": PSID})
        assert read.json() == {"webhookStatus": 200}
        bad = await http.post(f"{prefix}/inbound", json={"from": "has spaces", "text": "x"})
        assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == "bad_request"
        empty = await http.post(f"{prefix}/inbound", json={"from": PSID})
        assert empty.status_code == 400
        unknown = await http.get(f"{served.base}/messenger/nope/outbox", params={"to": PSID})
        assert unknown.status_code == 404 and unknown.json()["errors"][0]["code"] == "not_found"
        info = (await http.get(prefix)).json()
        assert info["pageId"] == PAGE_ID and info["link"] == f"https://m.me/{PAGE_ID}"
    bodies = await receiver.wait_for(3)
    read_event = json.loads(bodies[-1][0])["entry"][0]["messaging"][0]
    assert set(read_event["read"]) == {"watermark"}


def test_sync_follows_records_pointing_at_the_sandbox() -> None:
    fake = FakeMessenger(gateway_base("https://gw.example/sandbox"))
    ours = IntegrationRecord(id=new_id(), app_id=new_id(), type="messenger", config={
        "pageId": "1", "appSecret": "s", "pageAccessToken": "t",
        "baseUrl": "https://gw.example/sandbox/messenger-graph"})
    real = IntegrationRecord(id=new_id(), app_id=new_id(), type="messenger", config={
        "pageId": "2", "appSecret": "s", "pageAccessToken": "t", "baseUrl": "https://graph.facebook.com"})
    fake.sync([ours, real])
    assert set(fake.accounts) == {ours.id}
    assert fake.accounts[ours.id].webhook_url == f"https://gw.example/webhooks/messenger/{ours.id}"
    fake.sync([])
    assert fake.accounts == {}
    assert points_at_sandbox("http://x/sandbox/messenger-graph/") and not points_at_sandbox("http://x/sandbox/graph")


# --- what Meta accepts in a message, and sender actions ---------------------------------------------------

def _button_template(text: str = "Pick", buttons: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"attachment": {"type": "template", "payload": {"template_type": "button", "text": text, "buttons": (
        buttons if buttons is not None else [{"type": "postback", "title": "Yes", "payload": "Y"}])}}}


def _generic(*elements: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"attachment": {"type": "template", "payload": {"template_type": "generic", "elements": list(elements),
                                                           **extra}}}


CARD = {"title": "Beans", "subtitle": "Dark roast", "image_url": "https://shop.example/b.jpg",
        "default_action": {"type": "web_url", "url": "https://shop.example/b"},
        "buttons": [{"type": "postback", "title": "Order", "payload": "ORDER"},
                    {"type": "web_url", "title": "Reviews", "url": "https://shop.example/r",
                     "webview_height_ratio": "tall"},
                    {"type": "phone_number", "title": "Call", "payload": "+15551234567"}]}


def _reply(title: str = "Yes", payload: str = "Y", **extra: Any) -> dict[str, Any]:
    return {"content_type": "text", "title": title, "payload": payload, **extra}


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("quick reply title over 20", {"text": "q", "quick_replies": [_reply("t" * 21)]}, "[title]"),
    ("quick reply payload over 1000", {"text": "q", "quick_replies": [_reply(payload="p" * 1001)]}, "[payload]"),
    ("quick reply without payload", {"text": "q", "quick_replies": [{"content_type": "text", "title": "x"}]},
     "[payload]"),
    ("14 quick replies", {"text": "q", "quick_replies": [_reply(str(i)) for i in range(14)]}, "quick_replies"),
    ("empty quick replies", {"text": "q", "quick_replies": []}, "quick_replies"),
    ("location quick reply", {"text": "q", "quick_replies": [{"content_type": "location"}]}, "location"),
    ("quick reply icon not a URL", {"text": "q", "quick_replies": [_reply(image_url="javascript:x")]},
     "[image_url]"),
    ("button text over 640", _button_template("t" * 641), "[text]"),
    ("button template without text", _button_template(""), "[text]"),
    ("four buttons", _button_template(buttons=[{"type": "postback", "title": str(i), "payload": str(i)}
                                               for i in range(4)]), "[buttons]"),
    ("no buttons", _button_template(buttons=[]), "[buttons]"),
    ("button title over 20", _button_template(buttons=[{"type": "postback", "title": "t" * 21, "payload": "p"}]),
     "[title]"),
    ("postback payload over 1000", _button_template(buttons=[{"type": "postback", "title": "t",
                                                              "payload": "p" * 1001}]), "[payload]"),
    ("web_url not http", _button_template(buttons=[{"type": "web_url", "title": "t", "url": "javascript:x"}]),
     "[url]"),
    ("bad webview ratio", _button_template(buttons=[{"type": "web_url", "title": "t", "url": "https://x",
                                                     "webview_height_ratio": "huge"}]), "webview_height_ratio"),
    ("unknown button type", _button_template(buttons=[{"type": "call_me", "title": "t"}]), "[type]"),
    ("phone without +", _button_template(buttons=[{"type": "phone_number", "title": "t", "payload": "555"}]),
     "[payload]"),
    ("eleven elements", _generic(*[{**CARD, "title": str(i)} for i in range(11)]), "[elements]"),
    ("no elements", _generic(), "[elements]"),
    ("element title over 80", _generic({**CARD, "title": "t" * 81}), "[title]"),
    ("element subtitle over 80", _generic({**CARD, "subtitle": "s" * 81}), "[subtitle]"),
    ("element without title", _generic({"subtitle": "s"}), "[title]"),
    ("element with only a title", _generic({"title": "alone"}), "Incomplete element data"),
    ("element image not a URL", _generic({**CARD, "image_url": "data:image/png;base64,AA"}), "[image_url]"),
    ("default action with a title", _generic({**CARD, "default_action": {
        "type": "web_url", "url": "https://x", "title": "t"}}), "default_action"),
    ("four card buttons", _generic({**CARD, "buttons": CARD["buttons"] + CARD["buttons"][:1]}), "[buttons]"),
    ("bad aspect ratio", _generic(CARD, image_aspect_ratio="wide"), "image_aspect_ratio"),
    ("unknown template", {"attachment": {"type": "template", "payload": {"template_type": "list"}}},
     "template_type"),
    ("image without url", {"attachment": {"type": "image", "payload": {"is_reusable": True}}}, "[url]"),
    ("text and attachment", {"text": "x", **_button_template()}, "either text or attachment"),
]


@pytest.mark.parametrize(("what", "message", "named"), REFUSED, ids=[r[0] for r in REFUSED])
async def test_send_api_refuses_what_meta_refuses(served: Served, what: str, message: dict[str, Any],
                                                   named: str) -> None:
    served.fake.person(INTEGRATION, PSID).last_user_at = time.time()
    async with httpx.AsyncClient() as http:
        resp = await http.post(served.send_url, headers={"Authorization": f"Bearer {TOKEN}"}, json={
            "recipient": {"id": PSID}, "messaging_type": "RESPONSE", "message": message})
    assert resp.status_code == 400, what
    error = _error(resp)
    assert error["code"] == 100 and error["message"].startswith("(#100)") and named in error["message"]
    assert served.fake.outbox(INTEGRATION, PSID) == []


async def test_templates_within_the_limits_are_accepted_and_kept(served: Served) -> None:
    served.fake.person(INTEGRATION, PSID).last_user_at = time.time()
    messages = [
        {**_generic(*[{**CARD, "title": "t" * 80, "subtitle": "s" * 80}] * 10, image_aspect_ratio="square"),
         "quick_replies": [_reply(str(i), "p" * 1000) for i in range(13)]},
        _button_template("t" * 640, [{"type": "postback", "title": "t" * 20, "payload": "p" * 1000},
                                     {"type": "web_url", "title": "Site", "url": "https://x.example"},
                                     {"type": "phone_number", "title": "Call", "payload": "+15551234567"}]),
        _generic({"title": "Just a subtitle", "subtitle": "s"}),
        {"text": "x" * 2000, "quick_replies": [_reply(image_url="https://x.example/i.png"),
                                               {"content_type": "user_email"}]},
    ]
    async with httpx.AsyncClient() as http:
        for message in messages:
            resp = await http.post(served.send_url, headers={"Authorization": f"Bearer {TOKEN}"}, json={
                "recipient": {"id": PSID}, "messaging_type": "RESPONSE", "message": message})
            assert resp.status_code == 200, resp.text
    assert [b["message"] for b in served.fake.outbox(INTEGRATION, PSID)] == messages


async def test_sender_actions_are_recorded_and_shown(served: Served) -> None:
    served.fake.person(INTEGRATION, PSID).last_user_at = time.time()
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def action(name: Any, **extra: Any) -> httpx.Response:
        async with httpx.AsyncClient() as http:
            return await http.post(served.send_url, headers=auth,
                                   json={"recipient": {"id": PSID}, "sender_action": name, **extra})

    async def person() -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            thread = (await http.get(f"{served.base}/messenger/{INTEGRATION}/thread", params={"to": PSID})).json()
        result: dict[str, Any] = thread["person"]
        assert [a["action"] for a in thread["senderActions"]] == served.fake.sender_actions(INTEGRATION, PSID)
        return result

    on = await action("typing_on")
    assert on.status_code == 200 and on.json() == {"recipient_id": PSID}
    assert (await person())["typing"] is True
    async with httpx.AsyncClient() as http:  # a message ends the typing indicator, as on Messenger
        sent = await http.post(served.send_url, headers=auth, json={
            "recipient": {"id": PSID}, "messaging_type": "RESPONSE", "message": {"text": "here"}})
    assert sent.status_code == 200 and (await person())["typing"] is False
    await action("typing_on")
    await action("typing_off")
    assert (await person())["typing"] is False and (await person())["seenAt"] is None
    seen = await action("mark_seen")
    assert seen.status_code == 200 and (await person())["seenAt"] is not None
    bad = await action("typing_maybe")
    both = await action("typing_on", messaging_type="RESPONSE", message={"text": "x"})
    stranger = await served.fake.send_inbound(INTEGRATION, {"from": "7000000000000009", "text": "hi"})
    assert stranger["webhookStatus"] == 200
    async with httpx.AsyncClient() as http:
        unknown = await http.post(served.send_url, headers=auth,
                                  json={"recipient": {"id": "123"}, "sender_action": "typing_on"})
        no_token = await http.post(served.send_url, json={"recipient": {"id": PSID}, "sender_action": "mark_seen"})
    assert bad.status_code == both.status_code == 400 and _error(bad)["code"] == _error(both)["code"] == 100
    assert (_error(unknown)["code"], _error(unknown)["error_subcode"]) == (100, 2018001)
    assert no_token.status_code == 401
    assert served.fake.sender_actions(INTEGRATION, PSID) == ["typing_on", "typing_on", "typing_off", "mark_seen"]
    assert [b["message"] for b in served.fake.outbox(INTEGRATION, PSID)] == [{"text": "here"}]
    # A scripted failure waits for the next message: the typing indicator before it does not eat it.
    served.fake.fail_next(INTEGRATION, 613)
    assert (await action("typing_on")).status_code == 200
    async with httpx.AsyncClient() as http:
        limited = await http.post(served.send_url, headers=auth, json={
            "recipient": {"id": PSID}, "messaging_type": "RESPONSE", "message": {"text": "later"}})
    assert limited.status_code == 400 and _error(limited)["code"] == 613


RENDERED = [
    TextContent(text="Pick", actions=[ReplyAction(text=f"Choice number {i} here", payload="p" * 1000)
                                      for i in range(20)]),
    TextContent(text="x" * 4096, actions=[WebviewAction(text="Open the catalogue please", uri="https://x.example",
                                                        size="tall"), PostbackAction(text="b", payload="B")]),
    TextContent(text="Where?", actions=[LocationRequestAction(text="Send location")]),
    ImageContent(media_url="https://x.example/a.png", actions=[PostbackAction(text="Like", payload="LIKE")]),
    CarouselContent(items=[Item(title="t" * 128, description="d" * 128, media_url="https://x.example/i.jpg",
                                actions=[PostbackAction(text="a" * 128, payload="p" * 1000),
                                         LinkAction(text="l", uri="https://x.example/l", default=True),
                                         BuyAction(text="Buy", amount=100, uri="https://pay.example")])] * 10),
    CarouselContent(items=[Item(title="only a default link", actions=[
        LinkAction(text="Open", uri="https://x.example/o", default=True)])]),
    ListContent(items=[Item(title="row", actions=[PostbackAction(text="r", payload="R")])] * 3,
                actions=[PostbackAction(text=str(i), payload=str(i)) for i in range(7)]
                + [LinkAction(text=f"link {i}", uri=f"https://x.example/{i}") for i in range(3)]),
    ListContent(items=[Item(title="row", actions=[PostbackAction(text="r", payload="R")])],
                actions=[LinkAction(text=f"link {i}", uri=f"https://x.example/{i}") for i in range(4)]),
    FormContent(fields=[FormField(type="email", name=f"f{i}", label="l" * 128) for i in range(20)]),
]


@pytest.mark.parametrize("content", RENDERED, ids=[f"{type(c).__name__}-{i}" for i, c in enumerate(RENDERED)])
async def test_whatever_threadline_renders_meta_accepts(served: Served, content: Any) -> None:
    """The channel's rendering of content at and past the limits (native, clipped or fallen back)
    always passes the fake's checks."""
    served.fake.person(INTEGRATION, PSID).last_user_at = time.time()
    messages = messenger_handlers.content_messages(content)
    async with httpx.AsyncClient() as http:
        for message in messages:
            resp = await http.post(served.send_url, headers={"Authorization": f"Bearer {TOKEN}"}, json={
                "recipient": {"id": PSID}, "messaging_type": "RESPONSE", "message": message})
            assert resp.status_code == 200, resp.text
    assert len(served.fake.outbox(INTEGRATION, PSID)) == len(messages)

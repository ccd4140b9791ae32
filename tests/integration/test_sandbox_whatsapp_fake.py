"""The fake WhatsApp Cloud API is proven by pywa: its webhooks validate and parse, its Graph API
answers pywa's client with the real shapes, and injected errors raise pywa's exceptions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web
from pywa import WhatsApp, handlers, types
from pywa.errors import ExpiredAccessToken, RateLimitHit, ReEngagementMessage
from pywa.types.templates import BodyText, TemplateLanguage

from tests.fakes.whatsapp import FakeServer, FakeWhatsApp, bsuid_for, serve_fake, signature
from threadline.natsserver import free_port

APP_SECRET = "fake-app-secret-0123456789"
TOKEN = "EAAfaketoken0123456789"
PHONE_ID = "1122334455667"
VERIFY_TOKEN = "verify-me"
CUSTOMER = "+15551234567"


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
        return web.Response(text="ok")

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
async def server(receiver: Receiver) -> AsyncIterator[FakeServer]:
    async with serve_fake() as srv:
        srv.fake.add_account("int1", PHONE_ID, APP_SECRET, TOKEN, "+1 555 000 1111", receiver.url,
                             verify_token=VERIFY_TOKEN)
        yield srv


def pywa_validator() -> WhatsApp:
    return WhatsApp(phone_id=PHONE_ID, token=TOKEN, server=None, verify_token=VERIFY_TOKEN,
                    app_secret=APP_SECRET, validate_updates=True)


def pywa_client(port: int) -> WhatsApp:
    class Rewrite(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            request.url = request.url.copy_with(scheme="http", host="127.0.0.1", port=port,
                                                path="/sandbox/graph" + request.url.path)
            return super().handle_request(request)

    return WhatsApp(phone_id=PHONE_ID, token=TOKEN, session=httpx.Client(transport=Rewrite()), api_version="23.0")


def run_handlers(wa: WhatsApp, body: bytes, *handler_list: Any) -> None:
    wa.add_handlers(*handler_list)
    assert wa.webhook_update_handler(body) == ("ok", 200)


async def test_inbound_text_is_signed_and_parsed_by_pywa(server: FakeServer, receiver: Receiver) -> None:
    wamid, status = await server.fake.send_inbound("int1", {"from": CUSTOMER, "text": "héllo 😮", "name": "Ada"})
    assert status == 200
    [(body, headers)] = await receiver.wait_for(1)
    assert headers["X-Hub-Signature-256"] == signature(APP_SECRET, body)
    assert b"\\u00e9" in body and b"\\ud83d\\ude2e" in body  # Meta's escaped-unicode serialization
    wa = pywa_validator()
    assert wa.webhook_update_validator(body, headers["X-Hub-Signature-256"]) is None
    assert wa.webhook_update_validator(body, "sha256=" + "0" * 64) is not None
    seen: list[types.Message] = []
    run_handlers(wa, body, handlers.MessageHandler(lambda _c, m: seen.append(m)))
    [message] = seen
    assert message.id == wamid
    assert message.text == "héllo 😮"
    assert message.from_user.wa_id == "15551234567"
    assert message.from_user.bsuid == bsuid_for(CUSTOMER)
    assert message.from_user.name == "Ada"
    assert message.metadata.phone_number_id == PHONE_ID


async def test_inbound_image_and_button_reply_parse_in_pywa(server: FakeServer, receiver: Receiver) -> None:
    await server.fake.send_inbound("int1", {"from": CUSTOMER, "image": {"caption": "look"}})
    await server.fake.send_inbound("int1", {"from": CUSTOMER, "buttonReply": {"id": "yes", "title": "Yes"},
                                            "contextId": "wamid.OUT1"})
    bodies = await receiver.wait_for(2)
    images: list[types.Message] = []
    buttons: list[types.CallbackButton] = []
    wa = pywa_validator()
    wa.add_handlers(handlers.MessageHandler(lambda _c, m: images.append(m)),
                    handlers.CallbackButtonHandler(lambda _c, b: buttons.append(b)))
    for body, _headers in bodies:
        assert wa.webhook_update_handler(body) == ("ok", 200)
    [image] = images
    assert image.image is not None and image.image.caption == "look"
    [button] = buttons
    assert button.data == "yes" and button.title == "Yes"
    assert button.reply_to_message is not None and button.reply_to_message.id == "wamid.OUT1"


async def test_pywa_client_sends_and_statuses_validate(server: FakeServer, receiver: Receiver) -> None:
    wa = pywa_client(server.port)
    sent = await asyncio.to_thread(wa.send_message, to="15551234567", text="hello")
    assert sent.id.startswith("wamid.")
    buttons = await asyncio.to_thread(
        wa.send_message, to="15551234567", text="pick",
        buttons=[types.Button(title="Yes", callback_data="yes"), types.Button(title="No", callback_data="no")])
    template = await asyncio.to_thread(
        wa.send_template, to="15551234567", name="order_update", language=TemplateLanguage.ENGLISH_US,
        params=[BodyText.params("#1234")])  # type: ignore[arg-type]
    assert template.id.startswith("wamid.")
    assert (await asyncio.to_thread(wa.mark_message_as_read, "wamid.IN1")).success is True
    outbox = server.fake.outbox("int1", CUSTOMER)
    assert outbox[0] == {"messaging_product": "whatsapp", "recipient_type": "individual", "to": "15551234567",
                         "type": "text", "text": {"body": "hello", "preview_url": False}}
    assert outbox[1]["interactive"]["action"]["buttons"] == [
        {"type": "reply", "reply": {"id": "yes", "title": "Yes"}},
        {"type": "reply", "reply": {"id": "no", "title": "No"}}]
    assert outbox[2]["type"] == "template" and outbox[2]["template"]["name"] == "order_update"
    assert server.fake.outbox("int1", "15551234567") == outbox  # with or without '+'
    assert buttons.id != sent.id
    # Each accepted send is followed by signed sent + delivered statuses that pywa parses.
    bodies = await receiver.wait_for(6)
    statuses: list[types.MessageStatus] = []
    validator = pywa_validator()
    validator.add_handlers(handlers.MessageStatusHandler(lambda _c, s: statuses.append(s)))
    for body, headers in bodies:
        assert validator.webhook_update_validator(body, headers["X-Hub-Signature-256"]) is None
        assert validator.webhook_update_handler(body) == ("ok", 200)
    by_message = {(s.id, s.status.value) for s in statuses}
    for wamid in (sent.id, buttons.id, template.id):
        assert (wamid, "sent") in by_message and (wamid, "delivered") in by_message
    first = [s.status.value for s in statuses if s.id == sent.id]
    assert first == ["sent", "delivered"]


async def test_injected_rate_limit_raises_pywa_rate_limit_hit(server: FakeServer) -> None:
    server.fake.fail_next("int1", 130429, http_status=400)
    wa = pywa_client(server.port)
    with pytest.raises(RateLimitHit) as caught:
        await asyncio.to_thread(wa.send_message, to="15551234567", text="hello")
    assert caught.value.status_code == 400
    assert server.fake.outbox("int1", CUSTOMER) == []
    again = await asyncio.to_thread(wa.send_message, to="15551234567", text="hello")  # count was 1
    assert again.id.startswith("wamid.")


async def test_wrong_token_is_an_auth_error(server: FakeServer) -> None:
    server.fake.accounts["int1"].access_token = "another-token"
    wa = pywa_client(server.port)
    with pytest.raises(ExpiredAccessToken) as caught:
        await asyncio.to_thread(wa.send_message, to="15551234567", text="hello")
    assert caught.value.status_code == 401 and caught.value.code == 190


async def test_late_failed_status_parses_as_reengagement(server: FakeServer, receiver: Receiver) -> None:
    server.fake.auto_statuses = False
    wa = pywa_client(server.port)
    sent = await asyncio.to_thread(wa.send_message, to="15551234567", text="are you there?")
    assert await server.fake.send_status("int1", sent.id, "failed", 131047) == 200
    [(body, _)] = await receiver.wait_for(1)
    statuses: list[types.MessageStatus] = []
    run_handlers(pywa_validator(), body, handlers.MessageStatusHandler(lambda _c, s: statuses.append(s)))
    [status] = statuses
    assert status.status.value == "failed"
    assert isinstance(status.error, ReEngagementMessage)


async def test_window_enforcement_fails_free_form_but_not_templates(receiver: Receiver) -> None:
    async with serve_fake(FakeWhatsApp(enforce_window=True)) as srv:
        srv.fake.add_account("int1", PHONE_ID, APP_SECRET, TOKEN, "+15550001111", receiver.url)
        wa = pywa_client(srv.port)
        await asyncio.to_thread(wa.send_message, to="15551234567", text="outside the window")
        await asyncio.to_thread(wa.send_template, to="15551234567", name="hello_world",
                                language=TemplateLanguage.ENGLISH_US)
        await srv.fake.drain()
        statuses = [json.loads(b)["entry"][0]["changes"][0]["value"]["statuses"][0] for b, _ in receiver.bodies]
        assert [(s["status"], s.get("errors", [{}])[0].get("code")) for s in statuses] == [
            ("failed", 131047), ("sent", None), ("delivered", None)]


async def test_scripting_http_api(server: FakeServer, receiver: Receiver) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        resp = await http.post("/whatsapp/int1/inbound", json={"from": CUSTOMER, "text": "hi"})
        assert resp.status_code == 200 and resp.json()["webhookStatus"] == 200
        assert resp.json()["wamid"].startswith("wamid.")
        assert (await http.post("/whatsapp/int1/fail-next", json={"code": 131056, "count": 2})).json() == {"queued": 2}
        unknown = await http.post("/whatsapp/nope/inbound", json={"from": CUSTOMER, "text": "hi"})
        assert unknown.status_code == 404
        bad = await http.post("/whatsapp/int1/inbound", json={"from": CUSTOMER})
        assert bad.status_code == 400
        verified = await http.post("/whatsapp/int1/verify", json={})
        assert verified.json() == {"webhookStatus": 200, "body": "1158201444", "ok": True}
        send = await http.post(f"/graph/v23.0/{PHONE_ID}/messages", headers={"Authorization": f"Bearer {TOKEN}"},
                               json={"messaging_product": "whatsapp", "to": "15551234567", "type": "text",
                                     "text": {"body": "x"}})
        assert send.status_code == 400 and send.json()["error"]["code"] == 131056
        no_product = await http.post(f"/graph/v23.0/{PHONE_ID}/messages", headers={"Authorization": f"Bearer {TOKEN}"},
                                     json={"to": "15551234567", "type": "text", "text": {"body": "x"}})
        assert no_product.status_code == 400 and no_product.json()["error"]["code"] == 100
        too_many = await http.post(
            f"/graph/v23.0/{PHONE_ID}/messages", headers={"Authorization": f"Bearer {TOKEN}"},
            json={"messaging_product": "whatsapp", "to": "15551234567", "type": "interactive",
                  "interactive": {"type": "button", "body": {"text": "b"}, "action": {"buttons": [
                      {"type": "reply", "reply": {"id": str(i), "title": "t"}} for i in range(4)]}}})
        assert too_many.status_code == 400 and too_many.json()["error"]["code"] == 131009
        thread = (await http.get("/whatsapp/int1/thread", params={"to": "15551234567"})).json()
        assert [m["direction"] for m in thread["messages"]] == ["in"]
        assert thread["customer"]["bsuid"] == bsuid_for(CUSTOMER)


async def test_media_lookup_and_download(server: FakeServer) -> None:
    await server.fake.send_inbound("int1", {"from": CUSTOMER, "image": {"mimeType": "image/png"}})
    media_id = next(iter(server.fake.media))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient() as http:
        info = (await http.get(f"{server.graph_url}/v23.0/{media_id}", headers=auth)).json()
        assert info["id"] == media_id and info["mime_type"] == "image/png" and info["messaging_product"] == "whatsapp"
        data = await http.get(info["url"], headers=auth)
        assert data.status_code == 200 and data.content.startswith(b"\x89PNG")
        assert (await http.get(info["url"])).status_code == 401




# --- what the fake refuses, as Meta does ---------------------------------------------------------

def _buttons(*replies: tuple[str, str]) -> dict[str, Any]:
    return {"type": "button", "body": {"text": "b"},
            "action": {"buttons": [{"type": "reply", "reply": {"id": i, "title": t}} for i, t in replies]}}


def _list(rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"type": "list", "body": {"text": "b"},
            "action": {"button": "Choose", "sections": [{"title": "S", "rows": rows}], **extra}}


def _row(i: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"r{i}", "title": f"Row {i}", **extra}


def _cta(display_text: str = "Open", url: str = "https://x.example") -> dict[str, Any]:
    return {"type": "cta_url", "body": {"text": "b"},
            "action": {"name": "cta_url", "parameters": {"display_text": display_text, "url": url}}}


REFUSED: dict[str, tuple[dict[str, Any], int]] = {
    "button title over 20": ({"interactive": _buttons(("a", "x" * 21))}, 131009),
    "button id over 256": ({"interactive": _buttons(("a" * 257, "A"))}, 131009),
    "duplicate button ids": ({"interactive": _buttons(("a", "A"), ("a", "B"))}, 131009),
    "duplicate button titles": ({"interactive": _buttons(("a", "A"), ("b", "A"))}, 131009),
    "button without body": ({"interactive": {**_buttons(("a", "A")), "body": {"text": "  "}}}, 131008),
    "interactive body over 1024": ({"interactive": {**_buttons(("a", "A")), "body": {"text": "b" * 1025}}}, 131009),
    "image header on a list": ({"interactive": {**_list([_row(1)]),
                                                "header": {"type": "image", "image": {"link": "https://x/a.jpg"}}}},
                               131009),
    "header image without link": ({"interactive": {**_buttons(("a", "A")), "header": {"type": "image",
                                                                                         "image": {}}}}, 131008),
    "footer over 60": ({"interactive": {**_buttons(("a", "A")), "footer": {"text": "f" * 61}}}, 131009),
    "eleven rows": ({"interactive": _list([_row(i) for i in range(11)])}, 131009),
    "eleven rows across sections": ({"interactive": {"type": "list", "body": {"text": "b"}, "action": {
        "button": "Choose", "sections": [{"title": "A", "rows": [_row(i) for i in range(6)]},
                                         {"title": "B", "rows": [_row(i) for i in range(6, 11)]}]}}}, 131009),
    "untitled section among two": ({"interactive": {"type": "list", "body": {"text": "b"}, "action": {
        "button": "Choose", "sections": [{"rows": [_row(1)]}, {"title": "B", "rows": [_row(2)]}]}}}, 131008),
    "row title over 24": ({"interactive": _list([{"id": "r", "title": "t" * 25}])}, 131009),
    "row description over 72": ({"interactive": _list([_row(1, description="d" * 73)])}, 131009),
    "row id over 200": ({"interactive": _list([{"id": "i" * 201, "title": "t"}])}, 131009),
    "duplicate row ids": ({"interactive": _list([_row(1), _row(1)])}, 131009),
    "list button over 20": ({"interactive": {**_list([_row(1)]), "action": {
        "button": "b" * 21, "sections": [{"title": "S", "rows": [_row(1)]}]}}}, 131009),
    "section title over 24": ({"interactive": {**_list([_row(1)]), "action": {
        "button": "Choose", "sections": [{"title": "s" * 25, "rows": [_row(1)]}]}}}, 131009),
    "cta display text over 20": ({"interactive": _cta(display_text="d" * 21)}, 131009),
    "cta url not http": ({"interactive": _cta(url="javascript:alert(1)")}, 131009),
    "cta without parameters": ({"interactive": {"type": "cta_url", "body": {"text": "b"},
                                                "action": {"name": "cta_url"}}}, 131008),
    "location request without body": ({"interactive": {"type": "location_request_message",
                                                       "action": {"name": "send_location"}}}, 131008),
    "location request with another action": ({"interactive": {"type": "location_request_message",
                                                              "body": {"text": "where?"}, "action": {"name": "x"}}},
                                             131009),
    "unknown interactive type": ({"interactive": {"type": "carousel_of_dreams", "body": {"text": "b"},
                                                  "action": {}}}, 131009),
    "image caption over 1024": ({"type": "image", "image": {"link": "https://x/a.jpg", "caption": "c" * 1025}},
                                131009),
    "text over 4096": ({"type": "text", "text": {"body": "t" * 4097}}, 131009),
    "blank text": ({"type": "text", "text": {"body": " \n"}}, 131008),
    "context without message id": ({"type": "text", "text": {"body": "hi"}, "context": {}}, 131009),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_bodies_meta_would_refuse_are_refused_like_meta(server: FakeServer, case: str) -> None:
    message, code = REFUSED[case]
    if "interactive" in message and "type" not in message:
        message = {"type": "interactive", **message}
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{server.graph_url}/v23.0/{PHONE_ID}/messages",
                               headers={"Authorization": f"Bearer {TOKEN}"},
                               json={"messaging_product": "whatsapp", "to": "15551234567", **message})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == code and error["type"] == "OAuthException"
    assert error["message"].startswith(f"(#{code}) ") and error["error_data"]["details"] and error["fbtrace_id"]
    assert server.fake.outbox("int1", CUSTOMER) == []


async def test_pywa_interactive_sends_are_accepted_and_typing_shows(server: FakeServer, receiver: Receiver) -> None:
    server.fake.auto_statuses = False
    wa = pywa_client(server.port)
    to = "15551234567"
    rows = [types.SectionRow(f"Row {i}", f"r{i}", "d" * 72 if i == 0 else None) for i in range(10)]
    await asyncio.to_thread(wa.send_message, to, "Pick", header="Menu", footer="f" * 60,
                            buttons=types.SectionList("b" * 20, [types.Section("Section A", rows[:4]),
                                                                 types.Section("Section B", rows[4:])]))
    await asyncio.to_thread(wa.send_message, to, "Track", buttons=types.URLButton("t" * 20, "https://x.example/t"))
    await asyncio.to_thread(wa.request_location, to, "Where are you?")
    await asyncio.to_thread(wa.send_image, to, "https://x.example/a.jpg", caption="c" * 1024,
                            buttons=[types.Button("x" * 20, "i" * 256)])
    kinds = [b["interactive"]["type"] for b in server.fake.outbox("int1", CUSTOMER)]
    assert kinds == ["list", "cta_url", "location_request_message", "button"]

    inbound, _ = await server.fake.send_inbound("int1", {"from": CUSTOMER, "text": "hello"})
    assert not server.fake.is_typing("int1", CUSTOMER)
    assert (await asyncio.to_thread(wa.indicate_typing, inbound)).success is True
    assert server.fake.is_typing("int1", CUSTOMER)
    [entry] = [e for e in server.fake.thread("int1", CUSTOMER) if e.wamid == inbound]
    assert entry.status == "read"  # typing marks read, as Meta's indicator does
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        assert (await http.get("/whatsapp/int1/thread", params={"to": CUSTOMER})).json()["typing"] is True
        wrong = await http.post(f"/graph/v23.0/{PHONE_ID}/messages", headers={"Authorization": f"Bearer {TOKEN}"},
                                json={"messaging_product": "whatsapp", "status": "read", "message_id": inbound,
                                      "typing_indicator": {"type": "audio"}})
        assert wrong.status_code == 400 and wrong.json()["error"]["code"] == 131009
    await asyncio.to_thread(wa.send_message, to, "here I am")  # the reply ends the indicator
    assert not server.fake.is_typing("int1", CUSTOMER)


async def test_list_reply_with_description_parses_in_pywa(server: FakeServer, receiver: Receiver) -> None:
    await server.fake.send_inbound("int1", {"from": CUSTOMER, "listReply": {
        "id": "plan_pro", "title": "Pro", "description": "$10/mo"}, "contextId": "wamid.OUT2"})
    [(body, _)] = await receiver.wait_for(1)
    selections: list[types.CallbackSelection] = []
    run_handlers(pywa_validator(), body, handlers.CallbackSelectionHandler(lambda _c, s: selections.append(s)))
    [selection] = selections
    assert (selection.data, selection.title, selection.description) == ("plan_pro", "Pro", "$10/mo")
    assert selection.reply_to_message is not None and selection.reply_to_message.id == "wamid.OUT2"

"""The sandbox's fake Twilio, served alone, proven with the independent `twilio` package (9.13.0):
its REST `Client` creates messages and gets Twilio's resource JSON (201) or `TwilioRestException`s
with Twilio's codes, and its `RequestValidator` accepts every webhook the fake signs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from aiohttp import web
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from services.sandbox.twilio_fake import FakeTwilio
from shared.twilio_wire import EMPTY_TWIML, SIGNATURE_HEADER
from threadline.natsserver import free_port

ACCOUNT_SID = "AC" + "a" * 32
AUTH_TOKEN = "fake-auth-token-0123456789"
BUSINESS = "+15557654321"
CUSTOMER = "+15551234567"


@dataclass
class Receiver:
    """A stand-in gateway: records every webhook the fake posts and answers empty TwiML."""

    url: str
    received: list[tuple[str, list[tuple[str, str]], dict[str, str]]] = field(default_factory=list)


@dataclass
class Served:
    fake: FakeTwilio
    base_url: str
    receiver: Receiver

    def client(self, token: str = AUTH_TOKEN) -> Client:
        client = Client(ACCOUNT_SID, token)
        client.api.base_url = f"{self.base_url}/twilio-api"
        return client


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    port = free_port()
    receiver = Receiver(url=f"http://127.0.0.1:{port}/gateway")

    async def record(request: web.Request) -> web.Response:
        form = parse_qsl((await request.read()).decode(), keep_blank_values=True)
        receiver.received.append((str(request.url), form, dict(request.headers)))
        return web.Response(text=EMPTY_TWIML, content_type="text/xml")

    fake = FakeTwilio(public_url=f"http://127.0.0.1:{port}/sandbox")
    fake.add_account("int1", ACCOUNT_SID, AUTH_TOKEN, BUSINESS, f"{receiver.url}/inbound")
    app = web.Application()
    app.router.add_routes(fake.routes("/sandbox"))
    app.router.add_post("/gateway/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Served(fake, f"http://127.0.0.1:{port}/sandbox", receiver)
    finally:
        await fake.close()
        await runner.cleanup()


async def test_sdk_creates_messages_and_gets_the_resource_json(served: Served) -> None:
    client = served.client()
    message = await asyncio.to_thread(
        client.messages.create, to=CUSTOMER, from_=BUSINESS, body="hi",
        media_url=["https://x.example/a.jpg", "https://x.example/b.jpg"],
        status_callback=f"{served.receiver.url}/status")
    assert message.sid is not None and message.sid.startswith("MM") and len(message.sid) == 34
    assert (message.account_sid, message.to, message.from_, message.body) == (ACCOUNT_SID, CUSTOMER, BUSINESS, "hi")
    assert message.status == "queued" and message.direction == "outbound-api"
    assert message.num_media == "2" and message.num_segments == "1" and message.api_version == "2010-04-01"
    assert message.date_created is not None and message.date_created.year >= 2024  # RFC 2822 parsed by the SDK
    assert message.uri == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{message.sid}.json"
    # The wire body exactly as the SDK wrote it (§5.4), and the outbox view of it.
    [request] = served.fake.requests
    assert request["form"] == [("To", CUSTOMER), ("StatusCallback", f"{served.receiver.url}/status"),
                               ("From", BUSINESS), ("Body", "hi"), ("MediaUrl", "https://x.example/a.jpg"),
                               ("MediaUrl", "https://x.example/b.jpg")]
    assert request["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert served.fake.outbox("int1", CUSTOMER)[0]["MediaUrl"] == ["https://x.example/a.jpg", "https://x.example/b.jpg"]
    fetched = await asyncio.to_thread(client.messages(message.sid).fetch)
    assert fetched.sid == message.sid and fetched.body == "hi"
    long_text = await asyncio.to_thread(client.messages.create, to=CUSTOMER, from_=BUSINESS, body="é" * 161)
    assert long_text.sid is not None and long_text.sid.startswith("SM") and long_text.num_segments == "2"


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"to": "+1bad", "from_": BUSINESS, "body": "x"}, 400, 21211),
    ({"to": CUSTOMER, "from_": "+15550000000", "body": "x"}, 400, 21606),
    ({"to": CUSTOMER, "from_": BUSINESS}, 400, 21602),
    ({"to": CUSTOMER, "from_": BUSINESS, "body": "x" * 1601}, 400, 21617),
    ({"to": CUSTOMER, "messaging_service_sid": "MG" + "0" * 32, "body": "x"}, 400, 21701),
])
async def test_sdk_raises_twilio_errors(served: Served, kwargs: dict[str, str], status: int, code: int) -> None:
    with pytest.raises(TwilioRestException) as caught:
        await asyncio.to_thread(served.client().messages.create, **kwargs)
    assert (caught.value.status, caught.value.code) == (status, code)
    assert caught.value.msg.startswith("Unable to create record: ")


async def test_auth_injected_errors_and_opt_out(served: Served) -> None:
    with pytest.raises(TwilioRestException) as bad_auth:
        await asyncio.to_thread(served.client("wrong-token").messages.create, to=CUSTOMER, from_=BUSINESS, body="x")
    assert (bad_auth.value.status, bad_auth.value.code) == (401, 20003)
    served.fake.fail_next("int1", 20429, 429)
    with pytest.raises(TwilioRestException) as throttled:
        await asyncio.to_thread(served.client().messages.create, to=CUSTOMER, from_=BUSINESS, body="x")
    assert (throttled.value.status, throttled.value.code) == (429, 20429)
    _sid, status = await served.fake.send_inbound("int1", {"from": CUSTOMER, "text": "STOP"})
    assert status == 200 and dict(served.receiver.received[-1][1])["OptOutType"] == "STOP"
    with pytest.raises(TwilioRestException) as unsubscribed:
        await asyncio.to_thread(served.client().messages.create, to=CUSTOMER, from_=BUSINESS, body="x")
    assert unsubscribed.value.code == 21610
    await served.fake.send_inbound("int1", {"from": CUSTOMER, "text": "start"})
    resumed = await asyncio.to_thread(served.client().messages.create, to=CUSTOMER, from_=BUSINESS, body="x")
    assert resumed.status == "queued"


async def test_request_validator_accepts_every_webhook_the_fake_signs(served: Served) -> None:
    validator = RequestValidator(AUTH_TOKEN)
    sid, status = await served.fake.send_inbound("int1", {
        "from": CUSTOMER, "text": "photo + doc & more", "mediaUrl": ["https://x.example/a.png", "https://x.example/b.pdf"]})
    assert status == 200
    url, form, headers = served.receiver.received[-1]
    params = dict(form)
    assert url == f"{served.receiver.url}/inbound" and headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert validator.validate(url, params, headers[SIGNATURE_HEADER])
    assert not RequestValidator("other-token").validate(url, params, headers[SIGNATURE_HEADER])
    assert params["MessageSid"] == params["SmsSid"] == sid and sid.startswith("MM")
    assert (params["From"], params["To"], params["Body"], params["NumMedia"]) == (
        CUSTOMER, BUSINESS, "photo + doc & more", "2")
    assert (params["AccountSid"], params["ApiVersion"], params["SmsStatus"]) == (ACCOUNT_SID, "2010-04-01", "received")
    assert (params["MediaContentType0"], params["MediaContentType1"]) == ("image/png", "application/pdf")
    async with httpx.AsyncClient() as http:  # media URLs are the fake's, redirecting to the content
        media = await http.get(params["MediaUrl0"])
    assert media.status_code == 302 and media.headers["Location"] == "https://x.example/a.png"
    assert served.fake.webhooks[-1].response_type == "text/xml"

    # Status callbacks to the StatusCallback given at send time, signed over that URL.
    client = served.client()
    message = await asyncio.to_thread(client.messages.create, to=CUSTOMER, from_=BUSINESS, body="tracked",
                                      status_callback=f"{served.receiver.url}/status?x=1")
    await served.fake.drain()
    await served.fake.send_status("int1", str(message.sid), "undelivered", 30003)
    callbacks = [(u, dict(f), h) for u, f, h in served.receiver.received if "/status" in u]
    assert [c[1]["MessageStatus"] for c in callbacks] == ["sent", "delivered", "undelivered"]
    for cb_url, cb_params, cb_headers in callbacks:
        assert cb_url == f"{served.receiver.url}/status?x=1"
        assert validator.validate(cb_url, cb_params, cb_headers[SIGNATURE_HEADER])
        assert cb_params["MessageSid"] == message.sid and cb_params["AccountSid"] == ACCOUNT_SID
    assert callbacks[-1][1]["ErrorCode"] == "30003" and "ErrorCode" not in callbacks[0][1]
    fetched = await asyncio.to_thread(client.messages(str(message.sid)).fetch)
    assert fetched.status == "undelivered" and fetched.error_code == 30003


async def test_scripting_api_errors_are_sunco_shaped(served: Served) -> None:
    async with httpx.AsyncClient(base_url=f"{served.base_url}/twilio") as http:
        unknown = await http.post("/nope/inbound", json={"from": CUSTOMER, "text": "x"})
        bad_from = await http.post("/int1/inbound", json={"from": "555", "text": "x"})
        nothing = await http.post("/int1/inbound", json={"from": CUSTOMER})
        no_to = await http.get("/int1/outbox")
        ok = await http.post("/int1/inbound", json={"from": CUSTOMER, "text": "hey"})
        outbox = await http.get("/int1/outbox", params={"to": CUSTOMER})
        thread = await http.get("/int1/thread", params={"to": CUSTOMER})
    assert unknown.status_code == 404 and unknown.json()["errors"][0]["code"] == "not_found"
    assert bad_from.status_code == nothing.status_code == no_to.status_code == 400
    assert ok.status_code == 200 and ok.json()["webhookStatus"] == 200
    assert outbox.json() == {"messages": []}
    [entry] = thread.json()["messages"]
    assert entry["direction"] == "in" and entry["body"]["Body"] == "hey" and entry["sid"] == ok.json()["sid"]


async def test_thread_shows_segments_and_the_choices_a_number_answers(served: Served) -> None:
    client = served.client()

    async def send(body: str) -> None:
        await asyncio.to_thread(client.messages.create, to=CUSTOMER, from_=BUSINESS, body=body)

    async def thread() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=f"{served.base_url}/twilio") as http:
            answer = await http.get("/int1/thread", params={"to": CUSTOMER})
        assert answer.status_code == 200
        result: dict[str, Any] = answer.json()
        return result

    # A message split in two texts numbers on across them: both texts' choices are offered.
    await send("Pick a plan:\n\n1. Basic\nSee https://x.example/plans\n2. Pro")
    await send("x" * 161 + "\n3. Team")
    view = await thread()
    assert [m.get("segments") for m in view["messages"]] == [1, 2]
    assert view["choices"] == [{"number": 1, "label": "Basic"}, {"number": 2, "label": "Pro"},
                               {"number": 3, "label": "Team"}]
    # Once the customer answers, nothing is pending; a later text without numbers offers none,
    # and a new numbered message (from 1 again) offers only its own.
    await served.fake.send_inbound("int1", {"from": CUSTOMER, "text": "2"})
    assert (await thread())["choices"] == []
    await send("Thanks! Anything else?")
    assert (await thread())["choices"] == []
    await send("Rate us:\n1. Good\n2. Bad")
    assert [c["label"] for c in (await thread())["choices"]] == ["Good", "Bad"]
    # Numbers that do not run 1, 2, 3… are not choices.
    await send("Steps:\n2. Unplug\n4. Replug")
    assert (await thread())["choices"] == []


async def test_an_injected_error_can_skip_sends_first(served: Served) -> None:
    async with httpx.AsyncClient(base_url=f"{served.base_url}/twilio") as http:
        queued = await http.post("/int1/fail-next", json={"code": 20500, "httpStatus": 500, "skip": 1})
        refused = await http.post("/int1/fail-next", json={"code": 20500, "skip": -1})
    assert queued.status_code == 200 and refused.status_code == 400
    client = served.client()
    first = await asyncio.to_thread(client.messages.create, to=CUSTOMER, from_=BUSINESS, body="part 1")
    with pytest.raises(TwilioRestException) as failed:
        await asyncio.to_thread(client.messages.create, to=CUSTOMER, from_=BUSINESS, body="part 2")
    assert first.status == "queued" and (failed.value.status, failed.value.code) == (500, 20500)
    again = await asyncio.to_thread(client.messages.create, to=CUSTOMER, from_=BUSINESS, body="part 2")
    assert again.status == "queued"
    assert [b["Body"] for b in served.fake.outbox("int1", CUSTOMER)] == ["part 1", "part 2"]

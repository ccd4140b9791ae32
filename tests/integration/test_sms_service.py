"""The sms service against real NATS and the sandbox's fake Twilio, through the front door.

Twilio signs the PUBLIC URL (the front door here); the service sits behind it and sees another
URL, as a pod behind an ingress does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from services.sandbox.app import SandboxService
from services.sandbox.twilio_fake import FakeTwilio
from services.sms.app import SmsService
from shared import records, render, subjects
from shared.bus import Bus, Delivery
from shared.ids import new_id
from shared.media import object_key, parse_attachment_url
from shared.messages import channel
from shared.messages.channel import DeliveryStatus, InboundMessage, OutboundActivity, OutboundSend
from shared.records import IntegrationRecord
from shared.sunco import (
    BuyAction,
    CarouselContent,
    FileContent,
    FormContent,
    FormField,
    FormOption,
    FormResponseContent,
    ImageContent,
    Item,
    LinkAction,
    ListContent,
    LocationRequestAction,
    PostbackAction,
    ReplyAction,
    TemplateContent,
    TextContent,
)
from shared.twilio_wire import EMPTY_TWIML, SIGNATURE_HEADER
from tests.fakes.whatsapp_env import eventually, stream_messages
from tests.harness import System

ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "twilio-auth-token-0123456789"
BUSINESS = "+15557654321"
CUSTOMER = "+15551234567"
SERVICE_SID = "MG" + "c" * 32



def twilio_record(base_url: str, **config: Any) -> IntegrationRecord:
    """A twilio integration record whose REST API is the sandbox's fake."""
    return IntegrationRecord(id=new_id(), app_id=new_id(), type="twilio", display_name="SMS", config={
        "accountSid": ACCOUNT_SID, "authToken": AUTH_TOKEN, "phoneNumber": BUSINESS,
        "baseUrl": f"{base_url}/sandbox/twilio-api", **config})


@dataclass
class SmsEnv:
    """sms + sandbox behind the front door, one twilio integration pointing at the fake."""

    system: System
    bus: Bus
    record: IntegrationRecord

    @property
    def integration_id(self) -> str:
        return self.record.id

    @property
    def service(self) -> SmsService:
        return self.system.service("sms")  # type: ignore[no-any-return]

    @property
    def sandbox(self) -> SandboxService:
        return self.system.service("sandbox")  # type: ignore[no-any-return]

    @property
    def fake(self) -> FakeTwilio:
        return next(f for f in self.sandbox.channel_fakes if isinstance(f, FakeTwilio))

    @property
    def webhook_url(self) -> str:
        """The public URL (what Twilio is configured with and signs)."""
        return f"{self.system.base_url}/webhooks/twilio/{self.integration_id}"

    @property
    def pod_url(self) -> str:
        """The URL the service itself listens on (what it sees behind the proxy)."""
        return f"{self.system.service_url('sms')}/webhooks/twilio/{self.integration_id}"

    async def inbound(self) -> list[Any]:
        subject = subjects.integration_subjects("inbound", "twilio", self.integration_id)
        return await stream_messages(self.bus, subjects.INBOUND, subject)

    async def statuses(self) -> list[Any]:
        return await stream_messages(self.bus, subjects.STATUS,
                                     subjects.integration_subjects("status", "twilio", self.integration_id))

    async def script(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=f"{self.system.base_url}/sandbox/twilio/{self.integration_id}") as c:
            resp = await c.post(path, json=body)
            assert resp.status_code == 200, resp.text
            result: dict[str, Any] = resp.json()
            return result

    async def add_record(self, record: IntegrationRecord) -> None:
        kv = await self.bus.key_value(subjects.INTEGRATIONS_BUCKET)
        await kv.put(record.id, records.ENCODER.encode(record))

        async def both_see_it() -> bool:
            self.sandbox.sync_accounts()
            in_fake = record.id in self.fake.accounts or "/sandbox/twilio-api" not in str(record.config["baseUrl"])
            return self.service.credentials(record.id) is not None and in_fake

        await eventually(both_see_it)


async def start_sms(system: System, bus: Bus, env: dict[str, str] | None = None, **config: Any) -> SmsEnv:
    """Start sms + sandbox, register one integration, wait until both services see it."""
    await system.start("sms", "sandbox", env={"SMS_RETRY_BASE_SECONDS": "0.05", "SMS_SEGMENTS_PER_SECOND": "1000",
                                              **(env or {})})
    record = twilio_record(system.base_url, **config)
    sms = SmsEnv(system, bus, record)
    await sms.add_record(record)
    return sms


@pytest.fixture
async def sms(system: System, bus: Bus) -> AsyncIterator[SmsEnv]:
    yield await start_sms(system, bus)


def signed_post(url: str, signed_url: str, form: list[tuple[str, str]], token: str = AUTH_TOKEN
                ) -> tuple[bytes, dict[str, str]]:
    """A form body and headers signed by twilio's own RequestValidator over `signed_url`."""
    signature = RequestValidator(token).compute_signature(signed_url, dict(form))
    return urlencode(form).encode(), {"Content-Type": "application/x-www-form-urlencoded", SIGNATURE_HEADER: signature}


def inbound_form(sid: str, body: str = "hello") -> list[tuple[str, str]]:
    return [("SmsMessageSid", sid), ("NumMedia", "0"), ("SmsSid", sid), ("SmsStatus", "received"), ("Body", body),
            ("To", BUSINESS), ("MessageSid", sid), ("AccountSid", ACCOUNT_SID), ("From", CUSTOMER),
            ("ApiVersion", "2010-04-01")]


# --- inbound ---------------------------------------------------------------------------------------

async def test_inbound_sms_is_one_message_answered_with_empty_twiml(sms: SmsEnv) -> None:
    sent = await sms.script("/inbound", {"from": CUSTOMER, "text": "hi there"})
    assert sent["webhookStatus"] == 200
    delivery = sms.fake.webhooks[-1]
    # Signed over the public URL (the front door), received by a service listening elsewhere.
    assert delivery.url == sms.webhook_url and sms.webhook_url != sms.pod_url
    assert delivery.response_type == "text/xml" and delivery.response_body == EMPTY_TWIML
    [message] = await sms.inbound()
    assert isinstance(message, InboundMessage)
    assert message.channel == "twilio" and message.client_type == "twilio"
    assert message.app_id == sms.record.app_id and message.integration_id == sms.integration_id
    assert message.provider_message_id == sent["sid"] and message.channel_user_id == CUSTOMER
    assert message.content == TextContent(text="hi there")
    assert message.client_info["phone_number"] == CUSTOMER and message.client_info["to"] == BUSINESS
    assert message.raw["MessageSid"] == sent["sid"] and message.received_at > 1_700_000_000
    # Twilio retrying the same webhook is still one message.
    async with httpx.AsyncClient() as http:
        again = await http.post(delivery.url, content=delivery.body, headers=delivery.headers)
    assert again.status_code == 200 and again.text == EMPTY_TWIML
    assert again.headers["content-type"].startswith("text/xml")
    assert len(await sms.inbound()) == 1


async def test_signature_from_twilio_sdk_over_public_url_is_accepted(sms: SmsEnv) -> None:
    sid = "SM" + "d" * 32
    body, headers = signed_post(sms.pod_url, sms.webhook_url, inbound_form(sid, "sdk signed"))
    async with httpx.AsyncClient() as http:
        # Straight to the pod, as an ingress would forward it: still checked against the public URL.
        direct = await http.post(sms.pod_url, content=body, headers=headers)
        through_proxy = await http.post(sms.webhook_url, content=body, headers=headers)
    assert direct.status_code == through_proxy.status_code == 200
    [message] = await sms.inbound()
    assert message.provider_message_id == sid and message.content == TextContent(text="sdk signed")


async def test_forged_signatures_get_403_a_useful_warning_and_nothing_queued(
        sms: SmsEnv, caplog: pytest.LogCaptureFixture) -> None:
    form = inbound_form("SM" + "e" * 32, "forged")
    _, good_headers = signed_post(sms.pod_url, sms.webhook_url, form)
    pod_signed_body, pod_signed = signed_post(sms.pod_url, sms.pod_url, form)  # the URL the pod sees: wrong
    wrong_token_body, wrong_token = signed_post(sms.pod_url, sms.webhook_url, form, token="not-the-token")
    tampered = urlencode(inbound_form("SM" + "e" * 32, "tampered")).encode()
    caplog.set_level(logging.WARNING, logger="services.sms.app")
    async with httpx.AsyncClient() as http:
        results = [
            await http.post(sms.webhook_url, content=pod_signed_body, headers=pod_signed),
            await http.post(sms.webhook_url, content=wrong_token_body, headers=wrong_token),
            await http.post(sms.webhook_url, content=tampered, headers=good_headers),
            await http.post(sms.webhook_url, content=tampered,
                            headers={"Content-Type": "application/x-www-form-urlencoded"}),
        ]
    assert [r.status_code for r in results] == [403, 403, 403, 403]
    assert results[0].json()["errors"][0]["code"] == "forbidden"
    assert await sms.inbound() == []
    warnings = [r for r in caplog.records if r.name == "services.sms.app" and r.levelno == logging.WARNING]
    assert len(warnings) == 4
    text = [w.getMessage() for w in warnings]
    assert all(sms.webhook_url in t and "'Body'" in t and "'MessageSid'" in t for t in text)
    assert all(AUTH_TOKEN not in t for t in text)
    assert all(AUTH_TOKEN not in str(getattr(w, "fields", "")) for w in warnings)
    assert "matches the url as this service received it" in text[0]  # the proxy mismatch, spelled out
    assert "Auth Token" in text[1]
    assert "no X-Twilio-Signature" in text[3]
    fields = getattr(warnings[0], "fields", {})
    assert fields["signed_url"] == sms.webhook_url and "Body" in fields["param_names"]


async def test_configured_webhook_url_is_what_gets_checked(sms: SmsEnv) -> None:
    public = "https://sms.example.com/hooks/twilio?tenant=7"
    record = twilio_record("http://127.0.0.1:9", webhookUrl=public)  # not the sandbox: nothing is sent there
    await sms.add_record(record)
    pod_url = f"{sms.system.service_url('sms')}/webhooks/twilio/{record.id}"
    form = inbound_form("SM" + "f" * 32, "via configured url")
    good_body, good = signed_post(pod_url, public, form)
    default_body, default_signed = signed_post(pod_url, f"{sms.system.base_url}/webhooks/twilio/{record.id}", form)
    async with httpx.AsyncClient() as http:
        accepted = await http.post(pod_url, content=good_body, headers=good)
        refused = await http.post(pod_url, content=default_body, headers=default_signed)
    assert (accepted.status_code, refused.status_code) == (200, 403)
    [message] = await stream_messages(sms.bus, subjects.INBOUND,
                                      subjects.integration_subjects("inbound", "twilio", record.id))
    assert message.content == TextContent(text="via configured url")


async def test_mms_media_become_image_and_file_content_copied_into_the_object_store(sms: SmsEnv) -> None:
    # The first file is served by the fake's media URL itself; the second redirects to a host the
    # egress policy refuses, so its copy fails and its message keeps Twilio's URL.
    sent = await sms.script("/inbound", {"from": CUSTOMER, "text": "see attached",
                                         "mediaUrl": [f"{sms.system.base_url}/sandbox/a.png",
                                                      "https://example.com/b.pdf"]})
    messages = {m.provider_message_id: m for m in await sms.inbound()}
    assert set(messages) == {sent["sid"], f"{sent['sid']}/1"}
    image, document = messages[sent["sid"]].content, messages[f"{sent['sid']}/1"].content
    assert isinstance(image, ImageContent) and image.media_type == "image/png" and image.text == "see attached"
    ref = parse_attachment_url(sms.system.base_url, image.media_url or "")
    assert ref is not None and ref.filename == "image.png"
    stored = await sms.service.media_copier.store.open(object_key(ref.app_id, ref.token))
    assert stored is not None and (await stored.read()).startswith(b"\x89PNG")
    assert isinstance(document, FileContent) and document.media_type == "application/pdf"
    assert document.media_url.startswith(
        f"{sms.system.base_url}/sandbox/twilio-api/2010-04-01/Accounts/{ACCOUNT_SID}/")
    async with httpx.AsyncClient() as http:  # the media URL works (the fake redirects to the content)
        fetched = await http.get(document.media_url)
    assert fetched.status_code == 302 and fetched.headers["Location"] == "https://example.com/b.pdf"


# --- outbound --------------------------------------------------------------------------------------

def outbound(sms: SmsEnv, content: Any, **extra: Any) -> OutboundSend:
    return OutboundSend(app_id=sms.record.app_id, integration_id=sms.integration_id, channel="twilio",
                        conversation_id=new_id(), message_id=new_id(), user_id=new_id(), client_id=new_id(),
                        recipient=CUSTOMER, recipient_info={"phone_number": CUSTOMER}, content=content, **extra)


async def publish(sms: SmsEnv, send: OutboundSend) -> None:
    await sms.bus.publish(channel.subject_of(send), channel.encode(send))


async def statuses_of(sms: SmsEnv, message_id: str, count: int) -> list[DeliveryStatus]:
    async def probe() -> list[DeliveryStatus] | None:
        found = [s for s in await sms.statuses() if s.message_id == message_id]
        return found if len(found) >= count else None

    return await eventually(probe)


async def test_outbound_text_wire_body_matches_the_sdk_and_statuses_flow(sms: SmsEnv) -> None:
    send = outbound(sms, TextContent(text="Your order shipped!"))
    await publish(sms, send)
    # `sent` from the send call, then `sent`/`delivered` callbacks, all naming our message.
    statuses = await statuses_of(sms, send.message_id, 3)
    status_url = f"{sms.system.base_url}/webhooks/twilio/{sms.integration_id}/status"
    [body] = sms.fake.outbox(sms.integration_id, CUSTOMER)
    assert body == {"To": CUSTOMER, "StatusCallback": status_url, "From": BUSINESS, "Body": "Your order shipped!"}
    [gateway_request] = sms.fake.requests
    assert gateway_request["headers"]["Authorization"].startswith("Basic ")
    assert gateway_request["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert "traceparent" in gateway_request["headers"]
    # twilio's SDK, given the same message, writes byte-for-byte the same form.
    client = Client(ACCOUNT_SID, AUTH_TOKEN)
    client.api.base_url = f"{sms.system.base_url}/sandbox/twilio-api"
    await asyncio.to_thread(client.messages.create, to=CUSTOMER, from_=BUSINESS, body="Your order shipped!",
                            status_callback=status_url)
    assert sms.fake.requests[1]["form"] == gateway_request["form"]
    sid = sms.fake.thread(sms.integration_id, CUSTOMER)[0].sid
    assert {s.status for s in statuses} == {"sent", "delivered"}
    assert all(s.provider_message_id == sid and s.conversation_id == send.conversation_id for s in statuses)
    callbacks = [w for w in sms.fake.webhooks if w.url == status_url]
    assert callbacks and all(w.status == 200 for w in callbacks)


async def test_outbound_mms_with_messaging_service(system: System, bus: Bus) -> None:
    sms = await start_sms(system, bus, messagingServiceSid=SERVICE_SID)
    send = outbound(sms, ImageContent(media_url="https://example.com/a.jpg", text="our shop"))
    await publish(sms, send)
    sent = next(s for s in await statuses_of(sms, send.message_id, 1) if s.status == "sent")
    assert sent.provider_message_id.startswith("MM")
    [body] = sms.fake.outbox(sms.integration_id, CUSTOMER)
    assert body["MessagingServiceSid"] == SERVICE_SID and "From" not in body
    assert body["MediaUrl"] == ["https://example.com/a.jpg"] and body["Body"] == "our shop"
    resource = sms.fake.messages[sent.provider_message_id]
    assert resource["messaging_service_sid"] == SERVICE_SID and resource["num_media"] == "1"


async def test_undelivered_callback_becomes_failed_with_the_error_code(sms: SmsEnv) -> None:
    send = outbound(sms, TextContent(text="are you there?"))
    await publish(sms, send)
    await statuses_of(sms, send.message_id, 3)
    sid = sms.fake.thread(sms.integration_id, CUSTOMER)[0].sid
    await sms.script("/status", {"sid": sid, "status": "undelivered", "errorCode": 30003})
    statuses = await statuses_of(sms, send.message_id, 4)
    failed = next(s for s in statuses if s.status == "failed")
    assert failed.provider_message_id == sid and failed.error_code == "30003"
    assert failed.error_title == "Unreachable destination handset"


async def test_forged_status_callback_is_refused(sms: SmsEnv) -> None:
    status_url = f"{sms.webhook_url}/status"
    form = [("MessageSid", "SM" + "2" * 32), ("MessageStatus", "delivered"), ("AccountSid", ACCOUNT_SID)]
    signed_body, signed = signed_post(status_url, status_url, form)
    inbound_signed_body, inbound_signed = signed_post(status_url, sms.webhook_url, form)
    async with httpx.AsyncClient() as http:
        forged = await http.post(status_url, content=signed_body, headers={**signed, SIGNATURE_HEADER: "AAAA"})
        wrong_url = await http.post(status_url, content=inbound_signed_body, headers=inbound_signed)
        genuine = await http.post(status_url, content=signed_body, headers=signed)
    assert (forged.status_code, wrong_url.status_code, genuine.status_code) == (403, 403, 200)
    [status] = await sms.statuses()
    assert status.status == "delivered" and status.message_id is None  # not ours: conversations maps the SID


async def test_transient_errors_are_retried_then_sent(sms: SmsEnv) -> None:
    await sms.script("/fail-next", {"code": 20429, "httpStatus": 429, "count": 1})
    await sms.script("/fail-next", {"code": 20500, "httpStatus": 500, "count": 1})
    send = outbound(sms, TextContent(text="eventually"))
    await publish(sms, send)
    sent = next(s for s in await statuses_of(sms, send.message_id, 1) if s.status == "sent")
    assert sent.provider_message_id.startswith("SM")
    assert len([r for r in sms.fake.requests if ("Body", "eventually") in r["form"]]) == 3
    assert len(sms.fake.outbox(sms.integration_id, CUSTOMER)) == 1


async def test_permanent_errors_fail_at_once(sms: SmsEnv) -> None:
    bad_number = outbound(sms, TextContent(text="doomed"))
    bad_number.recipient = "+1bad"
    await publish(sms, bad_number)
    [failed] = await statuses_of(sms, bad_number.message_id, 1)
    assert failed.status == "failed" and failed.error_code == "21211"
    assert failed.error_title == "The 'To' number +1bad is not a valid phone number."
    assert failed.error_details == "https://www.twilio.com/docs/errors/21211"
    await sms.script("/inbound", {"from": CUSTOMER, "text": "STOP"})
    unsubscribed = outbound(sms, TextContent(text="after stop"))
    await publish(sms, unsubscribed)
    [opted_out] = await statuses_of(sms, unsubscribed.message_id, 1)
    assert opted_out.status == "failed" and opted_out.error_code == "21610"
    assert len([r for r in sms.fake.requests if ("Body", "doomed") in r["form"]]) == 1
    assert len([r for r in sms.fake.requests if ("Body", "after stop") in r["form"]]) == 1


async def test_transient_errors_give_up_after_max_attempts(system: System, bus: Bus) -> None:
    sms = await start_sms(system, bus, env={"SMS_MAX_SEND_ATTEMPTS": "2"})
    await sms.script("/fail-next", {"code": 20503, "httpStatus": 503, "count": 10})
    send = outbound(sms, TextContent(text="never lands"))
    await publish(sms, send)
    [failed] = await statuses_of(sms, send.message_id, 1)
    assert failed.status == "failed" and failed.error_code == "20503"
    assert len([r for r in sms.fake.requests if ("Body", "never lands") in r["form"]]) == 2


async def test_segments_are_throttled_per_sender(system: System, bus: Bus) -> None:
    # 1 segment/s: a 3-segment SMS goes at once and leaves its long code 2 segments in debt, so
    # with a 0 s wait budget the next send would be put back on the stream, not hold its ack.
    sms = await start_sms(system, bus, env={"SMS_SEGMENTS_PER_SECOND": "1", "SMS_MAX_RATE_WAIT_SECONDS": "0"})
    first = outbound(sms, TextContent(text="x" * 400))
    await publish(sms, first)
    await statuses_of(sms, first.message_id, 1)
    bucket = sms.service.sender.buckets[f"{ACCOUNT_SID}:{BUSINESS}"]
    assert bucket.rate == 1.0 and bucket.tokens == -2.0  # 1 token held, 3 segments spent
    assert bucket.reserve(1, max_wait=0) is None


# --- every SunCo message type as readable SMS/MMS (shared.render's text) ---------------------------

async def reported(sms: SmsEnv, send: OutboundSend) -> DeliveryStatus:
    """The status the send path itself reported for `send` (not a Twilio callback: it has no raw form)."""
    async def probe() -> DeliveryStatus | None:
        return next((s for s in await sms.statuses() if s.message_id == send.message_id and not s.raw), None)

    return await eventually(probe)


async def sent_bodies(sms: SmsEnv, send: OutboundSend) -> list[dict[str, Any]]:
    """What reached the fake for `send`, once the gateway reported it sent (all its parts)."""
    sent = await reported(sms, send)
    assert sent.status == "sent", sent
    return sms.fake.outbox(sms.integration_id, CUSTOMER)


async def test_text_with_choices_is_numbered_and_a_number_answers_it(sms: SmsEnv) -> None:
    content = TextContent(text="Which size?", actions=[
        ReplyAction(text="Small", payload="size_s"), ReplyAction(text="Medium", payload="size_m"),
        LinkAction(text="Size guide", uri="https://shop.example/sizes"),
        PostbackAction(text="Large", payload="size_l")])
    send = outbound(sms, content)
    await publish(sms, send)
    [body] = await sent_bodies(sms, send)
    assert body["Body"] == "Which size?\n\n1. Small\n2. Medium\nSize guide: https://shop.example/sizes\n3. Large"
    assert "MediaUrl" not in body
    # The phone offers the numbers; the customer answers "2", which is the choice "Medium".
    async with httpx.AsyncClient(base_url=f"{sms.system.base_url}/sandbox/twilio/{sms.integration_id}") as http:
        thread = (await http.get("/thread", params={"to": CUSTOMER})).json()
    assert thread["choices"] == [{"number": 1, "label": "Small"}, {"number": 2, "label": "Medium"},
                                 {"number": 3, "label": "Large"}]
    await sms.script("/inbound", {"from": CUSTOMER, "text": "2"})
    [answer] = await sms.inbound()
    assert answer.content == TextContent(text="2")
    picked = render.answered_choice(answer.content.text, content)
    assert isinstance(picked, ReplyAction) and picked.payload == "size_m"
    assert sms.fake.choices(sms.integration_id, CUSTOMER) == []  # answered: nothing pending


async def test_carousel_is_item_blocks_with_images_as_links(sms: SmsEnv) -> None:
    send = outbound(sms, CarouselContent(text="Our picks", items=[
        Item(title="Red shirt", description="Cotton, $20", media_url="https://shop.example/red.jpg",
             actions=[PostbackAction(text="Pick red", payload="red"),
                      LinkAction(text="Details", uri="https://shop.example/red")]),
        Item(title="Blue shirt", actions=[PostbackAction(text="Pick blue", payload="blue")])]))
    await publish(sms, send)
    [body] = await sent_bodies(sms, send)
    assert body["Body"] == ("Our picks\n\nRed shirt — Cotton, $20\nhttps://shop.example/red.jpg\n1. Pick red\n"
                            "Details: https://shop.example/red\n\nBlue shirt\n2. Pick blue")
    assert "MediaUrl" not in body  # an item's picture stays beside its item, as a link


async def test_list_numbers_item_and_list_actions_in_order(sms: SmsEnv) -> None:
    send = outbound(sms, ListContent(items=[
        Item(title="Basic", description="1 GB", actions=[PostbackAction(text="Choose Basic", payload="basic")]),
        Item(title="Pro", description="10 GB", actions=[
            PostbackAction(text="Choose Pro", payload="pro"),
            BuyAction(text="Buy now", amount=999, currency="usd", uri="https://pay.example/pro")])],
        actions=[PostbackAction(text="Talk to sales", payload="sales")]))
    await publish(sms, send)
    [body] = await sent_bodies(sms, send)
    assert body["Body"] == ("Basic — 1 GB\n1. Choose Basic\n\nPro — 10 GB\n2. Choose Pro\n"
                            "Buy now (9.99 USD): https://pay.example/pro\n\n3. Talk to sales")


async def test_form_and_location_request_are_questions(sms: SmsEnv) -> None:
    form = outbound(sms, FormContent(fields=[
        FormField(type="text", name="name", label="Your name"),
        FormField(type="select", name="size", label="Size", options=[FormOption(name="s", label="Small"),
                                                                       FormOption(name="l", label="Large")])]))
    where = outbound(sms, TextContent(text="Where should we deliver?",
                                      actions=[LocationRequestAction(text="Share location")]))
    await publish(sms, form)
    await sent_bodies(sms, form)
    await publish(sms, where)
    await sent_bodies(sms, where)
    assert [b["Body"] for b in sms.fake.outbox(sms.integration_id, CUSTOMER)] == [
        "Please reply with:\nYour name\nSize (Small, Large)",
        "Where should we deliver?\n\nReply with your address, or share your location."]


async def test_a_long_list_goes_as_several_texts_split_between_items(sms: SmsEnv) -> None:
    blurb = "Unlimited calls and texts, data that rolls over, no contract, cancel any time. " * 3
    items = [Item(title=f"Plan {n}", description=blurb.strip(), actions=[
        PostbackAction(text=f"Pick plan {n}", payload=f"pick_{n}"),
        PostbackAction(text=f"Ask about plan {n}", payload=f"ask_{n}")]) for n in range(1, 9)]
    content = ListContent(items=items)
    send = outbound(sms, content)
    await publish(sms, send)
    bodies = [b["Body"] for b in await sent_bodies(sms, send)]
    blocks = [f"Plan {n} — {blurb.strip()}\n{2 * n - 1}. Pick plan {n}\n{2 * n}. Ask about plan {n}"
              for n in range(1, 9)]
    assert len("\n\n".join(blocks[:5])) <= 1600 < len("\n\n".join(blocks[:6]))
    # As many whole items as fit in 1,600 characters, then the rest: no choice is cut away and
    # the numbers run on across the texts, as the conversations service counts them.
    assert bodies == ["\n\n".join(blocks[:5]), "\n\n".join(blocks[5:])]
    assert [c["number"] for c in sms.fake.choices(sms.integration_id, CUSTOMER)] == list(range(1, 17))
    picked = render.answered_choice("12", content)
    assert isinstance(picked, PostbackAction) and picked.payload == "ask_6"
    # Each text is a message of its own at Twilio (the SDK reads them back), and status callbacks
    # of either one name the gateway's message.
    client = Client(ACCOUNT_SID, AUTH_TOKEN)
    client.api.base_url = f"{sms.system.base_url}/sandbox/twilio-api"
    first, second = [e.sid for e in sms.fake.thread(sms.integration_id, CUSTOMER)]
    fetched = [await asyncio.to_thread(client.messages(sid).fetch) for sid in (first, second)]
    assert [m.body for m in fetched] == bodies and all(int(m.num_segments or 0) > 1 for m in fetched)
    sent = await reported(sms, send)
    assert (sent.status, sent.provider_message_id, sent.conversation_id) == ("sent", first, send.conversation_id)
    assert sms.service.sender.sids.get(second) == (send.message_id, send.conversation_id)


async def test_a_text_that_is_one_long_paragraph_is_cut_between_words(sms: SmsEnv) -> None:
    words = " ".join(f"w{n:03d}" for n in range(400))  # 1,999 characters, no line breaks
    send = outbound(sms, TextContent(text=words))
    await publish(sms, send)
    bodies = [b["Body"] for b in await sent_bodies(sms, send)]
    assert bodies == [" ".join(f"w{n:03d}" for n in range(320)), " ".join(f"w{n:03d}" for n in range(320, 400))]


async def test_a_part_refused_transiently_is_resent_alone(sms: SmsEnv) -> None:
    # The first text goes through, the second gets a 500 once: the retry sends only the second.
    await sms.script("/fail-next", {"code": 20500, "httpStatus": 500, "count": 1, "skip": 1})
    send = outbound(sms, TextContent(text="A" * 1000 + "\n\n" + "B" * 1000))
    await publish(sms, send)
    bodies = [b["Body"] for b in await sent_bodies(sms, send)]
    assert bodies == ["A" * 1000, "B" * 1000]
    posted = [dict(r["form"])["Body"][0] for r in sms.fake.requests]
    assert posted == ["A", "B", "B"]


async def test_a_number_without_mms_gets_media_as_links(system: System, bus: Bus) -> None:
    sms = await start_sms(system, bus, mms=False)
    send = outbound(sms, ImageContent(media_url="https://example.com/a.jpg", text="our shop",
                                      actions=[ReplyAction(text="Visit", payload="visit")]))
    await publish(sms, send)
    [body] = await sent_bodies(sms, send)
    assert body["Body"] == "https://example.com/a.jpg\n\nour shop\n\n1. Visit" and "MediaUrl" not in body


async def test_image_with_choices_is_an_mms_with_numbered_caption(sms: SmsEnv) -> None:
    send = outbound(sms, ImageContent(media_url="https://example.com/a.jpg", text="New in",
                                      actions=[ReplyAction(text="Want it", payload="want")]))
    await publish(sms, send)
    [body] = await sent_bodies(sms, send)
    assert body["MediaUrl"] == ["https://example.com/a.jpg"] and body["Body"] == "New in\n\n1. Want it"


async def test_form_responses_and_templates_are_never_sent(sms: SmsEnv) -> None:
    answer = outbound(sms, FormResponseContent(fields=[FormField(type="text", name="name", label="Name",
                                                                 text="Ann")], text_fallback="Name: Ann"))
    template = outbound(sms, TemplateContent(template={"name": "order_update"}))
    for send in (answer, template):
        await publish(sms, send)
        failed = await reported(sms, send)
        assert (failed.status, failed.error_code) == ("failed", "unsupported_content")
    assert sms.fake.requests == []


async def test_business_typing_and_read_are_consumed_without_a_twilio_call(sms: SmsEnv) -> None:
    conversation_id = new_id()
    for activity in ("typing:start", "conversation:read", "typing:stop"):
        await sms.bus.publish(*encoded_activity(sms, conversation_id, activity))
    # Sends to the same customer wait for what came before them (one ordering key), so once this
    # one is sent the activities have been handled: none of them reached Twilio.
    send = outbound(sms, TextContent(text="after typing"))
    await publish(sms, send)
    await sent_bodies(sms, send)
    assert [dict(r["form"]).get("Body") for r in sms.fake.requests] == ["after typing"]
    # Handled directly, an activity returns at once (no Retry, no Poison) and calls nothing.
    subject, data = encoded_activity(sms, conversation_id, "typing:start")
    await sms.service.sender.on_outbound(data, {}, Delivery(subject, 1, 1))
    assert len(sms.fake.requests) == 1


def encoded_activity(sms: SmsEnv, conversation_id: str, activity: str) -> tuple[str, bytes]:
    message = OutboundActivity(app_id=sms.record.app_id, integration_id=sms.integration_id, channel="twilio",
                               conversation_id=conversation_id, user_id=new_id(), client_id=new_id(),
                               recipient=CUSTOMER, activity=activity,  # type: ignore[arg-type]
                               created_at=time.time())
    return channel.subject_of(message), channel.encode(message)

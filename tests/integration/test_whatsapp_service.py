"""The whatsapp service against real NATS and the sandbox's fake Cloud API, through the front door."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from shared import subjects
from shared.bus import Bus
from shared.ids import new_id
from shared.messages import channel
from shared.messages.channel import DeliveryStatus, InboundMessage, OutboundSend
from shared.signing import meta_signature
from shared.sunco import (
    ImageContent,
    LocationContent,
    ReplyAction,
    TemplateContent,
    TextContent,
    UnsupportedContent,
)
from tests.fakes.whatsapp import bsuid_for
from tests.fakes.whatsapp_env import (
    APP_SECRET,
    CUSTOMER,
    VERIFY_TOKEN,
    WaEnv,
    eventually,
    start_whatsapp,
    stream_messages,
)
from tests.harness import System


@pytest.fixture
async def wa(system: System, bus: Bus) -> AsyncIterator[WaEnv]:
    yield await start_whatsapp(system, bus)


async def test_verification_handshake(wa: WaEnv) -> None:
    async with httpx.AsyncClient() as http:
        ok = await http.get(wa.webhook_url, params={"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN,
                                                    "hub.challenge": "1158201444"})
        assert ok.status_code == 200 and ok.text == "1158201444"
        assert ok.headers["content-type"].startswith("text/plain")
        wrong = await http.get(wa.webhook_url, params={"hub.mode": "subscribe", "hub.verify_token": "nope",
                                                       "hub.challenge": "1"})
        assert wrong.status_code == 403
        wrong_mode = await http.get(wa.webhook_url, params={"hub.mode": "unsubscribe",
                                                            "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"})
        assert wrong_mode.status_code == 403
    assert (await wa.script("/verify", {}))["ok"] is True


async def test_signed_text_becomes_one_inbound_message(wa: WaEnv) -> None:
    sent = await wa.script("/inbound", {"from": CUSTOMER, "text": "hi there", "name": "Ada"})
    assert sent["webhookStatus"] == 200
    [message] = await wa.inbound()
    assert isinstance(message, InboundMessage)
    assert message.channel == "whatsapp" and message.client_type == "whatsapp"
    assert message.app_id == wa.record.app_id and message.integration_id == wa.integration_id
    assert message.provider_message_id == sent["wamid"]
    assert message.channel_user_id == bsuid_for(CUSTOMER)
    assert message.client_info["wa_id"] == "15551234567"
    assert message.client_info["bsuid"] == bsuid_for(CUSTOMER)
    assert message.display_name == "Ada"
    assert message.content == TextContent(text="hi there")
    assert message.received_at > 1_700_000_000
    assert message.raw["id"] == sent["wamid"]





async def test_one_malformed_message_does_not_hold_back_its_batch(wa: WaEnv, caplog: pytest.LogCaptureFixture) -> None:
    def text(wamid: str, body: str) -> dict[str, object]:
        return {"from": "15551234567", "id": wamid, "timestamp": "1717000000", "type": "text", "text": {"body": body}}

    value = {"messaging_product": "whatsapp", "metadata": {"phone_number_id": wa.record.config["phoneNumberId"]},
             "contacts": [{"profile": {"name": "Ada"}, "wa_id": "15551234567"}],
             "messages": [text("wamid.GOOD1", "first"), {**text("wamid.BAD", "broken"), "timestamp": "yesterday"},
                          text("wamid.GOOD2", "second")]}
    body = json.dumps({"object": "whatsapp_business_account",
                       "entry": [{"id": "waba", "changes": [{"field": "messages", "value": value}]}]}).encode()
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": meta_signature(APP_SECRET, body)}
    async with httpx.AsyncClient() as http:
        first = await http.post(wa.webhook_url, content=body, headers=headers)
        again = await http.post(wa.webhook_url, content=body, headers=headers)  # Meta's retry changes nothing
    assert first.status_code == again.status_code == 200
    inbound = await wa.inbound()
    assert sorted(m.provider_message_id for m in inbound) == ["wamid.GOOD1", "wamid.GOOD2"]
    reports = [r for r in caplog.records if r.getMessage().startswith("webhook item rejected")]
    assert len(reports) == 2 and all(r.levelname == "WARNING" for r in reports)
    fields = reports[0].fields  # type: ignore[attr-defined]
    assert fields["where"] == "entry[0].changes[0].value.messages[1]"
    assert fields["provider_message_id"] == "wamid.BAD" and "timestamp" in fields["reason"]
    assert fields["integration_id"] == wa.integration_id and fields["channel"] == "whatsapp"
    assert "broken" not in json.dumps(fields)  # the customer's text is never logged


async def test_content_types_are_normalized(wa: WaEnv) -> None:
    image = await wa.script("/inbound", {"from": CUSTOMER, "image": {"caption": "look", "mimeType": "image/png"}})
    button = await wa.script("/inbound", {"from": CUSTOMER, "buttonReply": {"id": "yes", "title": "Yes"},
                                          "contextId": "wamid.OUT1"})
    listed = await wa.script("/inbound", {"from": CUSTOMER, "listReply": {"id": "plan_pro", "title": "Pro"}})
    template_button = await wa.script("/inbound", {"from": CUSTOMER, "message": {
        "type": "button", "button": {"payload": "confirm_1234", "text": "Confirm"}}})
    location = await wa.script("/inbound", {"from": CUSTOMER, "location": {
        "latitude": 48.85, "longitude": 2.35, "name": "Shop", "address": "1 Rue X"}})
    sticker = await wa.script("/inbound", {"from": CUSTOMER, "message": {
        "type": "sticker", "sticker": {"id": "999", "mime_type": "image/webp", "animated": False}}})
    reaction = await wa.script("/inbound", {"from": CUSTOMER, "message": {
        "type": "reaction", "reaction": {"message_id": "wamid.OUT1", "emoji": "👍"}}})
    by_id = {m.provider_message_id: m for m in await wa.inbound()}
    assert len(by_id) == 7

    img = by_id[image["wamid"]]
    assert isinstance(img.content, ImageContent)
    assert img.content.text == "look" and img.content.media_type == "image/png"
    media_id = img.raw["image"]["id"]
    assert media_id in img.content.media_url
    async with httpx.AsyncClient() as http:  # the gateway serves the media it points at
        fetched = await http.get(img.content.media_url)
        assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
        forged = await http.get(img.content.media_url.split("?")[0] + "?sig=00")
        assert forged.status_code == 404

    tapped = by_id[button["wamid"]]
    assert tapped.content == TextContent(text="Yes", payload="yes")
    assert tapped.postback is not None and tapped.postback.payload == "yes"
    assert tapped.quoted_provider_message_id == "wamid.OUT1"
    assert by_id[listed["wamid"]].content == TextContent(text="Pro", payload="plan_pro")
    assert by_id[template_button["wamid"]].content == TextContent(text="Confirm", payload="confirm_1234")
    loc = by_id[location["wamid"]].content
    assert isinstance(loc, LocationContent) and loc.coordinates.lat == 48.85 and loc.location is not None
    for wamid, kind in ((sticker["wamid"], "sticker"), (reaction["wamid"], "reaction")):
        content = by_id[wamid].content
        assert isinstance(content, UnsupportedContent) and content.channel_type == kind
        assert content.raw["id"] == wamid and kind in content.raw


async def test_bsuid_present_or_absent(wa: WaEnv) -> None:
    no_bsuid = await wa.script("/inbound", {"from": "+15557770001", "text": "a", "withBsuid": False})
    no_phone = await wa.script("/inbound", {"from": "+15557770002", "text": "b", "withWaId": False})
    by_id = {m.provider_message_id: m for m in await wa.inbound()}
    phone_only = by_id[no_bsuid["wamid"]]
    assert phone_only.channel_user_id == "15557770001"
    assert phone_only.client_info.get("wa_id") == "15557770001" and "bsuid" not in phone_only.client_info
    username = by_id[no_phone["wamid"]]
    assert username.channel_user_id == bsuid_for("+15557770002")
    assert "wa_id" not in username.client_info and username.client_info["bsuid"] == bsuid_for("+15557770002")


def outbound(wa: WaEnv, content: TextContent | ImageContent | TemplateContent, **extra: object) -> OutboundSend:
    return OutboundSend(app_id=wa.record.app_id, integration_id=wa.integration_id, channel="whatsapp",
                        conversation_id=new_id(), message_id=new_id(), user_id=new_id(), client_id=new_id(),
                        recipient=bsuid_for(CUSTOMER), recipient_info={"wa_id": "15551234567"},
                        content=content, **extra)  # type: ignore[arg-type]


async def publish(wa: WaEnv, send: OutboundSend) -> None:
    await wa.bus.publish(channel.subject_of(send), channel.encode(send))


async def statuses_of(wa: WaEnv, message_id: str, count: int) -> list[DeliveryStatus]:
    async def probe() -> list[DeliveryStatus] | None:
        found = [s for s in await wa.statuses() if s.message_id == message_id]
        return found if len(found) >= count else None

    return await eventually(probe)


async def test_outbound_text_buttons_and_statuses(wa: WaEnv) -> None:
    send = outbound(wa, TextContent(text="Pick one", actions=[ReplyAction(text="Yes please", payload="yes"),
                                                             ReplyAction(text="No", payload="no")]))
    await publish(wa, send)
    # Accepted → `sent` from the send call, then `sent`/`delivered` webhooks, all naming our message.
    statuses = await statuses_of(wa, send.message_id, 3)
    [body] = wa.fake.outbox(wa.integration_id, CUSTOMER)
    assert body == {
        "messaging_product": "whatsapp", "recipient_type": "individual", "to": "15551234567",
        "type": "interactive",
        "interactive": {"type": "button", "body": {"text": "Pick one"}, "action": {"buttons": [
            {"type": "reply", "reply": {"id": "yes", "title": "Yes please"}},
            {"type": "reply", "reply": {"id": "no", "title": "No"}}]}},
        "biz_opaque_callback_data": f"tl:{send.conversation_id}:{send.message_id}",
    }
    wamid = wa.fake.thread(wa.integration_id, CUSTOMER)[0].wamid
    assert {s.status for s in statuses} >= {"sent", "delivered"}
    assert all(s.provider_message_id == wamid and s.conversation_id == send.conversation_id for s in statuses)


async def test_outbound_image_template_and_bsuid_recipient(wa: WaEnv) -> None:
    image = outbound(wa, ImageContent(media_url="https://example.com/a.jpg", text="our shop"))
    template = TemplateContent(template={"name": "order_update", "language": {"code": "en_US"},
                                         "components": [{"type": "body", "parameters": [{"type": "text",
                                                                                         "text": "#1234"}]}]})
    templ = outbound(wa, template)
    by_bsuid = outbound(wa, TextContent(text="hello username user"))
    by_bsuid.recipient_info = {}
    for send in (image, templ, by_bsuid):
        await publish(wa, send)
        await statuses_of(wa, send.message_id, 1)
    bodies = wa.fake.outbox(wa.integration_id, CUSTOMER)
    assert bodies[0]["image"] == {"link": "https://example.com/a.jpg", "caption": "our shop"}
    assert bodies[1]["type"] == "template" and bodies[1]["template"] == template.template
    assert bodies[2]["recipient"] == bsuid_for(CUSTOMER) and "to" not in bodies[2]


async def test_override_payload_is_sent_as_is(wa: WaEnv) -> None:
    payload = {"type": "text", "text": {"body": "raw override", "preview_url": True}}
    send = outbound(wa, TextContent(text="ignored"), override={"whatsapp": {"payload": payload}})
    await publish(wa, send)
    await statuses_of(wa, send.message_id, 1)
    [body] = wa.fake.outbox(wa.integration_id, CUSTOMER)
    assert body == {**payload, "messaging_product": "whatsapp", "to": "15551234567"}


async def test_transient_rate_limit_is_retried_then_sent(wa: WaEnv) -> None:
    await wa.script("/fail-next", {"code": 130429, "httpStatus": 400, "count": 2})
    send = outbound(wa, TextContent(text="eventually"))
    await publish(wa, send)
    [sent] = [s for s in await statuses_of(wa, send.message_id, 1) if s.status == "sent"][:1]
    assert sent.provider_message_id.startswith("wamid.")
    attempts = [r for r in wa.fake.requests if r["body"].get("text", {}).get("body") == "eventually"]
    assert len(attempts) == 3
    assert len(wa.fake.outbox(wa.integration_id, CUSTOMER)) == 1


@pytest.mark.parametrize(("code", "http_status"), [(131026, 400), (131008, 400)])
async def test_permanent_error_fails_without_retry(wa: WaEnv, code: int, http_status: int) -> None:
    await wa.script("/fail-next", {"code": code, "httpStatus": http_status, "count": 5})
    send = outbound(wa, TextContent(text="doomed"))
    await publish(wa, send)
    [failed] = await statuses_of(wa, send.message_id, 1)
    assert failed.status == "failed" and failed.error_code == str(code)
    assert failed.error_title and str(code) in failed.error_title
    assert failed.error_details
    # A later message goes through at once: the failed one was acked, not retried.
    probe = outbound(wa, TextContent(text="next"))
    await publish(wa, probe)
    await statuses_of(wa, probe.message_id, 1)
    assert len([r for r in wa.fake.requests if r["body"].get("text", {}).get("body") == "doomed"]) == 1


async def test_late_failed_and_read_statuses(wa: WaEnv) -> None:
    send = outbound(wa, TextContent(text="late news"))
    await publish(wa, send)
    await statuses_of(wa, send.message_id, 3)
    wamid = wa.fake.thread(wa.integration_id, CUSTOMER)[0].wamid
    await wa.script("/status", {"wamid": wamid, "status": "read"})
    await wa.script("/status", {"wamid": wamid, "status": "failed", "code": 131047})
    statuses = await statuses_of(wa, send.message_id, 5)
    failed = next(s for s in statuses if s.status == "failed")
    assert failed.provider_message_id == wamid
    assert failed.error_code == "131047" and failed.error_title == "Re-engagement message"
    assert failed.error_details and "24 hours" in failed.error_details
    assert any(s.status == "read" for s in statuses)


async def test_unknown_integration_send_fails_after_retries(system: System, bus: Bus) -> None:
    wa = await start_whatsapp(system, bus, env={"WHATSAPP_MAX_SEND_ATTEMPTS": "2"})
    send = outbound(wa, TextContent(text="to nowhere"))
    send.integration_id = new_id()
    await wa.bus.publish(channel.subject_of(send), channel.encode(send))

    async def probe() -> list[DeliveryStatus] | None:
        found = await stream_messages(bus, subjects.STATUS,
                                      subjects.integration_subjects("status", "whatsapp", send.integration_id))
        return found or None

    [failed] = await eventually(probe)
    assert failed.status == "failed" and failed.message_id == send.message_id


async def test_transient_errors_give_up_after_max_attempts(system: System, bus: Bus) -> None:
    wa = await start_whatsapp(system, bus, env={"WHATSAPP_MAX_SEND_ATTEMPTS": "3"})
    await wa.script("/fail-next", {"code": 131016, "httpStatus": 503, "count": 10})
    send = outbound(wa, TextContent(text="never lands"))
    await publish(wa, send)
    [failed] = await statuses_of(wa, send.message_id, 1)
    assert failed.status == "failed" and failed.error_code == "131016"
    assert len([r for r in wa.fake.requests if r["body"].get("text", {}).get("body") == "never lands"]) == 3
    assert wa.fake.outbox(wa.integration_id, CUSTOMER) == []

"""E-mail as a conversation channel, end to end over real SMTP and HTTP: a customer's mail starts
a conversation, the business's reply goes out threaded with a signed Reply-To, the customer's
answer to it lands in the same conversation with the quoted history stripped; Mailgun's and
SendGrid's inbound webhooks take the same path; forged, unauthenticated, automatic and hostile
mail is refused or set aside with a clear reason, and nothing accepted is lost."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import aiohttp
import aiosmtplib
import pytest

from services.conversations.store import MESSAGE_DECODER, StoredMessage
from shared.sunco import ImageContent, TextContent
from tests.fakes.whatsapp_env import eventually
from tests.harness import System, localhost_certificate
from tests.integration.test_conversations_api import Tenant, create_tenant, new_user_conversation

SUPPORT = "support@shop.example"
CUSTOMER = "pat@customer.example"
SIGNING_KEY = "key-mailgun-signing-0123456789"
INBOUND_SECRET = "sendgrid-inbound-secret-0123456789"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40


@dataclass
class Mail:
    tenant: Tenant
    integration_id: str

    @property
    def system(self) -> System:
        return self.tenant.system

    @property
    def smtp_port(self) -> int:
        port = self.system.service("email").smtp_port
        assert port is not None
        return int(port)

    async def send(self, message: EmailMessage, rcpt: list[str] | None = None) -> tuple[int, str]:
        """Deliver over SMTP; the DATA reply (code, text)."""
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.smtp_port, start_tls=False)
        await smtp.connect()
        try:
            recipients = rcpt or [str(message["To"])]
            _refused, reply = await smtp.send_message(message, recipients=recipients)
            return 250, reply
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        finally:
            await smtp.quit()

    async def stored(self, provider_id: str) -> StoredMessage | None:
        store = self.system.service("conversations").store
        return await store.message_by_provider_id(self.tenant.app_id, self.integration_id, provider_id)  # type: ignore[no-any-return]

    async def sink(self, to: str) -> list[dict[str, Any]] | None:
        async with self.tenant.http.get(f"{self.system.base_url}/sandbox/mail", params={"to": to}) as resp:
            mails = (await resp.json())["mails"]
        return mails or None


def authenticated(sender: str = CUSTOMER) -> str:
    domain = sender.rpartition("@")[2]
    return (f"sandbox.threadline.local; spf=pass smtp.mailfrom={sender}; dkim=pass header.d={domain};"
            f" dmarc=pass header.from={domain}")


def mail(text: str, *, sender: str = CUSTOMER, to: str = SUPPORT, subject: str = "Order 1042 arrived broken",
         auth: str | None = "default", **headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Pat Doe <{sender}>"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    if auth is not None:
        message["Authentication-Results"] = authenticated(sender) if auth == "default" else auth
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content(text)
    return message


@pytest.fixture
async def scene(system: System) -> AsyncIterator[Mail]:
    await system.start("identity", "conversations", "email", "sandbox")
    sink_port = system.service("sandbox").mail.port
    async with aiohttp.ClientSession() as http:
        app_id, key_id, secret = await create_tenant(system, http)
        tenant = Tenant(system, http, app_id, key_id, secret)
        status, body = await tenant.request("POST", f"/v2/apps/{app_id}/integrations", body={
            "type": "mailgun", "displayName": "Shop support", "incomingAddress": SUPPORT, "fromAddress": SUPPORT,
            "smtpHost": "127.0.0.1", "smtpPort": sink_port, "security": "none",
            "webhookSigningKey": SIGNING_KEY, "inboundSecret": INBOUND_SECRET})
        assert status == 201, body
        integration_id = body["integration"]["id"]

        async def seen() -> bool:
            return system.service("email").credentials(integration_id) is not None

        await eventually(seen)
        yield Mail(tenant, integration_id)


def text_of(message: StoredMessage) -> str:
    content = MESSAGE_DECODER.decode(message.body).content
    assert isinstance(content, TextContent)
    return content.text


async def test_a_mail_starts_a_conversation_the_reply_is_threaded_and_the_answer_joins_it(scene: Mail) -> None:
    first = mail("Hello,\nthe vase in order 1042 arrived in pieces.\n\n-- \nPat Doe\nSent from my phone")
    assert (await scene.send(first))[0] == 250
    stored = await eventually(lambda: scene.stored(str(first["Message-ID"])))
    assert text_of(stored) == "Order 1042 arrived broken\n\nHello,\nthe vase in order 1042 arrived in pieces."
    conversation_id = stored.conversation_id
    metadata = MESSAGE_DECODER.decode(stored.body).metadata or {}
    assert metadata["email:subject"] == "Order 1042 arrived broken" and metadata["email:dkim"] == "pass"
    assert metadata["email:messageId"] == str(first["Message-ID"])

    # The business answers through the API: one mail, threaded under the customer's.
    t = scene.tenant
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/conversations/{conversation_id}/messages", body={
        "author": {"type": "business"}, "content": {"type": "text", "text": "Sorry! A new one ships today."}})
    assert status == 201, body
    [sent] = await eventually(lambda: scene.sink(CUSTOMER), timeout=10.0)
    headers = {name: value for name, value in sent["headers"]}
    assert sent["subject"] == "Re: Order 1042 arrived broken"
    assert headers["In-Reply-To"] == str(first["Message-ID"])
    assert "Auto-Submitted" not in headers and sent["text"].strip() == "Sorry! A new one ships today."
    reply_to = headers["Reply-To"]
    assert reply_to.startswith("reply+") and reply_to.endswith("@shop.example")

    # The customer answers that mail: quoted history and signature stripped, same conversation.
    answer = mail("Great, thank you!\n\nOn Mon, 7 Dec 2026, Shop support <support@shop.example> wrote:\n"
                  "> Sorry! A new one ships today.\n", to=reply_to, subject="Re: Order 1042 arrived broken",
                  In_Reply_To=sent["messageId"], References=f"{first['Message-ID']} {sent['messageId']}")
    assert (await scene.send(answer))[0] == 250
    joined = await eventually(lambda: scene.stored(str(answer["Message-ID"])))
    assert joined.conversation_id == conversation_id and text_of(joined) == "Great, thank you!"
    # A retried delivery of the same mail is the same message.
    assert (await scene.send(answer))[0] == 250
    # A mail app that answers the incoming address instead still threads: In-Reply-To names our mail,
    # sent to this very address. The same In-Reply-To from anyone else joins nothing of Pat's.
    by_reference = mail("One more thing: the box was wet.", subject="Re: Order 1042 arrived broken",
                        In_Reply_To=sent["messageId"])
    assert (await scene.send(by_reference))[0] == 250
    assert (await eventually(lambda: scene.stored(str(by_reference["Message-ID"])))).conversation_id == conversation_id
    intruder = mail("Send the refund to me.", sender="eve@other.example", subject="Re: Order 1042 arrived broken",
                    In_Reply_To=sent["messageId"])
    assert (await scene.send(intruder))[0] == 250
    assert (await eventually(lambda: scene.stored(str(intruder["Message-ID"])))).conversation_id != conversation_id
    # The next answer threads under the customer's last mail, same subject, the whole chain referenced.
    await t.request("POST", f"/v2/apps/{t.app_id}/conversations/{conversation_id}/messages", body={
        "author": {"type": "business"}, "content": {"type": "text", "text": "Tracking: 1Z999."}})

    async def second() -> list[dict[str, Any]] | None:
        mails = await scene.sink(CUSTOMER) or []
        return mails if len(mails) >= 2 else None

    later = next(m for m in await eventually(second, timeout=10.0) if "Tracking" in m["text"])
    later_headers = {name: value for name, value in later["headers"]}
    assert later["subject"] == "Re: Order 1042 arrived broken"
    assert later_headers["In-Reply-To"] == str(by_reference["Message-ID"])
    assert later_headers["References"].split() == [str(first["Message-ID"]), sent["messageId"],
                                                   str(answer["Message-ID"]), str(by_reference["Message-ID"])]


async def test_forged_unauthenticated_automatic_and_hostile_mail_is_refused_or_set_aside(scene: Mail) -> None:
    first = mail("Where is my parcel?")
    assert (await scene.send(first))[0] == 250
    stored = await eventually(lambda: scene.stored(str(first["Message-ID"])))
    t = scene.tenant
    await t.request("POST", f"/v2/apps/{t.app_id}/conversations/{stored.conversation_id}/messages", body={
        "author": {"type": "business"}, "content": {"type": "text", "text": "On its way."}})
    [sent] = await eventually(lambda: scene.sink(CUSTOMER), timeout=10.0)
    reply_to = {name: value for name, value in sent["headers"]}["Reply-To"]

    refused = {
        "no authentication": mail("hi", auth=None),
        "a header from an untrusted host": mail("hi", auth="mx.attacker.example; dkim=pass header.d=customer.example;"
                                                           " spf=pass smtp.mailfrom=pat@customer.example"),
        "DMARC failed": mail("hi", auth="sandbox.threadline.local; spf=fail smtp.mailfrom=pat@customer.example;"
                                        " dkim=fail header.d=customer.example;"
                                        " dmarc=fail header.from=customer.example"),
        # Eve (authenticated for her own domain) replies with Pat's reply address.
        "another sender's reply address": mail("transfer the refund to me", sender="eve@other.example", to=reply_to),
    }
    for what, message in refused.items():
        code, reason = await scene.send(message)
        assert code == 550, (what, code, reason)
        assert await scene.stored(str(message["Message-ID"])) is None, what
    code, reason = await scene.send(mail("x", auth=None))
    assert "not authenticated" in reason
    code, reason = await scene.send(refused["another sender's reply address"])
    assert code == 550 and "not issued to this sender" in reason

    # Two authors: a verifier may vouch for one and a reader believe the other.
    two_from = (f"From: Pat <{CUSTOMER}>\r\nFrom: Eve <eve@other.example>\r\nTo: {SUPPORT}\r\nSubject: hi\r\n"
                f"Message-ID: <two@customer.example>\r\nAuthentication-Results: {authenticated()}\r\n\r\nhi\r\n")
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=scene.smtp_port, start_tls=False)
    await smtp.connect()
    with pytest.raises(aiosmtplib.SMTPDataError) as two_authors:
        await smtp.sendmail(CUSTOMER, [SUPPORT], two_from.encode())
    assert two_authors.value.code == 550 and "exactly one From" in two_authors.value.message
    # At most 100 recipients per mail.
    await smtp.ehlo()
    await smtp.mail(CUSTOMER)
    for index in range(100):
        await smtp.rcpt(f"reply+{index:055d}@shop.example")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as crowded:
        await smtp.rcpt("reply+x@shop.example")
    assert crowded.value.code == 452
    await smtp.quit()
    # An out-of-office reply is taken (250) and set aside: no message.
    away = mail("I am away until Monday.", Auto_Submitted="auto-replied")
    assert (await scene.send(away))[0] == 250
    # A mail bomb: MIME nested past the limit.
    bomb = b"".join(f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n".encode() for i in range(200))
    raw = (f"From: {CUSTOMER}\r\nTo: {SUPPORT}\r\nSubject: bomb\r\nMessage-ID: <bomb@customer.example>\r\n"
           f"Authentication-Results: {authenticated()}\r\n").encode() + bomb
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=scene.smtp_port, start_tls=False)
    await smtp.connect()
    with pytest.raises(aiosmtplib.SMTPDataError) as bombed:
        await smtp.sendmail(CUSTOMER, [SUPPORT], raw)
    assert bombed.value.code == 550 and "nesting" in bombed.value.message
    # An address that is none of ours is refused at RCPT (no backscatter).
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await smtp.sendmail(CUSTOMER, ["nobody@shop.example"], b"Subject: x\r\n\r\nx")
    await smtp.quit()
    assert await scene.stored(str(away["Message-ID"])) is None
    assert await scene.stored("<bomb@customer.example>") is None


async def test_attachments_are_kept_and_the_webhooks_take_the_same_path(scene: Mail) -> None:
    with_photo = mail("Here is a photo.")
    with_photo.add_attachment(PNG, maintype="image", subtype="png", filename="../../broken vase.png")
    assert (await scene.send(with_photo))[0] == 250
    photo = await eventually(lambda: scene.stored(f"{with_photo['Message-ID']}/1"))
    content = MESSAGE_DECODER.decode(photo.body).content
    assert isinstance(content, ImageContent) and content.media_type == "image/png"
    assert content.media_url and content.media_url.endswith("/broken%20vase.png")
    async with scene.tenant.http.get(content.media_url) as resp:
        assert resp.status == 200 and await resp.read() == PNG

    # Mailgun's inbound route: signed with the webhook signing key.
    base = f"{scene.system.base_url}/webhooks/mailgun/{scene.integration_id}"
    timestamp, token = str(int(time.time())), "t" * 50
    signature = hmac.new(SIGNING_KEY.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
    fields = {"recipient": SUPPORT, "sender": "sam@customer.example", "from": "Sam <sam@customer.example>",
              "subject": "Invoice", "body-plain": "Please resend my invoice.",
              "stripped-text": "Please resend my invoice.",
              "Message-Id": "<mg-1@customer.example>", "timestamp": timestamp, "token": token, "signature": signature,
              "message-headers": '[["Message-Id", "<mg-1@customer.example>"], ["X-Mailgun-Spf", "Pass"],'
                                 ' ["X-Mailgun-Dkim-Check-Result", "Pass"],'
                                 ' ["DKIM-Signature", "v=1; d=customer.example; s=k"]]'}
    async with scene.tenant.http.post(base, data=fields) as resp:
        assert resp.status == 200, await resp.text()
    assert text_of(await eventually(lambda: scene.stored("<mg-1@customer.example>"))).endswith(
        "Please resend my invoice.")
    async with scene.tenant.http.post(base, data={**fields, "signature": "0" * 64}) as resp:
        assert resp.status == 401
    # The signature covers the timestamp and token, not the body: a captured one carries no other
    # mail; Mailgun's retry of the same post is taken again (and is the same message).
    async with scene.tenant.http.post(base, data={**fields, "body-plain": "Refund me to IBAN XX00."}) as resp:
        assert resp.status == 401
    async with scene.tenant.http.post(base, data=fields) as resp:
        assert resp.status == 200
    timestamp, token = str(int(time.time())), "u" * 50
    signature = hmac.new(SIGNING_KEY.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
    unsigned_by_spf = {**fields, "timestamp": timestamp, "token": token, "signature": signature,
                       "message-headers": '[["X-Mailgun-Spf", "Fail"]]'}
    async with scene.tenant.http.post(base, data=unsigned_by_spf) as resp:
        assert resp.status == 406 and "not authenticated" in (await resp.json())["errors"][0]["title"]

    # SendGrid's Inbound Parse: the secret in the path.
    sendgrid = f"{scene.system.base_url}/webhooks/sendgrid/{scene.integration_id}"
    form = aiohttp.FormData()
    for name, value in {"from": "Kim <kim@customer.example>", "to": SUPPORT, "subject": "Size",
                        "text": "Do you have it in blue?", "SPF": "pass", "dkim": "{@customer.example : pass}",
                        "envelope": '{"to": ["support@shop.example"], "from": "kim@customer.example"}',
                        "headers": "Message-ID: <sg-1@customer.example>\nFrom: Kim <kim@customer.example>\n"}.items():
        form.add_field(name, value)
    async with scene.tenant.http.post(f"{sendgrid}/{INBOUND_SECRET}", data=form) as resp:
        assert resp.status == 200, await resp.text()
    assert text_of(await eventually(lambda: scene.stored("<sg-1@customer.example>"))).endswith(
        "Do you have it in blue?")
    async with scene.tenant.http.post(f"{sendgrid}/wrong-secret-0123456789", data={"to": SUPPORT}) as resp:
        assert resp.status == 401
    # A body no ESP sends: hundreds of fields (each costs memory however small), an unknown charset.
    flood = aiohttp.FormData()
    for index in range(300):
        flood.add_field(f"f{index}", "")
    async with scene.tenant.http.post(f"{sendgrid}/{INBOUND_SECRET}", data=flood) as resp:
        assert resp.status == 400 and "fields" in (await resp.json())["errors"][0]["title"]
    odd = aiohttp.FormData()
    for name, value in {"from": "Kim <kim@customer.example>", "to": SUPPORT, "subject": "Size", "SPF": "pass",
                        "dkim": "{@customer.example : pass}",
                        "headers": "Message-ID: <sg-2@customer.example>\nFrom: Kim <kim@customer.example>\n"}.items():
        odd.add_field(name, value)
    odd.add_field("text", b"Blue?", content_type="text/plain; charset=x-no-such-charset")
    async with scene.tenant.http.post(f"{sendgrid}/{INBOUND_SECRET}", data=odd) as resp:
        assert resp.status == 200, await resp.text()


async def test_an_address_linked_by_the_business_gets_its_messages_and_replies_into_the_conversation(
        scene: Mail) -> None:
    """SunCo's direct linking with `matchCriteria.type: mailgun`: the business links an address to
    a user's conversation; its messages go out by mail; the reply continues the conversation."""
    t = scene.tenant
    user_id, conversation_id = await new_user_conversation(t, "lee")
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/users/{user_id}/clients", body={
        "matchCriteria": {"type": "mailgun", "integrationId": scene.integration_id, "address": "Lee@Customer.example",
                          "primary": True},
        "confirmation": {"type": "immediate"}, "target": {"conversationId": conversation_id}})
    assert status == 201, body
    assert body["client"]["type"] == "mailgun" and body["client"]["externalId"] == "lee@customer.example"
    await t.request("POST", f"/v2/apps/{t.app_id}/conversations/{conversation_id}/messages", body={
        "author": {"type": "business"}, "content": {"type": "text", "text": "Your refund is on its way."}})
    [sent] = await eventually(lambda: scene.sink("lee@customer.example"), timeout=10.0)
    reply_to = {name: value for name, value in sent["headers"]}["Reply-To"]
    answer = mail("Thanks!\n\n> Your refund is on its way.", sender="lee@customer.example", to=reply_to,
                  subject=f"Re: {sent['subject']}", In_Reply_To=sent["messageId"])
    assert (await scene.send(answer))[0] == 250
    joined = await eventually(lambda: scene.stored(str(answer["Message-ID"])))
    assert joined.conversation_id == conversation_id and text_of(joined) == "Thanks!"


async def test_a_conversation_is_handed_off_to_e_mail_with_a_mailto_link(scene: Mail) -> None:
    await scene.system.start("handoff")
    t = scene.tenant
    user_id, conversation_id = await new_user_conversation(t, "kai")
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/users/{user_id}/linkRequests", body={
        "integrationIds": [scene.integration_id], "conversationId": conversation_id})
    assert status == 201, body
    [link] = body["linkRequests"]
    url = urlsplit(link["url"])
    assert url.scheme == "mailto" and unquote(url.path) == SUPPORT
    query = dict(parse_qsl(url.query))
    # The customer's mail app sends the prefilled mail.
    handed = mail(query["body"], sender="kai@customer.example", subject=query["subject"])
    assert (await scene.send(handed))[0] == 250

    async def linked() -> str | None:
        clients = (await t.request("GET", f"/v2/apps/{t.app_id}/users/{user_id}/clients"))[1]["clients"]
        found = [c for c in clients if c["type"] == "mailgun"]
        return found[0]["externalId"] if found else None

    assert await eventually(linked, timeout=10.0) == "kai@customer.example"
    # The code is not stored as the customer's message; the recap goes out by mail.
    assert await scene.stored(str(handed["Message-ID"])) is None
    assert await eventually(lambda: scene.sink("kai@customer.example"), timeout=10.0)


async def test_the_receiver_offers_starttls_and_turns_away_sessions_past_its_limit(
        system: System, tmp_path: Path) -> None:
    _server, client_context, cert, key = localhost_certificate(tmp_path)
    await system.start("identity", "conversations", "email", env={
        "THREADLINE_MAIL_MAX_SESSIONS": "1", "THREADLINE_MAIL_TLS_CERT_FILE": str(cert),
        "THREADLINE_MAIL_TLS_KEY_FILE": str(key)})
    port = system.service("email").smtp_port
    first = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=client_context)
    await first.connect()
    assert first.get_transport_info("sslcontext") is not None  # upgraded by STARTTLS
    # A second session while the first is open: 421, the sender retries later.
    second = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as busy:
        await second.connect()
    assert busy.value.code == 421
    await first.quit()
    third = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await third.connect()  # the slot is free again
    await third.quit()


async def test_an_incoming_address_belongs_to_one_integration(scene: Mail) -> None:
    """Another app cannot take the address customers write to (its mail would reach one app only)."""
    t = scene.tenant
    other_app, key_id, secret = await create_tenant(t.system, t.http, "Squatter")
    squatter = Tenant(t.system, t.http, other_app, key_id, secret)
    status, body = await squatter.request("POST", f"/v2/apps/{other_app}/integrations", body={
        "type": "mailgun", "incomingAddress": SUPPORT.upper(), "fromAddress": "x@squat.example",
        "smtpHost": "127.0.0.1", "security": "none"})
    assert status == 409 and body["errors"][0]["code"] == "conflict", body
    status, body = await squatter.request("POST", f"/v2/apps/{other_app}/integrations", body={
        "type": "mailgun", "incomingAddress": "hello@squat.example", "fromAddress": "x@squat.example",
        "smtpHost": "127.0.0.1", "security": "none"})
    assert status == 201, body
    status, body = await squatter.request(
        "PATCH", f"/v2/apps/{other_app}/integrations/{body['integration']['id']}", body={"incomingAddress": SUPPORT})
    assert status == 409, body
    # Mail to the address still reaches its owner.
    message = mail("Is the shop open on Sunday?")
    assert (await scene.send(message))[0] == 250
    assert (await eventually(lambda: scene.stored(str(message["Message-ID"])))) is not None


async def test_a_mail_built_to_be_slow_to_read_is_refused_without_stalling_the_service(system: System) -> None:
    """Reading happens in worker processes with a budget: the service answers meanwhile, the mail
    is refused with a reason, and the next mail is read by a fresh worker."""
    await system.start("identity", "conversations", "email", env={"THREADLINE_MAIL_PARSE_BUDGET_SECONDS": "3"})
    service = system.service("email")
    async with aiohttp.ClientSession() as http:
        app_id, key_id, secret = await create_tenant(system, http)
        tenant = Tenant(system, http, app_id, key_id, secret)
        status, body = await tenant.request("POST", f"/v2/apps/{app_id}/integrations", body={
            "type": "mailgun", "incomingAddress": SUPPORT, "fromAddress": SUPPORT, "smtpHost": "127.0.0.1",
            "security": "none"})
        assert status == 201, body

        async def seen() -> bool:
            return service.credentials(body["integration"]["id"]) is not None

        await eventually(seen)
        # HTML that Python's parser reads in quadratic time (seconds for a few hundred KB).
        slow = mail("")
        slow.set_content("</" * 160_000, subtype="html", cte="base64")
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=service.smtp_port, start_tls=False)
        await smtp.connect()
        sending = asyncio.create_task(smtp.send_message(slow))
        await asyncio.sleep(0.5)
        async with http.get(f"{system.service_url('email')}/healthz") as resp:  # the loop is free
            assert resp.status == 200 and not sending.done()
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await sending
        assert refused.value.code == 550 and "could not be read" in refused.value.message
        await smtp.quit()
        ok = mail("Are you open?")
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=service.smtp_port, start_tls=False)
        await smtp.connect()
        await smtp.send_message(ok)
        await smtp.quit()

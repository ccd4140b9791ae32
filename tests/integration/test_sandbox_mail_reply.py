"""The sandbox mail box replies: a customer opted in to e-mail notifications from the widget's SDK
API is notified by mail while away, answers that mail through the sandbox's scripting API (real
SMTP to the e-mail service's receiver, as the customer's mail client would), and the business
reads the answer in the conversation's history with the quoted original stripped. What the
receiver refuses comes back as its SMTP code; with no receiver configured replies are off (503)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from services.sandbox.config import SandboxConfig
from services.sandbox.smtp_fake import AUTHSERV_ID, attribution, reply_message
from shared.config import ConfigError
from shared.http import basic_auth_header
from shared.mailreply import SANDBOX_AUTHSERV_ID
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, start_sdk_session
from tests.integration.test_web_conversation import eventually
from threadline.bootstrap import SANDBOX_MAIL_INBOX, AccountKey, bootstrap_sandbox

NOTIFY_ENV = {"THREADLINE_NOTIFY_DEFAULT_DELAY_SECONDS": "1", "THREADLINE_NOTIFY_TICK_SECONDS": "0.1"}
# What the sandbox needs running before it: the e-mail service's SMTP receiver gives it its port.
SERVICES = ("identity", "conversations", "webhooks", "notifications", "email", "web")
CUSTOMER = "pat@example.com"
REPLY_DOMAIN = SANDBOX_MAIL_INBOX.rpartition("@")[2]


@dataclass
class MailScene:
    http: aiohttp.ClientSession
    system: System
    info: dict[str, Any]
    auth: dict[str, str]
    session: dict[str, Any]

    @property
    def base(self) -> str:
        return self.system.base_url

    @property
    def app_id(self) -> str:
        return str(self.info["appId"])

    @property
    def conversation_id(self) -> str:
        return str(self.session["conversationId"])

    async def sdk(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        url = f"{self.base}/sdk/v1/apps/{self.app_id}/conversations/{self.conversation_id}{path}"
        async with self.http.request(method, url, json=body,
                                     headers={"Authorization": f"Bearer {self.session['sessionToken']}"}) as resp:
            return resp.status, await resp.json()

    async def business(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with self.http.request(method, f"{self.base}/v2/apps/{self.app_id}{path}", json=body,
                                     headers=self.auth) as resp:
            assert resp.status in (200, 201), await resp.text()
            data: dict[str, Any] = await resp.json()
        return data

    async def mail_box(self, address: str = CUSTOMER) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.base}/sandbox/mail", params={"to": address}) as resp:
            assert resp.status == 200, await resp.text()
            return list((await resp.json())["mails"])

    async def reply(self, mail_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self.http.post(f"{self.base}/sandbox/mail/{mail_id}/reply", json=body) as resp:
            return resp.status, await resp.json()

    async def history(self) -> list[dict[str, Any]]:
        return list((await self.business("GET", f"/conversations/{self.conversation_id}/messages"))["messages"])


@pytest.fixture
async def mail_scene(system: System, tmp_path: Path) -> AsyncIterator[MailScene]:
    """The e-mail service's receiver, then the sandbox told its port; a web visitor's conversation."""
    await system.start(*SERVICES, env=NOTIFY_ENV)
    port = system.service("email").smtp_port
    assert isinstance(port, int) and port > 0
    await system.start("sandbox", env={**NOTIFY_ENV, "THREADLINE_MAIL_SMTP_PORT": str(port)})
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   str(tmp_path / "sbx"), ("web", "email"))
    async with aiohttp.ClientSession() as http:
        session = await start_sdk_session(http, system.base_url, info["appId"], info["integrations"]["web"]["id"],
                                          "Is my order on its way?")
        scene = MailScene(http, system, info, basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]),
                          session)

        async def email_integration_seen() -> bool:
            return system.service("email").credentials(info["integrations"]["email"]["id"]) is not None

        await eventually(email_integration_seen, timeout=10.0)
        yield scene


async def opt_in_by_email(s: MailScene, address: str) -> None:
    """The widget's "Notify me by e-mail": the code mailed to `address`, typed back."""
    status, body = await s.sdk("POST", "/notificationOptIns", {"channel": "email", "address": address})
    assert status == 201, body
    opt_in_id = body["optIn"]["id"]

    async def code() -> str | None:
        for mail in await s.mail_box(address):
            found = re.search(r"\b(\d{6})\b", mail["subject"])
            if found:
                return found.group(1)
        return None

    status, body = await s.sdk("POST", f"/notificationOptIns/{opt_in_id}/confirm",
                               {"code": await eventually(code, timeout=10.0)})
    assert status == 200 and body["optIn"]["status"] == "confirmed", body


async def test_a_reply_from_the_sandbox_mail_box_joins_the_conversation_without_the_quote(
        mail_scene: MailScene) -> None:
    s = mail_scene
    await opt_in_by_email(s, CUSTOMER)

    async def address_linked() -> bool:
        clients = (await s.business("GET", f"/users/{s.session['appUserId']}/clients"))["clients"]
        return any(c["type"] == "mailgun" and c.get("externalId") == CUSTOMER for c in clients)

    await eventually(address_linked, timeout=10.0)

    # The customer is away (no widget socket): the business's reply is notified by mail.
    await s.business("POST", f"/conversations/{s.conversation_id}/messages", {
        "author": {"type": "business"}, "content": {"type": "text", "text": "Yes, it ships today."}})

    async def notification() -> dict[str, Any] | None:
        found = [m for m in await s.mail_box() if "Yes, it ships today." in (m["text"] or "")]
        return found[0] if found else None

    notice = await eventually(notification, timeout=15.0)
    headers = dict(notice["headers"])
    assert notice["direction"] == "received"
    assert notice["replyTo"] == headers["Reply-To"]
    assert notice["replyTo"].startswith("reply+") and notice["replyTo"].endswith(f"@{REPLY_DOMAIN}")

    status, answer = await s.reply(notice["id"], {"text": "Great, thanks!\nSee you Monday."})
    assert status == 200, answer
    assert answer["sent"] is True and answer["smtp"]["code"] == 250
    sent = answer["mail"]
    assert sent["direction"] == "sent" and sent["repliedTo"] == notice["id"]
    assert sent["from"] == CUSTOMER and sent["to"] == [notice["replyTo"]]
    assert sent["subject"] == f"Re: {notice['subject']}"
    sent_headers = dict(sent["headers"])
    assert sent_headers["In-Reply-To"] == notice["messageId"]
    assert sent_headers["References"].split()[-1] == notice["messageId"]
    assert sent_headers["Message-ID"] not in (notice["messageId"], "")
    assert sent_headers["Authentication-Results"].startswith(f"{SANDBOX_AUTHSERV_ID}; spf=pass")
    # What a mail client writes: the new text, then the original quoted under its attribution.
    assert sent["text"].startswith("Great, thanks!\nSee you Monday.\n\nOn ")
    assert f"{notice['from']} wrote:\n> " in sent["text"]
    assert "> Yes, it ships today." in sent["text"]
    # The mail box lists the reply it sent, next to what it received.
    box = await s.mail_box()
    assert [m["id"] for m in box if m["direction"] == "sent"] == [sent["id"]]

    async def reply_in_history() -> dict[str, Any] | None:
        found = [m for m in await s.history()
                 if m["author"]["type"] == "user" and m.get("source", {}).get("type") == "mailgun"]
        return found[0] if found else None

    joined = await eventually(reply_in_history, timeout=15.0)
    assert joined["content"] == {"type": "text", "text": "Great, thanks!\nSee you Monday."}
    assert all("wrote:" not in (m["content"].get("text") or "") for m in await s.history())

    # A mail the mail box sent is not replied to; an unknown one is not found; the reply goes out
    # from an address the mail was sent to only.
    status, refused = await s.reply(sent["id"], {"text": "again"})
    assert status == 400, refused
    status, refused = await s.reply("0" * 24, {"text": "hello?"})
    assert status == 404, refused
    status, refused = await s.reply(notice["id"], {"text": "hi", "from": "eve@example.com"})
    assert status == 400 and "address the mail was sent to" in refused["errors"][0]["title"]
    status, refused = await s.reply(notice["id"], {"text": "   "})
    assert status == 400, refused


async def test_a_reply_the_receiver_refuses_comes_back_with_its_smtp_code(mail_scene: MailScene) -> None:
    """The opt-in code mail names no conversation (no Reply-To): its reply goes to the From
    address, which is no mailbox of the receiver's, and is refused at RCPT with 550."""
    s = mail_scene
    status, body = await s.sdk("POST", "/notificationOptIns", {"channel": "email", "address": CUSTOMER})
    assert status == 201, body

    async def code_mail() -> dict[str, Any] | None:
        found = [m for m in await s.mail_box() if re.search(r"\b\d{6}\b", m["subject"])]
        return found[0] if found else None

    mail = await eventually(code_mail, timeout=10.0)
    assert mail["replyTo"] is None
    status, answer = await s.reply(mail["id"], {"text": "what is this code for?"})
    assert status == 502, answer
    assert answer["sent"] is False and answer["smtp"]["code"] == 550 and answer["smtp"]["message"]
    assert answer["errors"][0]["code"] == "smtp_refused"
    assert all(m["direction"] == "received" for m in await s.mail_box())  # nothing kept as sent


async def test_without_a_receiver_port_replies_are_off_with_a_reason(system: System) -> None:
    # The tests' System gives every service THREADLINE_MAIL_SMTP_PORT=0: a port the sandbox cannot know.
    await system.start("sandbox")
    sink = system.service("sandbox").mail
    message = EmailMessage()
    message["From"] = "shop@example.test"
    message["To"] = CUSTOMER
    message["Subject"] = "Hello"
    message["Message-ID"] = "<hello@example.test>"
    message.set_content("Hello Pat")
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
    await smtp.connect()
    await smtp.send_message(message)
    await smtp.quit()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{system.base_url}/sandbox/mail", params={"to": CUSTOMER}) as resp:
            listed = await resp.json()
        [mail] = listed["mails"]
        replies = listed["replies"]
        assert replies["enabled"] is False and "THREADLINE_MAIL_SMTP_PORT" in replies["reason"]
        async with http.post(f"{system.base_url}/sandbox/mail/{mail['id']}/reply", json={"text": "hi"}) as resp:
            assert resp.status == 503
            assert "THREADLINE_MAIL_SMTP_PORT" in (await resp.json())["errors"][0]["title"]


def test_the_receiver_port_is_validated_at_start() -> None:
    base = {"THREADLINE_SANDBOX": "1"}
    assert SandboxConfig.from_env(base).mail_receiver_port is None
    assert "not set" in SandboxConfig.from_env(base).mail_receiver_problem
    off = SandboxConfig.from_env({**base, "THREADLINE_MAIL_SMTP_PORT": "off"})
    assert off.mail_receiver_port is None and "off" in off.mail_receiver_problem
    on = SandboxConfig.from_env({**base, "THREADLINE_MAIL_SMTP_PORT": "2526", "THREADLINE_MAIL_SMTP_HOST": "0.0.0.0"})
    assert (on.mail_receiver_host, on.mail_receiver_port, on.mail_receiver_problem) == ("127.0.0.1", 2526, "")
    elsewhere = SandboxConfig.from_env({**base, "THREADLINE_MAIL_SMTP_PORT": "2526",
                                        "THREADLINE_SANDBOX_MAIL_HOST": "email.threadline.svc"})
    assert (elsewhere.mail_receiver_host, elsewhere.mail_receiver_port) == ("email.threadline.svc", 2526)
    for bad in ("smtp", "70000", "-1"):
        with pytest.raises(ConfigError, match="THREADLINE_MAIL_SMTP_PORT"):
            SandboxConfig.from_env({**base, "THREADLINE_MAIL_SMTP_PORT": bad})


def test_the_reply_is_what_a_mail_client_writes() -> None:
    # The e-mail service trusts the sandbox's stamp by this name.
    assert AUTHSERV_ID == SANDBOX_AUTHSERV_ID
    mail = {"id": "m1", "subject": "RE:  Order 1042", "from": "Shop <shop@example.test>", "replyTo": None,
            "messageId": "<b@example.test>", "references": "<a@example.test>",
            "date": "Mon, 07 Dec 2026 15:04:00 +0000",
            "text": "Line one\n\n> earlier\nLine two\n", "html": None}
    message = reply_message(mail, "Thanks!", "pat@example.com", now=0)
    assert message["To"] == "shop@example.test" and message["Subject"] == "RE: Order 1042"
    assert message["References"] == "<a@example.test> <b@example.test>" and message["In-Reply-To"] == "<b@example.test>"
    assert attribution(mail) == "On Mon, Dec 7, 2026 at 3:04 PM, Shop <shop@example.test> wrote:"
    body = message.get_body(("plain",))
    assert body is not None
    assert body.get_content() == ("Thanks!\n\nOn Mon, Dec 7, 2026 at 3:04 PM, Shop <shop@example.test> wrote:\n"
                                  "> Line one\n>\n>> earlier\n> Line two\n")
    html_only = {**mail, "text": None, "html": "<p>Hello <b>Pat</b></p><script>x()</script><p>Bye &amp; thanks</p>",
                 "replyTo": "reply+tok@example.test", "references": None, "subject": "Hi"}
    message = reply_message(html_only, "Ok", "pat@example.com", now=0)
    assert message["To"] == "reply+tok@example.test" and message["Subject"] == "Re: Hi"
    assert message["References"] == "<b@example.test>"
    body = message.get_body(("plain",))
    assert body is not None and body.get_content().endswith("wrote:\n> Hello Pat\n> Bye & thanks\n")

"""A customer's text is a handoff redemption only when it is the prefilled message or a code on its
own: a code-shaped word inside their own words is their message, stored and never answered with
"this code isn't valid", and it does not count against their attempt limit. An invalid code sent
on its own is answered and still stored as the customer's message (nothing is ever dropped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from shared.http import basic_auth_header
from tests.e2e.test_handoff_channels import outbox_texts, phone_spec
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks, start_sdk_session
from tests.integration.test_web_conversation import eventually
from threadline.bootstrap import AccountKey, bootstrap_sandbox

SENDER = "+15557000321"


async def test_code_shaped_words_are_the_customers_message(system: System, tmp_path: Path) -> None:
    async with business_webhooks() as (hook_url, events), aiohttp.ClientSession() as http:
        await system.start("identity", "conversations", "webhooks", "handoff", "whatsapp", "web", "sandbox")
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       str(tmp_path / "sbx"), ("web", "whatsapp"))
        base, app_id = system.base_url, info["appId"]
        web_id, wa_id = info["integrations"]["web"]["id"], info["integrations"]["whatsapp"]["id"]
        auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
        phone = f"{base}/sandbox/whatsapp/{wa_id}"
        async with http.post(f"{base}/v2/apps/{app_id}/integrations", headers=auth, json={
                "type": "custom", "webhooks": [{"target": hook_url, "triggers": [
                    "conversation:message", "client:add"]}]}) as resp:
            assert resp.status == 201

        async def send(text: str) -> None:
            async def delivered() -> bool:
                async with http.post(f"{phone}/inbound", json={"from": SENDER, "text": text}) as resp:
                    return resp.status == 200 and (await resp.json()).get("webhookStatus", 200) == 200

            await eventually(timeout=20.0, check=delivered)

        def stored(text: str) -> bool:
            return any(e["type"] == "conversation:message"
                       and e["payload"]["message"]["content"].get("text") == text for e in events)

        async def outbox() -> list[str]:
            async with http.get(f"{phone}/outbox", params={"to": SENDER}) as resp:
                return outbox_texts("whatsapp", (await resp.json())["messages"])

        own_words = ["My tracking number is TL12345678", "Also TLXPRESS12 order", "is TLABCD2345 my code?",
                     "TL12345678 and TL87654321", "ref TLQQQQQQQQ", "TLZZZZZZZZ was on the box"]
        for text in own_words:  # more than the 5 failed attempts a sender may make
            await send(text)
        for text in own_words:
            await eventually(timeout=20.0, check=lambda text=text: _true(stored(text)))
        assert not any("isn't valid" in t for t in await outbox())

        # An invalid code on its own is answered, and still kept as the customer's message.
        await send("TL0000ZZZZ")
        await eventually(timeout=20.0, check=lambda: _true(stored("TL0000ZZZZ")))
        await eventually(timeout=20.0, check=lambda: _any(outbox(), "isn't valid"))

        # The words above did not count against the sender: a real link still works.
        session = await start_sdk_session(http, base, app_id, web_id)
        async with http.post(f"{base}/v2/apps/{app_id}/users/{session['appUserId']}/linkRequests", headers=auth,
                             json={"integrationIds": [wa_id]}) as resp:
            link = (await resp.json())["linkRequests"][0]
        await send(phone_spec("whatsapp", link["url"], SENDER)["text"])
        await eventually(timeout=20.0, check=lambda: _any(outbox(), "reply YES"))  # it holds a chat of its own
        assert not stored(phone_spec("whatsapp", link["url"], SENDER)["text"])  # the redemption is consumed


async def _true(value: Any) -> Any:
    return value


async def _any(texts: Any, wanted: str) -> bool:
    return any(wanted in text for text in await texts)

"""The widget's "Notify me" endpoints in `web`: channels offered, session auth, validation, and
the relay to `notifications` (503 while it is absent; the whole flow with the real service)."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import pytest

from tests.integration.test_web_conversation import ACCOUNT, create_app_with_web, create_session, eventually


@pytest.fixture
async def stack(system: Any) -> Any:
    await system.start("identity", "conversations", "web")
    return system


async def add_integration(http: aiohttp.ClientSession, base_url: str, app_id: str, body: dict[str, Any]) -> str:
    async with http.post(f"{base_url}/v2/apps/{app_id}/integrations", json=body, headers=ACCOUNT) as resp:
        assert resp.status == 201, await resp.text()
        integration_id: str = (await resp.json())["integration"]["id"]
    return integration_id


EMAIL_BODY = {"type": "mailgun", "displayName": "Mail", "smtpHost": "127.0.0.1", "smtpPort": 2525, "security": "none",
              "fromAddress": "shop@example.test"}


async def test_channels_list_where_the_customer_can_be_notified(stack: Any) -> None:
    async with aiohttp.ClientSession() as http:
        app_id, web_id = await create_app_with_web(http, stack.base_url)
        url = f"{stack.base_url}/sdk/v1/apps/{app_id}/integrations/{web_id}/channels"
        async with http.get(url) as resp:
            assert (await resp.json())["notificationChannels"] == []
        email_id = await add_integration(http, stack.base_url, app_id, EMAIL_BODY)
        twilio_id = await add_integration(http, stack.base_url, app_id, {
            "type": "twilio", "accountSid": "AC" + "0" * 32, "authToken": "t", "phoneNumber": "+15550002222"})
        async def both_listed() -> dict[str, Any] | None:  # web learns integrations from a KV mirror
            async with http.get(url) as resp:
                listed: dict[str, Any] = await resp.json()
            return listed if len(listed["notificationChannels"]) == 2 else None

        body = await eventually(both_listed)
        assert [(c["type"], c["integrationId"]) for c in body["notificationChannels"]] == [
            ("email", email_id), ("twilio", twilio_id)]
        assert [c["type"] for c in body["channels"]] == ["twilio"]  # e-mail is no "Continue on…" target


async def test_opt_in_endpoints_check_session_input_and_need_notifications(stack: Any) -> None:
    async with aiohttp.ClientSession() as http:
        app_id, web_id = await create_app_with_web(http, stack.base_url)
        email_id = await add_integration(http, stack.base_url, app_id, EMAIL_BODY)
        session = await create_session(http, stack.base_url, app_id, web_id)
        base = (f"{stack.base_url}/sdk/v1/apps/{app_id}/conversations/{session['conversationId']}"
                "/notificationOptIns")
        auth = {"Authorization": f"Bearer {session['sessionToken']}"}
        body = {"channel": "email", "address": "ada@example.com"}

        async with http.post(base, json=body) as resp:
            assert resp.status == 401
        async with http.get(base, headers={"Authorization": "Bearer forged"}) as resp:
            assert resp.status == 401
        other = f"{stack.base_url}/sdk/v1/apps/{app_id}/conversations/{uuid.uuid4().hex[:24]}/notificationOptIns"
        async with http.post(other, json=body, headers=auth) as resp:
            assert resp.status == 404

        for bad, status in (({"channel": "email", "address": "not-an-address"}, 400),
                            ({"channel": "fax", "address": "ada@example.com"}, 400),
                            ({"channel": "twilio", "address": "12"}, 400),
                            ({"channel": "whatsapp", "address": "+15551234567"}, 400),  # app has no WhatsApp
                            ({"channel": "email", "address": "ada@example.com", "integrationId": web_id}, 404)):
            async with http.post(base, json=bad, headers=auth) as resp:
                assert resp.status == status, (bad, await resp.text())
                assert (await resp.json())["errors"][0]["title"]
        async with http.post(f"{base}/bad%20id/confirm", json={"code": "123456"}, headers=auth) as resp:
            assert resp.status == 404
        async with http.post(f"{base}/{uuid.uuid4().hex}/confirm", json={"code": ""}, headers=auth) as resp:
            assert resp.status == 400

        # Valid requests with no `notifications` service running: 503 in SunCo's error shape.
        for method, url, payload in (("POST", base, {**body, "integrationId": email_id}), ("GET", base, None),
                                     ("POST", f"{base}/{uuid.uuid4().hex}/confirm", {"code": "123456"}),
                                     ("DELETE", f"{base}/{uuid.uuid4().hex}", None)):
            async with http.request(method, url, json=payload, headers=auth) as resp:
                assert resp.status == 503, (method, url, await resp.text())
                assert "notifications" in (await resp.json())["errors"][0]["title"]

        # Browsers on the customer's site may DELETE cross-origin.
        async with http.options(base, headers={"Origin": "https://shop.example",
                                               "Access-Control-Request-Method": "DELETE"}) as resp:
            assert "DELETE" in resp.headers["Access-Control-Allow-Methods"]

"""The web messenger's "Continue on…" endpoints against identity, conversations, handoff and web:
the channels an app offers, and link requests for the session's own conversation."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.web import handlers
from shared.http import ApiError, basic_auth_header
from shared.messages import handoff
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System
from tests.integration.test_web_conversation import create_app_with_web, create_session
from threadline.bootstrap import AccountKey, bootstrap_sandbox

KINDS = ("web", "whatsapp", "messenger", "telegram", "twilio", "android")


@dataclass
class Shop:
    base_url: str
    app_id: str
    integrations: dict[str, str]
    auth: dict[str, str]

    def sdk(self, path: str) -> str:
        return f"{self.base_url}/sdk/v1/apps/{self.app_id}{path}"


@pytest.fixture
async def shop(system: System, tmp_path: Path) -> AsyncIterator[Shop]:
    await system.start("identity", "conversations", "handoff", "web")
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                   str(tmp_path / "sbx"), KINDS)
    integrations = {kind: entry["id"] for kind, entry in info["integrations"].items()}
    auth = basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])
    async with aiohttp.ClientSession() as http:
        # A custom integration is no channel a customer can continue on.
        async with http.post(f"{system.base_url}/v2/apps/{info['appId']}/integrations", headers=auth,
                             json={"type": "custom", "displayName": "Helpdesk", "webhooks": [
                                 {"target": "http://127.0.0.1:9/hook", "triggers": ["conversation:message"]}]}) as resp:
            assert resp.status == 201, await resp.text()
    yield Shop(system.base_url, info["appId"], integrations, auth)


async def link_requests(http: aiohttp.ClientSession, shop: Shop, conversation_id: str, token: str | None,
                        body: Any) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.post(shop.sdk(f"/conversations/{conversation_id}/linkRequests"), headers=headers,
                         json=body) as resp:
        return resp.status, await resp.json()


async def test_channels_lists_the_apps_other_channels(system: System, shop: Shop) -> None:
    async with aiohttp.ClientSession() as http:
        other_app, other_web = await create_app_with_web(http, system.base_url)
        async with http.get(shop.sdk(f"/integrations/{shop.integrations['web']}/channels")) as resp:
            assert resp.status == 200, await resp.text()
            channels = (await resp.json())["channels"]
        assert [c["type"] for c in channels] == ["whatsapp", "messenger", "telegram", "twilio", "android"]
        assert [c["integrationId"] for c in channels] == [shop.integrations[c["type"]] for c in channels]
        assert channels[0]["displayName"] == "WhatsApp (sandbox)"
        # Another app's web integration lists none of this app's channels.
        async with http.get(f"{system.base_url}/sdk/v1/apps/{other_app}/integrations/{other_web}/channels") as resp:
            assert resp.status == 200
            assert (await resp.json())["channels"] == []
        # Only a web integration of the path's app answers.
        for integration in (shop.integrations["whatsapp"], other_web, "64b0000000000000000000ff", "..%2Fx"):
            async with http.get(shop.sdk(f"/integrations/{integration}/channels")) as resp:
                assert resp.status == 404, integration


async def test_channels_checks_the_origin(system: System, shop: Shop) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.patch(f"{system.base_url}/v2/apps/{shop.app_id}/integrations/{shop.integrations['web']}",
                              headers=shop.auth, json={"originWhitelist": ["https://shop.example"]}) as resp:
            assert resp.status == 200, await resp.text()

        async def status(origin: str) -> int:
            async with http.get(shop.sdk(f"/integrations/{shop.integrations['web']}/channels"),
                                headers={"Origin": origin}) as resp:
                return resp.status

        # The KV mirror catches up with the PATCH within moments: poll, bounded.
        for _ in range(50):
            if await status("https://evil.example") == 403:
                break
            await _tick()
        assert await status("https://evil.example") == 403
        assert await status("https://shop.example") == 200


async def test_a_link_request_for_the_sessions_conversation(system: System, shop: Shop) -> None:
    async with aiohttp.ClientSession() as http:
        session = await create_session(http, shop.base_url, shop.app_id, shop.integrations["web"])
        conversation_id = session["conversationId"]
        targets = [shop.integrations["whatsapp"], shop.integrations["telegram"]]
        status, body = await link_requests(http, shop, conversation_id, session["sessionToken"],
                                           {"integrationIds": targets})
        assert status == 201, body
        links = body["linkRequests"]
        assert [link["integrationId"] for link in links] == targets
        whatsapp, telegram = links
        assert whatsapp["type"] == "whatsapp" and re.fullmatch(r"TL[0-9A-Z]{8}", whatsapp["code"])
        assert whatsapp["url"].startswith("https://wa.me/") and whatsapp["code"] in whatsapp["url"]
        assert telegram["url"] == f"https://t.me/threadline_demo_bot?start={telegram['code']}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*Z", telegram["expiresAt"])
        # The QR code is served through the front door while the link is live.
        for link in links:
            assert link["qrCodeUrl"].startswith(f"{system.base_url}/handoff/v1/qr/")
            async with http.get(link["qrCodeUrl"]) as resp:
                assert resp.status == 200 and resp.content_type == "image/svg+xml"
        # The code is bound to the session's user and conversation with web as the source.
        handlers = system.service("handoff").handlers
        record = await handlers._record(telegram["code"])
        assert record is not None
        assert (record.user_id, record.conversation_id, record.source_integration_id) == (
            session["appUserId"], conversation_id, shop.integrations["web"])


async def test_link_requests_need_the_session_and_its_conversation(system: System, shop: Shop) -> None:
    body = {"integrationIds": [shop.integrations["whatsapp"]]}
    async with aiohttp.ClientSession() as http:
        mine = await create_session(http, shop.base_url, shop.app_id, shop.integrations["web"])
        theirs = await create_session(http, shop.base_url, shop.app_id, shop.integrations["web"])
        assert (await link_requests(http, shop, mine["conversationId"], None, body))[0] == 401
        assert (await link_requests(http, shop, mine["conversationId"], "forged.token", body))[0] == 401
        status, error = await link_requests(http, shop, theirs["conversationId"], mine["sessionToken"], body)
        assert status == 404, error
        assert (await link_requests(http, shop, "c" * 24, mine["sessionToken"], body))[0] == 404


async def test_bad_link_request_bodies_are_refused(system: System, shop: Shop) -> None:
    async with aiohttp.ClientSession() as http:
        other_app, other_web = await create_app_with_web(http, system.base_url)
        session = await create_session(http, shop.base_url, shop.app_id, shop.integrations["web"])
        conversation_id, token = session["conversationId"], session["sessionToken"]
        for bad in ({}, {"integrationIds": []}, {"integrationIds": "x"}, {"integrationIds": [1]},
                    {"integrationIds": [f"{i:024x}" for i in range(11)]}, {"integrationIds": ["x" * 65]}, []):
            status, error = await link_requests(http, shop, conversation_id, token, bad)
            assert status == 400, (bad, error)
        async with http.post(shop.sdk(f"/conversations/{conversation_id}/linkRequests"), data=b"{nope",
                             headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as resp:
            assert resp.status == 400
        # Targets must be this app's channels: not the web itself, another app's or an unknown one.
        for target in (shop.integrations["web"], other_web, "64b0000000000000000000ff", "../etc"):
            status, error = await link_requests(http, shop, conversation_id, token, {"integrationIds": [target]})
            assert status == 404, (target, error)
        assert other_app != shop.app_id


async def test_handoff_down_is_a_503(system: System, shop: Shop) -> None:
    async with aiohttp.ClientSession() as http:
        session = await create_session(http, shop.base_url, shop.app_id, shop.integrations["web"])
        await system.stop_service("handoff")
        status, error = await link_requests(http, shop, session["conversationId"], session["sessionToken"],
                                            {"integrationIds": [shop.integrations["messenger"]]})
        assert status == 503, error
        assert "handoff" in error["errors"][0]["title"].lower()


def test_handoff_refusals_keep_their_status() -> None:
    refusal = handoff.HandoffError(status=400, code="bad_request", title="Set phoneNumber on the SMS integration")
    with pytest.raises(ApiError) as raised:
        handlers.issued_links(refusal)
    assert (raised.value.status, raised.value.title) == (400, refusal.title)
    with pytest.raises(ApiError) as raised:
        handlers.issued_links(handoff.HandoffError(status=200, code="odd", title="nonsense status"))
    assert raised.value.status == 503
    with pytest.raises(ApiError) as raised:
        handlers.issued_links(handoff.CodeRefused(reason="used", message="used"))
    assert raised.value.status == 503


async def _tick() -> None:
    await asyncio.sleep(0.05)

"""The in-app SDK channel (`app`) with identity + conversations + the sandbox's push fakes:
sessions with a device, the socket, push when the socket missed a reply, dead tokens dropped,
and the SunCo devices endpoints (with the official client)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import sunshine_conversations_client as sunco
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from shared.sdk import MessageFrame, decode_frame
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, start_sdk_session
from tests.integration.test_web_conversation import business_message, eventually, frames_until_ready

ACCOUNT = {"Authorization": "Basic " + base64.b64encode(f"{ACCOUNT_KEY_ID}:{ACCOUNT_KEY_SECRET}".encode()).decode()}
APP_ENV = {"THREADLINE_APP_PUSH_GRACE_SECONDS": "0.3", "THREADLINE_APP_RETRY_BASE_SECONDS": "0.1",
           "THREADLINE_APP_RETRY_MAX_SECONDS": "0.3"}


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


@pytest.fixture
async def app_system(system: System) -> AsyncIterator[System]:
    await system.start("identity", "conversations", "webhooks", "app", "sandbox", env=APP_ENV)
    yield system


async def create_app(http: aiohttp.ClientSession, base: str) -> str:
    async with http.post(f"{base}/v2/apps", json={"displayName": "Shop"}, headers=ACCOUNT) as resp:
        assert resp.status == 201, await resp.text()
        app_id: str = (await resp.json())["app"]["id"]
    return app_id


async def create_integration(http: aiohttp.ClientSession, base: str, app_id: str,
                             body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(f"{base}/v2/apps/{app_id}/integrations", json=body, headers=ACCOUNT) as resp:
        assert resp.status == 201, await resp.text()
        integration: dict[str, Any] = (await resp.json())["integration"]
    return integration


async def android_integration(http: aiohttp.ClientSession, base: str, app_id: str) -> dict[str, Any]:
    return await create_integration(http, base, app_id, {
        "type": "android", "displayName": "Shop app", "projectId": "demo-shop",
        "clientEmail": "threadline@demo-shop.iam.gserviceaccount.com",
        "privateKey": pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "tokenUri": f"{base}/sandbox/google-oauth/token", "baseUrl": f"{base}/sandbox/fcm"})


async def ios_integration(http: aiohttp.ClientSession, base: str, app_id: str) -> dict[str, Any]:
    return await create_integration(http, base, app_id, {
        "type": "ios", "displayName": "Shop iOS", "keyId": "ABC123DEFG", "teamId": "TEAM123456",
        "bundleId": "com.example.shop", "signingKey": pem(ec.generate_private_key(ec.SECP256R1())),
        "baseUrl": f"{base}/sandbox/apns"})


async def new_device_token(http: aiohttp.ClientSession, base: str, platform: str, integration_id: str) -> str:
    async def issued() -> str | None:  # the sandbox learns a new integration from a KV mirror
        async with http.post(f"{base}/sandbox/{platform}/{integration_id}/devices") as resp:
            if resp.status == 404:
                return None
            assert resp.status in (200, 201), await resp.text()
            token: str = (await resp.json())["token"]
        return token

    return str(await eventually(issued))


async def pushes(http: aiohttp.ClientSession, base: str, platform: str, integration_id: str,
                 token: str) -> list[dict[str, Any]]:
    async with http.get(f"{base}/sandbox/{platform}/{integration_id}/outbox", params={"to": token}) as resp:
        assert resp.status == 200, await resp.text()
        messages: list[dict[str, Any]] = (await resp.json())["messages"]
    return messages


FIRST_MESSAGE = "hi from the app"


async def app_session(http: aiohttp.ClientSession, base: str, app_id: str, integration_id: str,
                      device: dict[str, Any] | None) -> dict[str, Any]:
    """An app user: a session whose first message (carrying the install) created user and client."""
    return await start_sdk_session(http, base, app_id, integration_id, FIRST_MESSAGE, root="app",
                                   start_body={"device": device} if device is not None else None)


async def devices_of(http: aiohttp.ClientSession, base: str, app_id: str, user_id: str) -> list[dict[str, Any]]:
    async with http.get(f"{base}/v2/apps/{app_id}/users/{user_id}/devices", headers=ACCOUNT) as resp:
        assert resp.status == 200, await resp.text()
        devices: list[dict[str, Any]] = (await resp.json())["devices"]
    return devices


async def test_a_reply_the_open_socket_delivered_is_not_pushed(app_system: System) -> None:
    base = app_system.base_url
    async with aiohttp.ClientSession() as http:
        app_id = await create_app(http, base)
        integration = await android_integration(http, base, app_id)
        token = await new_device_token(http, base, "android", integration["id"])
        session = await app_session(http, base, app_id, integration["id"], {
            "guid": "install-1", "pushNotificationToken": token, "appVersion": "2.3.0",
            "info": {"os": "Android", "osVersion": "15"}})
        conversation_id = session["conversationId"]
        url = (f"{base.replace('http', 'ws')}/app/v1/apps/{app_id}/conversations/{conversation_id}/socket"
               f"?token={session['sessionToken']}")
        async with http.ws_connect(url) as ws:
            await frames_until_ready(ws)
            sent = await business_message(http, base, app_id, conversation_id, "Seen live")
            frame = decode_frame((await ws.receive()).data)
            # (The customer's first message may arrive live too: it was queued just before.)
            while not isinstance(frame, MessageFrame) or frame.message.author.type != "business":
                frame = decode_frame((await ws.receive()).data)
            assert frame.message.id == sent["id"]
            # Past the grace period, the push consumer sees the socket delivery and pushes nothing.
            await asyncio.sleep(1.0)
        assert await pushes(http, base, "android", integration["id"], token) == []
        # The client reports the install; the business sees it through SunCo's devices API.
        devices = await devices_of(http, base, app_id, session["appUserId"])
        assert len(devices) == 1
        assert devices[0]["guid"] == "install-1"
        assert devices[0]["type"] == "android"
        assert devices[0]["pushNotificationToken"] == token
        assert devices[0]["appVersion"] == "2.3.0"
        assert devices[0]["status"] == "active"
        assert devices[0]["clientId"] == session["clientId"]


async def test_a_reply_while_the_app_is_closed_is_pushed_and_continues_in_the_socket(app_system: System) -> None:
    base = app_system.base_url
    async with aiohttp.ClientSession() as http:
        app_id = await create_app(http, base)
        integration = await android_integration(http, base, app_id)
        token = await new_device_token(http, base, "android", integration["id"])
        session = await app_session(http, base, app_id, integration["id"],
                                    {"guid": "install-2", "pushNotificationToken": token})
        conversation_id = session["conversationId"]
        sent = await business_message(http, base, app_id, conversation_id, "Your order shipped")
        got = await eventually(lambda: pushes(http, base, "android", integration["id"], token))
        assert len(got) == 1
        push = got[0]["message"]
        assert push["token"] == token
        assert push["notification"] == {"title": "Shop app", "body": "Your order shipped"}
        assert push["data"]["conversationId"] == conversation_id
        assert push["data"]["messageId"] == sent["id"]
        # Opening the app from the push: the socket replays the message.
        url = (f"{base.replace('http', 'ws')}/app/v1/apps/{app_id}/conversations/{conversation_id}/socket"
               f"?token={session['sessionToken']}")
        async with http.ws_connect(url) as ws:
            replayed, _ready = await frames_until_ready(ws)
        assert [f.message.id for f in replayed if f.message.author.type == "business"] == [sent["id"]]


async def test_an_uninstalled_app_loses_its_token_and_the_business_gets_a_failure(app_system: System) -> None:
    base = app_system.base_url
    async with aiohttp.ClientSession() as http:
        app_id = await create_app(http, base)
        integration = await ios_integration(http, base, app_id)
        token = await new_device_token(http, base, "ios", integration["id"])
        session = await app_session(http, base, app_id, integration["id"],
                                    {"guid": "iphone-1", "pushNotificationToken": token})
        async with http.post(f"{base}/sandbox/ios/{integration['id']}/devices/{token}/revoke") as resp:
            assert resp.status in (200, 204), await resp.text()
        await business_message(http, base, app_id, session["conversationId"], "Still there?")

        async def token_dropped() -> bool:
            devices = await devices_of(http, base, app_id, session["appUserId"])
            return devices[0].get("pushNotificationToken") is None and devices[0]["status"] == "inactive"

        await eventually(token_dropped)
        assert await pushes(http, base, "ios", integration["id"], token) == []


async def test_the_app_updates_its_push_token_and_bad_input_is_refused(app_system: System) -> None:
    base = app_system.base_url
    async with aiohttp.ClientSession() as http:
        app_id = await create_app(http, base)
        integration = await android_integration(http, base, app_id)
        session = await app_session(http, base, app_id, integration["id"], None)
        auth = {"Authorization": f"Bearer {session['sessionToken']}"}
        devices_url = f"{base}/app/v1/apps/{app_id}/devices"
        token = await new_device_token(http, base, "android", integration["id"])
        async with http.put(f"{devices_url}/install-9", json={"pushNotificationToken": token}, headers=auth) as resp:
            assert resp.status == 200, await resp.text()
            device = (await resp.json())["device"]
        assert device["pushNotificationToken"] == token
        assert device["type"] == "android"
        # No session, a bad guid, an oversized token, malformed JSON: clear 4xx, nothing stored.
        async with http.put(f"{devices_url}/install-9", json={"pushNotificationToken": "x"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["errors"][0]["code"]
        async with http.put(f"{devices_url}/bad%20guid", json={}, headers=auth) as resp:
            assert resp.status == 400
        async with http.put(f"{devices_url}/install-9", json={"pushNotificationToken": "t" * 5000},
                            headers=auth) as resp:
            assert resp.status == 400
        async with http.put(f"{devices_url}/install-9", data=b"{not json",
                            headers={**auth, "Content-Type": "application/json"}) as resp:
            assert resp.status == 400
        # A web integration id is not an app integration: 404 on the app endpoints.
        web = await create_integration(http, base, app_id, {"type": "web"})
        async with http.post(f"{base}/app/v1/apps/{app_id}/integrations/{web['id']}/sessions") as resp:
            assert resp.status == 404
        devices = await devices_of(http, base, app_id, session["appUserId"])
        assert [d["pushNotificationToken"] for d in devices] == [token]
        # Certificate-based APNs is refused up front with a clear message.
        async with http.post(f"{base}/v2/apps/{app_id}/integrations", headers=ACCOUNT,
                             json={"type": "ios", "certificate": "MIIB...", "password": "pw"}) as resp:
            assert resp.status == 400
            assert "token-based" in (await resp.json())["errors"][0]["title"]


async def test_official_client_lists_and_gets_devices(app_system: System) -> None:
    base = app_system.base_url
    async with aiohttp.ClientSession() as http:
        app_id = await create_app(http, base)
        integration = await android_integration(http, base, app_id)
        session = await app_session(http, base, app_id, integration["id"],
                                    {"guid": str(uuid.uuid4()), "pushNotificationToken": "tok-1"})
    configuration = sunco.Configuration(host=base, username=ACCOUNT_KEY_ID, password=ACCOUNT_KEY_SECRET)

    def call() -> tuple[Any, Any]:
        with sunco.ApiClient(configuration) as client:
            api = sunco.DevicesApi(client)
            listed = api.list_devices(app_id, session["appUserId"])
            got = api.get_device(app_id, session["appUserId"], listed.devices[0].id)
            try:
                api.get_device(app_id, session["appUserId"], "5e1606762556d93e9c176f69")
            except sunco.ApiException as exc:
                assert exc.status == 404
            else:
                raise AssertionError("an unknown device must be 404")
            return listed, got

    listed, got = await asyncio.to_thread(call)
    assert len(listed.devices) == 1
    assert got.device.push_notification_token == "tok-1"
    assert got.device.client_id == session["clientId"]
    assert got.device.integration_id == integration["id"]

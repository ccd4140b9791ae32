"""Two replicas of every service in the path, one PostgreSQL database: a wave of first messages
from new WhatsApp numbers, each number's messages arriving at both `whatsapp` replicas at once.

Each number becomes one user with one conversation, every message is stored once, and each
conversation reaches the business in the order of its history, with its own `webhooks` replica
delivering it. A privacy event handled by one `webhooks` replica empties the other's queue too.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from shared import subjects
from shared.bus import Bus
from shared.ids import new_id
from shared.messages import conversation as conv
from shared.service import ServiceApp
from shared.signing import meta_signature
from shared.sunco import UserRef
from tests.harness import System, business_webhooks
from tests.integration.test_conversations_api import Tenant, create_tenant, eventually
from tests.integration.test_webhooks_delivery import Receiver, message_created, publish, put_webhook
from threadline.natsserver import free_port

NUMBERS = 12
PER_NUMBER = 4
APP_SECRET = "a" * 32
REPLICATED = ("identity", "conversations", "webhooks", "whatsapp")


@pytest.fixture
def system(system_on_postgres: System) -> System:
    return system_on_postgres


def webhook_body(phone_number_id: str, sender: str, index: int) -> bytes:
    return json.dumps({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
        "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550000000", "phone_number_id": phone_number_id},
            "contacts": [{"profile": {"name": "Wave"}, "wa_id": sender}],
            "messages": [{"from": sender, "id": f"wamid.{sender}.{index}", "timestamp": str(int(time.time())),
                          "type": "text", "text": {"body": f"{sender}-{index}"}}]}}]}]}).encode()


async def held_partitions(service: ServiceApp) -> set[int]:
    bus = service.bus  # type: ignore[attr-defined]
    return {p for leases in bus._leases for p in leases.owned}


async def test_two_replicas_of_each_service_keep_one_user_one_conversation_and_the_order(system: System) -> None:
    await system.start(*REPLICATED)
    seconds = [await system.start_replica(name) for name in REPLICATED]
    try:
        async with aiohttp.ClientSession() as http, business_webhooks() as (hook_url, events):
            app_id, key_id, secret = await create_tenant(system, http)
            t = Tenant(system, http, app_id, key_id, secret)
            status, body = await t.request("POST", f"/v2/apps/{app_id}/integrations", body={
                "type": "whatsapp", "phoneNumberId": "777", "accessToken": "token-0123456789",
                "appSecret": APP_SECRET})
            assert status == 201
            integration_id = body["integration"]["id"]
            status, _ = await t.request("POST", f"/v2/apps/{app_id}/integrations", body={
                "type": "custom", "webhooks": [{"target": hook_url, "triggers": ["conversation:message"]}]})
            assert status == 201
            # Both replicas of each consumer group hold some of its partitions.
            for name, second in zip(REPLICATED, seconds, strict=True):
                if name in ("conversations", "webhooks"):
                    first = system.service(name)
                    await eventually(lambda a=first, b=second: _split(a, b), timeout=15)
            urls = [f"{system.service_url('whatsapp')}/webhooks/whatsapp/{integration_id}",
                    f"http://127.0.0.1:{seconds[-1].port}/webhooks/whatsapp/{integration_id}"]
            await eventually(lambda: _sees_integration(http, urls, integration_id), timeout=15)

            async def post(url: str, sender: str, index: int) -> None:
                data = webhook_body("777", sender, index)
                headers = {"Content-Type": "application/json", "X-Hub-Signature-256": meta_signature(APP_SECRET, data)}
                async with http.post(url, data=data, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()

            senders = [f"1555{n:07d}" for n in range(NUMBERS)]
            # Two first messages of each number nobody knows yet, one at each replica at once,
            # and a platform retry of the first at the other replica.
            await asyncio.gather(*(post(urls[0], sender, 0) for sender in senders),
                                 *(post(urls[1], sender, 1) for sender in senders),
                                 *(post(urls[1], sender, 0) for sender in senders))
            for index in range(2, PER_NUMBER):  # then one after another, alternating replicas
                await asyncio.gather(*(post(urls[index % 2], sender, index) for sender in senders))

            def delivered() -> bool:
                return len({e["id"] for e in events}) >= NUMBERS * PER_NUMBER

            await eventually(_async(delivered), timeout=30)
            await asyncio.sleep(0.5)  # nothing more may come
            identity_db = system.service("identity").store.db
            assert await identity_db.fetchval("SELECT COUNT(*) FROM users WHERE app_id = $1", app_id) == NUMBERS
            by_conversation: dict[str, list[str]] = {}
            for event in events:
                by_conversation.setdefault(event["payload"]["conversation"]["id"], []).append(
                    event["payload"]["message"]["id"])
            assert len(by_conversation) == NUMBERS  # one conversation per number
            assert sum(len(ids) for ids in by_conversation.values()) == NUMBERS * PER_NUMBER  # each once
            for conversation_id, arrived in by_conversation.items():
                status, listed = await t.request("GET", f"/v2/apps/{app_id}/conversations/{conversation_id}/messages")
                assert status == 200
                history = [m["id"] for m in listed["messages"]]
                assert arrived == history
                indexes = [int(m["content"]["text"].rsplit("-", 1)[1]) for m in listed["messages"]]
                assert sorted(indexes[:2]) == [0, 1] and indexes[2:] == list(range(2, PER_NUMBER))
    finally:
        for service in reversed(seconds):
            await service.stop()


async def _split(first: ServiceApp, second: ServiceApp) -> bool:
    a, b = await held_partitions(first), await held_partitions(second)
    return bool(a) and bool(b) and not (a & b)


async def _sees_integration(http: aiohttp.ClientSession, urls: list[str], integration_id: str) -> bool:
    for url in urls:
        async with http.post(url, data=b"{}", headers={"X-Hub-Signature-256": "sha256=00"}) as resp:
            if resp.status == 404:  # the replica does not know the integration yet
                return False
    return True


def _async(check: Any) -> Any:
    async def run() -> Any:
        return check()
    return run


async def test_a_privacy_event_empties_every_webhooks_replicas_queue(system: System, bus: Bus) -> None:
    """A deleted user's conversations may sit in partitions two replicas hold, their rows queued in
    both replicas' memory while the receiver is down: none of them is delivered afterwards."""
    env = {"THREADLINE_WEBHOOK_RETRY_BASE_SECONDS": "0.2", "THREADLINE_WEBHOOK_RETRY_WINDOW_SECONDS": "60"}
    await system.start("webhooks", env=env)
    first = system.service("webhooks")
    second = await system.start_replica("webhooks", env)
    try:
        await eventually(lambda: _split(first, second), timeout=15)
        port = free_port()  # the receiver is down
        app_id = new_id()
        await put_webhook(bus, app_id, f"http://127.0.0.1:{port}/hook", ("conversation:message",), "s" * 24)
        await eventually(lambda: _sees_webhook(first, second, app_id), timeout=10)
        conversations = [_conversation_in(await held_partitions(replica)) for replica in (first, second)]
        messages = [message_created(app_id, conversation_id, "personal data") for conversation_id in conversations]
        for event in messages:
            await publish(bus, event)

        async def both_queued() -> bool:
            return all(replica.dispatcher.stats()["pending"] == 1 for replica in (first, second))

        await eventually(both_queued, timeout=10)
        user = messages[0].user_id
        assert user is not None
        removed = conv.UserRemoved(id=new_id(), app_id=app_id, conversation_id=conversations[0],
                                   created_at=time.time(), user=UserRef(id=user),
                                   conversation_ids=conversations)
        await publish(bus, removed)

        async def both_forgot() -> bool:
            return all(replica.dispatcher.stats()["pending"] == 0 for replica in (first, second))

        await eventually(both_forgot, timeout=10)
        receiver = await Receiver().start(port)
        try:
            await asyncio.sleep(1.0)  # past the next retry of anything still queued
            assert receiver.requests == []
        finally:
            await receiver.stop()
    finally:
        await second.stop()


def _conversation_in(partitions: set[int]) -> str:
    while True:
        conversation_id = new_id()
        if subjects.partition_of(conversation_id) in partitions:
            return conversation_id


async def _sees_webhook(first: Any, second: Any, app_id: str) -> bool:
    return all(list(replica.mirror.values) and any(k.startswith(app_id) for k in replica.mirror.values)
               for replica in (first, second))

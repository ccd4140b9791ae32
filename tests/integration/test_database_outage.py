"""PostgreSQL goes down under a running service and comes back: the service reports not-ready,
a platform's webhook that needs the database is answered 503 (so the platform retries) and
nothing is half-stored; once the server is back the service recovers by itself and the retried
webhook is accepted once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from shared.bus import Bus
from shared.messages.channel import InboundMessage
from shared.signing import meta_signature
from tests.fakes.whatsapp_env import eventually
from tests.harness import System
from tests.integration.test_messenger_service import APP_SECRET, PAGE_ID, PSID, MsEnv, start_messenger
from threadline.natsserver import NatsServer
from threadline.postgres import PostgresServer


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own (the test stops and restarts it)."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.remove()


def messenger_webhook(mid: str, text: str) -> bytes:
    now = int(time.time() * 1000)
    return json.dumps({"object": "page", "entry": [{"id": PAGE_ID, "time": now, "messaging": [{
        "sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": now,
        "message": {"mid": mid, "text": text}}]}]}).encode()


async def test_postgres_down_then_back(own_postgres: PostgresServer, nats_server: NatsServer, bus: Bus,
                                       tmp_path: object) -> None:
    system = System(nats_server.url, f"{tmp_path}/data", env={"THREADLINE_DATABASE_URL": own_postgres.url})
    try:
        ms: MsEnv = await start_messenger(system, bus)
        ready_url = f"{system.service_url('messenger')}/readyz"
        body = messenger_webhook("m_outage", "written while the database was down")
        headers = {"Content-Type": "application/json", "X-Hub-Signature-256": meta_signature(APP_SECRET, body)}
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(ready_url)).status_code == 200

            await asyncio.to_thread(own_postgres.stop)

            async def not_ready() -> bool:
                return (await http.get(ready_url)).status_code == 503

            await eventually(not_ready, timeout=10.0)
            refused = await http.post(ms.webhook_url, content=body, headers=headers)
            assert refused.status_code == 503
            assert refused.json()["errors"][0]["title"]
            assert await ms.inbound() == []  # refused means not published either

            await asyncio.to_thread(own_postgres.start)  # same port, same data

            async def ready() -> bool:
                return (await http.get(ready_url)).status_code == 200

            await eventually(ready, timeout=15.0)

            async def accepted() -> bool:  # the platform's retry
                return (await http.post(ms.webhook_url, content=body, headers=headers)).status_code == 200

            await eventually(accepted, timeout=15.0)
            assert (await http.post(ms.webhook_url, content=body, headers=headers)).status_code == 200
        messages = await ms.inbound()
        assert [m.provider_message_id for m in messages if isinstance(m, InboundMessage)] == ["m_outage"]
        assert ms.service.store is not None
        assert await ms.service.store.last_user_at(PAGE_ID, PSID) is not None
    finally:
        await system.close()

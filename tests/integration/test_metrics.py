"""`GET /metrics` of the running services, scraped over real HTTP on their own ports while a
WhatsApp customer, a business reply, a web visitor and a business webhook go through them; and
the consumer metrics of `Bus.consume` against a real nats-server.

Several services share this process (tests/harness.py), and so its metrics: every check is on
the difference between a scrape before and after, never on absolute counts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared import metrics, subjects
from shared.bus import Bus, Delivery, Retry
from shared.http import basic_auth_header
from shared.sdk import ReadyFrame
from shared.subjects import ConsumerSpec
from shared.telemetry import setup_telemetry
from tests.e2e.test_direct_linking import Sandbox
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System, business_webhooks, start_sdk_session
from tests.integration.test_web_conversation import eventually, next_frame
from tests.unit.test_metrics import samples
from threadline.bootstrap import AccountKey, bootstrap_sandbox

SERVICES = ("identity", "conversations", "webhooks", "whatsapp", "web", "sandbox")
TRIGGERS = ["conversation:message", "conversation:create", "client:add"]
Samples = list[tuple[str, dict[str, str], float]]


async def scrape(http: aiohttp.ClientSession, system: System, service: str) -> Samples:
    """The samples of `service`'s own `/metrics` (not through the front door)."""
    async with http.get(f"{system.service_url(service)}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return samples(await resp.text())


def value(found: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    return sum(v for n, lab, v in found if n == name and all(lab.get(k) == want for k, want in labels.items()))


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@contextlib.asynccontextmanager
async def running(system: System, tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with business_webhooks() as (hook_url, events):
        await system.start(*SERVICES)
        info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET),
                                       str(tmp_path / "sbx"), ("web", "whatsapp"))
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{system.base_url}/v2/apps/{info['appId']}/integrations",
                                 headers=basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"]),
                                 json={"type": "custom", "webhooks": [{"target": hook_url, "triggers": TRIGGERS}]},
                                 ) as resp:
                assert resp.status == 201
            yield Sandbox(system, http, info, events)


async def test_services_serve_what_a_customer_a_reply_a_visitor_and_a_webhook_did(
        system: System, tmp_path: Path) -> None:
    async with running(system, tmp_path) as s:
        http = s.http
        # The groups these services consume show their pending count once read (at start).
        groups = ("conversations-inbound", "conversations-status", "webhooks-events", "whatsapp-outbound")

        async def pending_reported() -> Samples | None:
            found = await scrape(http, system, "webhooks")
            shown = {lab.get("group") for n, lab, _ in found if n == "threadline_consumer_pending"}
            return found if set(groups) <= shown else None

        before: Samples = await eventually(pending_reported)
        for group in groups:
            pending = value(before, "threadline_consumer_pending", group=group)
            assert pending >= 0 and pending == int(pending), (group, pending)

        # A WhatsApp customer writes; the business gets it on its webhook and answers.
        phone = "+15557400001"
        await s.phone_sends("whatsapp", phone, "hello metrics")
        event = await s.event("conversation:message")
        conversation_id = event["payload"]["conversation"]["id"]
        async with http.post(f"{system.base_url}/v2/apps/{s.app_id}/conversations/{conversation_id}/messages",
                             headers=s.auth, json={"author": {"type": "business"},
                                                   "content": {"type": "text", "text": "hi from the shop"}}) as resp:
            assert resp.status == 201, await resp.text()
        await s.phone_receives("whatsapp", phone, "hi from the shop")

        # A web visitor writes and holds a realtime socket open.
        session = await start_sdk_session(http, system.base_url, s.app_id, s.integration("web"), "hello from web")
        socket_url = (f"{system.base_url}/sdk/v1/apps/{s.app_id}/conversations/{session['conversationId']}"
                      f"/socket?token={session['sessionToken']}")
        open_before = value(before, "threadline_websockets_open", service="web")

        def sockets_are(count: float) -> Callable[[], Any]:
            async def check() -> bool:
                return value(await scrape(http, system, "web"), "threadline_websockets_open", service="web") == count
            return check

        async with http.ws_connect(socket_url) as ws:
            while not isinstance(await next_frame(ws), ReadyFrame):  # history first, then ready
                pass
            await eventually(sockets_are(open_before + 1))
        await eventually(sockets_are(open_before))

        # Every event the business received was counted once delivered (the POST is answered
        # before the outcome is recorded: wait for the counts to catch up).
        await s.customer_message(session["conversationId"], "hello from web")

        async def settled() -> tuple[Samples, int] | None:
            received = len(s.events)
            found = await scrape(http, system, "webhooks")
            delivered = delta(before, found, "threadline_webhook_events_total", outcome="delivered")
            return (found, received) if delivered == received else None

        after, received = await eventually(settled)

    assert received >= 3  # at least both customers' messages and the business's answer
    # Messages in and out, per channel and result.
    assert delta(before, after, "threadline_messages_in_total", channel="whatsapp", result="accepted") == 1
    assert delta(before, after, "threadline_messages_in_total", channel="web", result="accepted") == 1
    assert delta(before, after, "threadline_messages_in_total", result="duplicate") == 0
    assert delta(before, after, "threadline_messages_in_total", result="rejected") == 0
    assert delta(before, after, "threadline_messages_out_total", channel="whatsapp", result="sent") == 1
    assert delta(before, after, "threadline_messages_out_total", result="failed") == 0
    # Business webhooks: every POST answered 2xx, each delivered event has its latency.
    attempts = delta(before, after, "threadline_webhook_attempts_total")
    assert attempts >= 1
    assert delta(before, after, "threadline_webhook_attempts_total", outcome="delivered") == attempts
    assert delta(before, after, "threadline_webhook_post_duration_seconds_count") == attempts
    assert delta(before, after, "threadline_webhook_post_duration_seconds_sum") > 0
    assert delta(before, after, "threadline_webhook_delivery_latency_seconds_count") == received
    assert delta(before, after, "threadline_webhook_events_total", outcome="failed") == 0
    # Store latency: the writes went through group commits and transactions, the reads through calls.
    for operation in ("group_commit", "fetchrow"):
        count = delta(before, after, "threadline_store_duration_seconds_count", engine="sqlite", operation=operation)
        assert count > 0, operation
        assert delta(before, after, "threadline_store_duration_seconds_sum", engine="sqlite",
                     operation=operation) > 0, operation
    operations = {lab["operation"] for n, lab, _ in after if n == "threadline_store_duration_seconds_count"}
    assert operations <= set(metrics.STORE_OPERATIONS)
    # Histograms are consistent: cumulative buckets, +Inf equal to the count.
    for name, labels in {(n, tuple(sorted((k, v) for k, v in lab.items() if k != "le")))
                         for n, lab, _ in after if n.endswith("_bucket")}:
        family = name.removesuffix("_bucket")
        buckets = [(float(lab["le"]), v) for n, lab, v in after
                   if n == name and tuple(sorted((k, x) for k, x in lab.items() if k != "le")) == labels]
        counts = [v for _, v in sorted(buckets)]
        assert counts == sorted(counts), (name, labels)
        assert counts[-1] == value(after, f"{family}_count", **dict(labels)), (name, labels)
    # The exposition is exactly shared/metrics.py's metrics, with their labels; every service
    # serves the process's metrics on its own port.
    exported = metrics.exported_series()
    for name, labels, _ in after:
        assert name in exported, name
        assert set(labels) - {"le"} == set(exported[name].labels), (name, labels)
    async with aiohttp.ClientSession() as http:
        for service in SERVICES:
            assert {n for n, _, _ in await scrape(http, system, service)} <= set(exported)


async def test_consumer_groups_report_pending_messages_and_redeliveries(
        bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    setup_telemetry("test")
    monkeypatch.setattr(metrics, "PENDING_REFRESH_SECONDS", 0.05)
    spec = ConsumerSpec(subjects.INBOUND, "metrics-test", "inbound.metricstest.x")
    release = asyncio.Event()
    retried: set[bytes] = set()

    async def handler(data: bytes, _headers: Mapping[str, str], delivery: Delivery) -> None:
        if data.startswith(b"retry") and data not in retried:
            retried.add(data)
            raise Retry(0.01, "once more")
        await release.wait()

    def reported() -> dict[str, float]:
        found = samples(metrics.exposition().decode())
        return {
            "pending": value(found, "threadline_consumer_pending", group=spec.group),
            "redelivered": value(found, "threadline_consumer_redeliveries_total", group=spec.group),
        }

    start = reported()
    for i in range(5):  # every partition's subject: the one replica holds them all
        await bus.publish(f"{spec.prefix}.{i % subjects.PARTITIONS}", f"hold {i}".encode())
    await bus.publish(f"{spec.prefix}.7", b"retry me")
    await bus.consume(spec, handler)

    def at(pending: float, redelivered: float) -> Callable[[], Any]:
        async def check() -> bool:
            now = reported()
            return now["pending"] == pending and now["redelivered"] - start["redelivered"] == redelivered
        return check

    try:
        # Six messages held by the handler (delivered, not acknowledged); one came twice.
        await eventually(at(6, 1))
    finally:
        release.set()
    await eventually(at(0, 1))
    await bus.close()
    # A consumer that stopped reports nothing any more.
    assert spec.group not in {lab.get("group") for n, lab, _ in samples(metrics.exposition().decode())
                              if n == "threadline_consumer_pending"}

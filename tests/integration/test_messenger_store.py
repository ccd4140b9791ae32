"""The messenger database on both engines (a real SQLite file, a real PostgreSQL server): windows
never move back, receipts map once, half-sent messages are remembered, old ids are pruned, and
it all survives a reopen."""

from __future__ import annotations

import asyncio

from services.messenger.handlers import SentRef, UserAction
from services.messenger.store import Store
from shared.db import DatabaseSettings


async def test_windows_receipts_parts_and_prune(database_settings: DatabaseSettings) -> None:
    path = database_settings
    store = await Store.open(path)
    try:
        assert await store.last_user_at("p", "u") is None
        await store.touch_windows([UserAction("p", "u", 100.0), UserAction("p", "v", 50.0)])
        await store.touch_windows([UserAction("p", "u", 90.0)])  # a late, older webhook
        assert await store.last_user_at("p", "u") == 100.0
        await store.touch_windows([UserAction("p", "u", 200.0)])
        assert await store.last_user_at("p", "u") == 200.0
        assert await store.last_user_at("other-page", "u") is None

        await store.record_sent("msg1", 0, "p", "u", "m_1", "conv", 10.0)
        await store.record_sent("msg1", 1, "p", "u", "m_2", "conv", 11.0)
        await store.record_sent("msg1", 1, "p", "u", "m_other", "conv", 11.0)  # a replay changes nothing
        await store.record_sent("msg2", 0, "p", "u", "m_3", None, 30.0)
        assert await store.sent_parts("msg1") == {0: "m_1", 1: "m_2"}

        read = await store.receipt_candidates("read", "p", "u", 20.0)
        assert read == [SentRef("m_1", "msg1", "conv"), SentRef("m_2", "msg1", "conv")]
        await store.mark_receipts("read", [r.mid for r in read], 20.0)
        assert await store.receipt_candidates("read", "p", "u", 20.0) == []
        # Named mids (delivery receipts) are found beyond the watermark, in big batches too.
        named = [f"m_unknown_{i}" for i in range(1200)] + ["m_3"]
        delivered = await store.receipt_candidates("delivered", "p", "u", 0.0, named)
        assert delivered == [SentRef("m_3", "msg2", None)]
        assert await store.receipt_candidates("delivered", "p", "someone-else", 100.0) == []
    finally:
        await store.close()

    reopened = await Store.open(path)
    try:
        assert await reopened.last_user_at("p", "u") == 200.0
        assert await reopened.prune(20.0) == 2
        assert await reopened.sent_parts("msg1") == {}
        assert await reopened.sent_parts("msg2") == {0: "m_3"}
    finally:
        await reopened.close()


async def test_two_replicas_moving_one_window_at_once_keep_the_latest(database_settings: DatabaseSettings) -> None:
    first, second = await Store.open(database_settings), await Store.open(database_settings)
    try:
        times = [float(t) for t in range(1, 41)]
        # Webhooks of one person, out of order, recorded by two replicas at once.
        await asyncio.gather(*((first if i % 2 else second).touch_windows([UserAction("p", "u", at)])
                               for i, at in enumerate(reversed(times))))
        assert await first.last_user_at("p", "u") == await second.last_user_at("p", "u") == max(times)
        count = await first.db.fetchval("SELECT COUNT(*) FROM windows WHERE page_id = 'p' AND psid = 'u'")
        assert count == 1
    finally:
        await first.close()
        await second.close()
